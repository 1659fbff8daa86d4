"""FedProx and SCAFFOLD on the client: per-step gradient corrections and SCAFFOLD's control variate.

The run's server optimizer decides what local training adds to its plain steps:

* ``FedProx`` with ``server_optimizer_args.proximal_mu`` = μ > 0: every optimizer step's
  gradient gets μ(w − w_global), the gradient of μ/2 ‖w − w_global‖² (Li et al., MLSys 2020).
  μ = 0 is FedAvg and needs nothing.
* ``SCAFFOLD``: every step's gradient gets c − c_i, where c is the server control variate
  sent with the round start and c_i this client's own (Karimireddy et al., ICML 2020). After
  the round the client computes c_i⁺ by option II from the K optimizer steps it really took
  and their learning rates η_k: c_i⁺ = Σ_k η_k g_k / Σ_k η_k over the data gradients g_k the
  steps used. Under plain SGD this is exactly the paper's c_i − c + (x − y_i) / (K η_l) (with
  K η_l = Σ_k η_k, so a warm-up or decaying schedule counts as used); unlike the weight form
  it stays a gradient with Adam, whose steps are normalised (the weight form made SCAFFOLD
  stall with AdamW clients). The client sends Δc_i = c_i⁺ − c_i with its update and keeps
  c_i⁺ on disk (``node_<rank>/scaffold_control/``), so a restarted client or a retried round
  continues from exactly the c_i it had.

A trainer applies a round's :class:`LocalCorrection` by calling ``correction.apply(params,
learning_rate)`` once per optimizer step, after gradient accumulation and before the
optimizer steps. Trainers list the algorithms they apply in ``LocalTrainer.client_algorithms``;
a run whose algorithm the trainer does not list stops with a config error
(:meth:`ClientAlgorithm.check`) instead of silently training plain FedAvg. The Hugging Face
trainer uses :class:`CorrectionCallback` (``on_pre_optimizer_step``), which runs after the
Trainer's gradient clipping: ``max_grad_norm`` clips the data-loss gradient only, and the
correction is added unclipped, as the local objective prescribes.

The corrections assume the local optimizer follows the gradient (the papers use SGD);
with Adam the corrected gradient is normalised like any other.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import TrainerCallback

from unitedllm.errors import ConfigError, ConfigProblem, ProtocolError, TrainingError
from unitedllm.optimizers.client_side import CONTROL_EXTRA, scaffold_control_from_gradients

if TYPE_CHECKING:
    from unitedllm.config.types import Config
    from unitedllm.training.base import LocalTrainer

__all__ = [
    "FEDPROX",
    "SCAFFOLD",
    "ClientAlgorithm",
    "ControlVariates",
    "CorrectionCallback",
    "LocalCorrection",
    "ProximalCorrection",
    "ScaffoldCorrection",
    "required_algorithm",
]

log = logging.getLogger(__name__)

FEDPROX = "FedProx"
SCAFFOLD = "SCAFFOLD"

Tensors = dict[str, torch.Tensor]


def required_algorithm(cfg: Config) -> str | None:
    """The client algorithm the config's server optimizer needs (``FedProx``, ``SCAFFOLD``), or None."""
    name = cfg.server_optimizer_name.lower()
    if name == FEDPROX.lower():
        return FEDPROX if cfg.train_args.server_optimizer_args.proximal_mu > 0 else None
    if name == SCAFFOLD.lower():
        return SCAFFOLD
    return None


def _optimizer_key(cfg: Config) -> str:
    return (
        "train_args.server_optimizer" if cfg.train_args.server_optimizer else "train_args.federated_optimizer"
    )


