"""FedProx: FedAvg's aggregation, and a proximal term in every client's local objective.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020: each client
minimises F_k(w) + μ/2 ‖w − w_t‖² (μ = ``proximal_mu``, default 0.01). The server
aggregates exactly like FedAvg. On the client the term enters as a per-step gradient
correction μ(w − w_t), its gradient (:class:`ProximalCorrection`); μ = 0 is FedAvg and
changes nothing, so any trainer runs it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unitedllm.optimizers.builtin import FedProxParams
from unitedllm.optimizers.client_hook import ClientHook, LocalCorrection
from unitedllm.optimizers.fedavg import FedAvg

__all__ = ["FedProx", "ProximalCorrection", "ProximalHook"]


class FedProx(FedAvg):
    """FedAvg aggregation for clients training with FedProx's proximal term."""

    name = "FedProx"


class ProximalCorrection(LocalCorrection):
    """Adds μ(w − w_global), the gradient of μ/2 ‖w − w_global‖²."""

    def __init__(self, global_weights: Mapping[str, torch.Tensor], mu: float):
        super().__init__()
        self.mu = float(mu)
        # A copy: a trainer may load the global weights into its model by reference and train them in place.
        self._global = {n: t.detach().clone() for n, t in global_weights.items()}

    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        reference = self._lookup(self._global, name, param, "FedProx's global weights")
        return (param.detach() - reference).mul_(self.mu)


class ProximalHook(ClientHook):
    """FedProx on the client: each round's correction pulls towards that round's global weights."""

    params: FedProxParams

    @property
    def active(self) -> bool:
        return self.params.proximal_mu > 0

    def describe(self) -> str:
        return f"FedProx (proximal_mu {self.params.proximal_mu:g})"

    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection:
        return ProximalCorrection(weights, self.params.proximal_mu)
