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
(:meth:`Scaffold.round_start_extras`, ``RoundStart.extras["control"]``).

The client half (:class:`ScaffoldHook`): every local step's gradient gets c − c_i, where c is
the server control variate and c_i the client's own. After the round the client computes
c_i⁺ by option II from the K optimizer steps it really took and their learning rates η_k:
c_i⁺ = Σ_k η_k g_k / Σ_k η_k over the data gradients g_k the steps used. Under plain SGD this
is exactly the paper's c_i − c + (x − y_i) / (K η_l) (with K η_l = Σ_k η_k, so a warm-up or
decaying schedule counts as used); unlike the weight form it stays a gradient with Adam, whose
steps are normalised (the weight form made SCAFFOLD stall with AdamW clients). The client sends
Δc_i = c_i⁺ − c_i in ``Update.extras["control"]`` and keeps c_i⁺ on disk
(``node_<rank>/scaffold_control/``), so a restarted client or a retried round continues from
exactly the c_i it had.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from unitedllm.errors import ProtocolError, TrainingError
from unitedllm.optimizers.algorithms import RuleParams
from unitedllm.optimizers.base import ClientUpdate, Tensors
from unitedllm.optimizers.client_hook import ClientHook, LocalCorrection
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, scaled, state_dtype

__all__ = [
    "CONTROL_EXTRA",
    "CONTROL_PREFIX",
    "ControlVariates",
    "Scaffold",
    "ScaffoldCorrection",
    "ScaffoldHook",
    "control_extras",
]

log = logging.getLogger(__name__)

#: The extras group holding control variates: the server's c in a round start, a client's Δc_i in an update.
CONTROL_EXTRA = "control"
#: Its tensors' prefix in ``ClientUpdate.extras`` and in the server state.
CONTROL_PREFIX = CONTROL_EXTRA + "/"


def control_extras(delta_c: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ClientUpdate.extras`` carrying SCAFFOLD control-variate deltas."""
    return {CONTROL_PREFIX + name: t for name, t in delta_c.items()}


class Scaffold(MeanRuleOptimizer):
    """Mean of model deltas plus a server control variate updated from the clients' control deltas."""

    name = "SCAFFOLD"

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
        lr = self.params.server_learning_rate
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


class ScaffoldCorrection(LocalCorrection):
    """Adds c − c_i to every step's gradient; :meth:`control_update` gives c_i⁺ and Δc_i."""

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
        """(c_i⁺, Δc_i) by option II from the steps taken; Δc_i in the global weights' dtypes (the wire's).

        c_i⁺ = Σ_k η_k g_k / Σ_k η_k, computed in float64 and stored in c_i's dtype.
        """
        if self.steps < 1 or self.learning_rate_sum <= 0:
            raise TrainingError(
                f"SCAFFOLD needs at least one local optimizer step with a positive learning rate; this round took "
                f"{self.steps} step(s) with learning rates summing to {self.learning_rate_sum:g}"
            )
        new_c: Tensors = {}
        delta_c: Tensors = {}
        for name, ci in self.c_client.items():
            total = self._gradient_sum[name].cpu() if name in self._gradient_sum else torch.zeros_like(ci)
            updated = total.to(torch.float64) / self.learning_rate_sum
            new_c[name] = updated.to(ci.dtype)
            delta_c[name] = (updated - ci.to(torch.float64)).to(ci.dtype).to(global_weights[name].dtype)
        return new_c, delta_c


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


class ScaffoldHook(ClientHook):
    """SCAFFOLD on the client: corrects each step by c − c_i, then sends Δc_i and keeps c_i⁺."""

    reads_extras = frozenset({CONTROL_EXTRA})
    sends_extras = frozenset({CONTROL_EXTRA})

    def __init__(self, params: RuleParams, folder: Path):
        super().__init__(params, folder)
        self.controls = ControlVariates(self.folder)

    def describe(self) -> str:
        return "SCAFFOLD"

    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection:
        c_server = extras.get(CONTROL_EXTRA)
        if c_server is None:
            raise ProtocolError(
                f"round {round_idx}: the round start carries no server control variate (extras "
                f"{CONTROL_EXTRA!r}), but this client's config names SCAFFOLD; give both sides the same config"
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
        self, round_idx: int, correction: LocalCorrection, weights: Mapping[str, torch.Tensor]
    ) -> dict[str, Tensors]:
        assert isinstance(correction, ScaffoldCorrection)
        new_c, delta_c = correction.control_update(weights)
        self.controls.save(round_idx, new_c)
        log.debug("round %d: SCAFFOLD control update from %d steps", round_idx, correction.steps)
        return {CONTROL_EXTRA: delta_c}