class LocalCorrection(abc.ABC):
    """A change to every optimizer step's gradients during one local round; counts the steps it saw."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.steps = 0
        self.learning_rate_sum = 0.0

    def apply(self, params: Mapping[str, torch.Tensor], learning_rate: float) -> None:
        """Add this step's correction to each ``param.grad``: once per optimizer step, just before it."""
        with torch.no_grad():
            for name, p in params.items():
                correction = self._correction(name, p)
                if p.grad is None:
                    p.grad = correction.clone()
                else:
                    p.grad.add_(correction)
        self.steps += 1
        self.learning_rate_sum += float(learning_rate)

    @abc.abstractmethod
    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """What to add to ``param``'s gradient now (same shape, dtype and device as ``param``)."""

    @staticmethod
    def _lookup(tensors: dict[str, torch.Tensor], name: str, param: torch.Tensor, what: str) -> torch.Tensor:
        """``tensors[name]`` on ``param``'s device and dtype (converted once, then cached)."""
        try:
            t = tensors[name]
        except KeyError:
            raise TrainingError(f"{what} has no tensor for the trained parameter {name!r}") from None
        if t.device != param.device or t.dtype != param.dtype:
            t = tensors[name] = t.to(device=param.device, dtype=param.dtype)
        return t


class ProximalCorrection(LocalCorrection):
    """FedProx: adds μ(w − w_global), the gradient of μ/2 ‖w − w_global‖²."""

    name = FEDPROX

    def __init__(self, global_weights: Mapping[str, torch.Tensor], mu: float):
        super().__init__()
        self.mu = float(mu)
        # A copy: a trainer may load the global weights into its model by reference and train them in place.
        self._global = {n: t.detach().clone() for n, t in global_weights.items()}

    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        reference = self._lookup(self._global, name, param, "FedProx's global weights")
        return (param.detach() - reference).mul_(self.mu)


