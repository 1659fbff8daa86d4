"""SCAFFOLD's server side: average the model and control-variate deltas, keep the server control variate.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1:

    x ← x + η_g Δx̄,    c ← c + (|S| / N) Δc̄

where Δx̄ is the mean of the clients' model deltas (sample-weighted like FedAvg's unless
``sample_weighted: false``; the paper's clients are equal-sized) and Δc̄ the plain mean of
their control-variate deltas (sent in ``extras["control/<name>"]``): each client counts
once, so c stays the average (1/N) Σ c_i of all clients' control variates, as the
algorithm needs whatever their sample counts. |S| is the clients in the round and N =
``client_num_in_total`` (``num_clients`` given to :func:`create`; |S| when not given).
η_g = ``server_learning_rate`` (default 1). The server control variate is state
``control/<name>``; the aggregator sends it to clients with the global weights
(:meth:`Scaffold.round_start_extras`, ``RoundStart.extras["control"]``). The client half is
in :mod:`unitedllm.optimizers.client_side` and :mod:`unitedllm.training.client_algorithms`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unitedllm.optimizers.base import ClientUpdate, Tensors, register
from unitedllm.optimizers.client_side import CONTROL_EXTRA, CONTROL_PREFIX
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, scaled, state_dtype

__all__ = ["Scaffold"]


@register
class Scaffold(MeanRuleOptimizer):
    """Mean of model deltas plus a server control variate updated from the clients' control deltas."""

    name = "SCAFFOLD"
    defaults = {"server_learning_rate": 1.0}

    def extras_weight(self, update: ClientUpdate) -> int:
        """Every client's Δc_i counts once: c = (1/N) Σ c_i, whatever the sample counts."""
        return 1

    def init_state(self, weights: Mapping[str, torch.Tensor]) -> Tensors:
        return {CONTROL_PREFIX + n: torch.zeros(w.shape, dtype=state_dtype(w)) for n, w in weights.items()}

    def required_extras(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return {CONTROL_PREFIX + n: w for n, w in weights.items()}

    @staticmethod
    def server_control(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server control variate c, keyed by parameter name, to send to clients."""
        return {k[len(CONTROL_PREFIX) :]: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)}

    def round_start_extras(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The server control variate c for the clients of the next round (``RoundStart.extras["control"]``)."""
        return {CONTROL_EXTRA: self.server_control(state)}

    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        lr = float(self.hparam("server_learning_rate"))
        total = self.num_clients or len(summary.ranks)
        fraction = len(summary.ranks) / total
        new_state = dict(state)
        for name, w in weights.items():
            key = CONTROL_PREFIX + name
            prev = state.get(key)
            c = (
                torch.zeros(w.shape, dtype=torch.float64)
                if prev is None
                else prev.to(torch.float64, copy=True)
            )
            new_state[key] = c.add_(summary.mean_extras[key], alpha=fraction).to(state_dtype(w))
        return apply_step(weights, scaled(mean_delta, lr)), new_state
