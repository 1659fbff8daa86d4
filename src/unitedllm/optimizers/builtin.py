"""The built-in federated algorithms: each one's hyper-parameters (paper defaults) and its registration.

Torch-free. Each rule lives in its own file, with its paper cited there; this module says
which parameters it takes and wires its server rule to its client hook. A config gives the
parameters in FedML's flat ``train_args.server_optimizer_args``; each rule takes only its own
keys. The value limits are shared with that flat section (:mod:`unitedllm.config.types`).
"""

from __future__ import annotations

from unitedllm.config.types import (
    ByzantineCount,
    ClientCount,
    Decay,
    LearningRate,
    NonNegativeFloat,
    StepRatio,
    Tau,
    TrimRatio,
)
from unitedllm.optimizers.algorithms import Algorithm, RuleParams, register_algorithm

__all__ = [
    "AdagradParams",
    "AdamParams",
    "DiLoCoParams",
    "FedAvgParams",
    "FedProxParams",
    "KrumParams",
    "MeanParams",
    "MomentumParams",
    "RobustParams",
    "TrimmedMeanParams",
]


class MeanParams(RuleParams):
    """What every mean-based rule takes: its step size and how clients are weighted in the mean."""

    server_learning_rate: LearningRate = 1.0
    #: Weight each client by its sample count (FedAvg); false: plain mean.
    sample_weighted: bool = True


class FedAvgParams(MeanParams):
    """FedAvg (McMahan et al. 2017), SCAFFOLD (Karimireddy et al. 2020): learning rate 1 is the paper's rule.

    Another learning rate is Reddi et al.'s "FedAvg with server learning rate".
    """


class FedProxParams(FedAvgParams):
    """FedProx (Li et al., MLSys 2020): FedAvg's aggregation plus the proximal weight μ of the local loss."""

    proximal_mu: NonNegativeFloat = 0.01


class MomentumParams(MeanParams):
    """FedAvgM (Hsu et al. 2019): server SGD with momentum 0.9, heavy-ball; two optional safeguards.

    ``momentum_restart``: zero the momentum when the round's mean delta points against it
    (O'Donoghue and Candès 2015's gradient restart). ``max_step_ratio``: cap the step's L2 norm
    at this multiple of the mean delta's (momentum then amplifies a round's move at most so much).
    """

    server_momentum: Decay = 0.9
    nesterov: bool = False
    momentum_restart: bool = False
    max_step_ratio: StepRatio | None = None


class DiLoCoParams(MomentumParams):
    """DiLoCo (Douillard et al. 2023): outer Nesterov SGD, learning rate 0.7, momentum 0.9."""

    server_learning_rate: LearningRate = 0.7
    nesterov: bool = True


class AdagradParams(MeanParams):
    """FedAdagrad (Reddi et al., ICLR 2021): η = 1e-2 (tune it per task), β1 = 0.9, τ = 1e-3."""

    server_learning_rate: LearningRate = 1e-2
    beta1: Decay = 0.9
    tau: Tau = 1e-3


class AdamParams(AdagradParams):
    """FedAdam and FedYogi (Reddi et al., ICLR 2021): FedAdagrad's parameters plus β2 = 0.99."""

    beta2: Decay = 0.99


class RobustParams(RuleParams):
    """FedMedian (Yin et al. 2018): the step is this learning rate times the median; clients count equally."""

    server_learning_rate: LearningRate = 1.0


class TrimmedMeanParams(RobustParams):
    """Trimmed mean (Yin et al. 2018): the fraction of clients cut at each end, per coordinate."""

    trim_ratio: TrimRatio = 0.1


class KrumParams(RobustParams):
    """Krum / Multi-Krum (Blanchard et al. 2017): clients assumed Byzantine, and how many best updates to average.

    ``multi_krum_m`` unset: 1 for Krum, n − f for MultiKrum.
    """

    num_byzantine: ByzantineCount = 1
    multi_krum_m: ClientCount | None = None


_RULES = "unitedllm.optimizers"

for _alg in (
    Algorithm("FedAvg", FedAvgParams, f"{_RULES}.fedavg:FedAvg"),
    Algorithm("FedProx", FedProxParams, f"{_RULES}.fedprox:FedProx", f"{_RULES}.fedprox:ProximalHook"),
    Algorithm("SCAFFOLD", FedAvgParams, f"{_RULES}.scaffold:Scaffold", f"{_RULES}.scaffold:ScaffoldHook"),
    Algorithm("FedAvgM", MomentumParams, f"{_RULES}.fedavgm:FedAvgM"),
    Algorithm("DiLoCo", DiLoCoParams, f"{_RULES}.diloco:DiLoCo"),
    Algorithm("FedAdam", AdamParams, f"{_RULES}.fedadam:FedAdam"),
    Algorithm("FedYogi", AdamParams, f"{_RULES}.fedyogi:FedYogi"),
    Algorithm("FedAdagrad", AdagradParams, f"{_RULES}.fedadagrad:FedAdagrad"),
    Algorithm("FedMedian", RobustParams, f"{_RULES}.fedmedian:FedMedian"),
    Algorithm("TrimmedMean", TrimmedMeanParams, f"{_RULES}.trimmed_mean:TrimmedMean"),
    Algorithm("Krum", KrumParams, f"{_RULES}.krum:Krum"),
    Algorithm("MultiKrum", KrumParams, f"{_RULES}.krum:MultiKrum"),
):
    register_algorithm(_alg)