class ScaffoldCorrection(LocalCorrection):
    """SCAFFOLD: adds c − c_i to every step's gradient; :meth:`control_update` gives c_i⁺ and Δc_i."""

    name = SCAFFOLD

    def __init__(self, c_server: Mapping[str, torch.Tensor], c_client: Mapping[str, torch.Tensor]):
        super().__init__()
        self.c_server = dict(c_server)
        self.c_client = dict(c_client)
        self._difference = {
            n: c.to(torch.float64).sub(c_client[n].to(torch.float64)).to(torch.float32)
            for n, c in c_server.items()
        }
        self._gradient_sum: Tensors = {}

    def apply(self, params: Mapping[str, torch.Tensor], learning_rate: float) -> None:
        """Record η_k g_k (the data gradient, before the correction), then correct it."""
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    continue
                total = self._gradient_sum.get(name)
                if total is None:
                    total = self._gradient_sum[name] = torch.zeros(
                        p.shape, dtype=torch.float32, device=p.device
                    )
                total.add_(p.grad, alpha=float(learning_rate))
        super().apply(params, learning_rate)

    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._difference, name, param, "SCAFFOLD's control variate")

    def control_update(self, global_weights: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
        """(c_i⁺, Δc_i) by option II from the steps taken; Δc_i in the global weights' dtypes (the wire's)."""
        if self.steps < 1 or self.learning_rate_sum <= 0:
            raise TrainingError(
                f"SCAFFOLD needs at least one local optimizer step with a positive learning rate; this round took "
                f"{self.steps} step(s) with learning rates summing to {self.learning_rate_sum:g}"
            )
        gradient_sum = {
            n: self._gradient_sum[n].cpu() if n in self._gradient_sum else torch.zeros_like(c)
            for n, c in self.c_client.items()
        }
        new_c, delta_c = scaffold_control_from_gradients(self.c_client, gradient_sum, self.learning_rate_sum)
        return new_c, {n: d.to(global_weights[n].dtype) for n, d in delta_c.items()}


class CorrectionCallback(TrainerCallback):
    """Applies a :class:`LocalCorrection` in a Hugging Face ``Trainer``, after clipping, before each step."""

    def __init__(self, params: Mapping[str, torch.Tensor], correction: LocalCorrection):
        self.params = params
        self.correction = correction

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs["optimizer"]
        self.correction.apply(self.params, float(optimizer.param_groups[0]["lr"]))


class ControlVariates:
    """A client's SCAFFOLD control variate c_i after each round it trained, as safetensors files in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _saved(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        return {int(p.stem.rsplit("_", 1)[1]): p for p in self.folder.glob("after_round_*.safetensors")}

    def before(self, round_idx: int) -> Tensors | None:
        """c_i as it was when ``round_idx`` began: the newest one saved after an earlier round (None: zero)."""
        from safetensors.torch import load_file

        earlier = [r for r in self._saved() if r < round_idx]
        return load_file(str(self._saved()[max(earlier)])) if earlier else None

    def save(self, round_idx: int, control: Mapping[str, torch.Tensor]) -> None:
        """Store c_i after ``round_idx`` (atomically), keeping the two newest (a retried round needs the older)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"after_round_{round_idx}.safetensors"
        tmp = target.with_suffix(".tmp")
        save_file({n: t.contiguous() for n, t in control.items()}, str(tmp))
        tmp.replace(target)
        saved = self._saved()
        for old in sorted(saved)[:-2]:
            saved[old].unlink(missing_ok=True)


class ClientAlgorithm:
    """What one client adds to local training, round after round, for the run's server optimizer."""

    def __init__(self, cfg: Config, folder: Path):
        self.name = required_algorithm(cfg)
        self.optimizer_name = cfg.server_optimizer_name
        self.optimizer_key = _optimizer_key(cfg)
        self.mu = cfg.train_args.server_optimizer_args.proximal_mu
        self.controls = ControlVariates(folder)

    def check(self, trainer: LocalTrainer) -> None:
        """ConfigError unless ``trainer`` applies this run's client algorithm (a custom trainer may not)."""
        if self.name is None or self.name in trainer.client_algorithms:
            return
        supported = ", ".join(sorted(trainer.client_algorithms)) or "none"
        detail = f" (proximal_mu {self.mu:g})" if self.name == FEDPROX else ""
        raise ConfigError(
            ConfigProblem(
                self.optimizer_key,
                f"{self.optimizer_name}{detail} changes the clients' local training, but the local trainer "
                f"{type(trainer).__name__} does not apply it (its client_algorithms: {supported}); use the "
                "Hugging Face trainer, list the algorithm in the trainer's client_algorithms and call "
                "correction.apply() before each optimizer step, or choose another server optimizer",
            )
        )

    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection | None:
        """The correction for this round's local training (None: plain training)."""
        if CONTROL_EXTRA in extras and self.name != SCAFFOLD:
            raise ProtocolError(
                f"round {round_idx}: the aggregator sends a SCAFFOLD control variate, but this client's config "
                f"names {self.optimizer_name} ({self.optimizer_key}); give both sides the same config"
            )
        if self.name == FEDPROX:
            return ProximalCorrection(weights, self.mu)
        if self.name != SCAFFOLD:
            return None
        c_server = extras.get(CONTROL_EXTRA)
        if c_server is None:
            raise ProtocolError(
                f"round {round_idx}: the round start carries no server control variate (extras "
                f"{CONTROL_EXTRA!r}), but this client's config names SCAFFOLD ({self.optimizer_key}); "
                "give both sides the same config"
            )
        if set(c_server) != set(weights):
            raise ProtocolError(
                f"round {round_idx}: the server control variate names {len(c_server)} tensors, "
                f"the global weights {len(weights)}; they must be the same"
            )
        saved = self.controls.before(round_idx)
        c_client = saved if saved is not None else {n: torch.zeros_like(c) for n, c in c_server.items()}
        return ScaffoldCorrection(c_server, c_client)

    def finish_round(
        self,
        round_idx: int,
        correction: LocalCorrection | None,
        weights: Mapping[str, torch.Tensor],
    ) -> dict[str, Tensors]:
        """Groups of tensors to send with the update (SCAFFOLD: ``control`` = Δc_i); stores c_i⁺."""
        if not isinstance(correction, ScaffoldCorrection):
            return {}
        new_c, delta_c = correction.control_update(weights)
        self.controls.save(round_idx, new_c)
        log.debug("round %d: SCAFFOLD control update from %d steps", round_idx, correction.steps)
        return {CONTROL_EXTRA: delta_c}
