"""DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023. Each round the outer gradient is g = −Δ̄ (the previous global minus the mean of
the client models), and the outer optimizer is PyTorch-style Nesterov SGD with
lr 0.7 and momentum 0.9 (the paper's values):

    v ← μ v + g,    w ← w − η (g + μ v)

i.e. with Δ̄ = −g: v' = μ v' + Δ̄ and w ← w + η (Δ̄ + μ v') where v' = −v. The paper
averages workers uniformly; here the mean is sample-weighted unless
``sample_weighted: false``. State: ``momentum/<name>`` (v' in float32).
"""

from __future__ import annotations

from unitedllm.optimizers.fedavgm import FedAvgM

__all__ = ["DiLoCo"]


class DiLoCo(FedAvgM):
    """Outer Nesterov-momentum SGD on the round's pseudo-gradient: FedAvgM's step with DiLoCo's defaults (DiLoCoParams)."""

    name = "DiLoCo"
