"""Client-side maths of FedProx and SCAFFOLD, as pure functions.

Local training applies both as per-step gradient corrections
(:mod:`unitedllm.training.client_algorithms`); the loss forms below have exactly those
gradients, so a trainer may instead add them to its loss::

    loss = model_loss + proximal_term(trainable, global_weights, mu)          # FedProx
    loss = model_loss + scaffold_term(trainable, c_server, c_client)          # SCAFFOLD

``trainable`` maps parameter names (the same names as the exchanged weights) to the
model's ``nn.Parameter`` objects; the reference tensors must be detached copies on the
same device.

* FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020:
  local objective F_k(w) + μ/2 ‖w − w_t‖².
* SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", ICML 2020, Algorithm 1: local steps use g − c_i + c; afterwards
  c_i⁺ = c_i − c + (x − y_i) / (K η_l) (option II), and the client sends
  Δy_i = y_i − x with Δc_i = c_i⁺ − c_i in ``ClientUpdate.extras["control/<name>"]``.
  With plain SGD steps y_i = x − Σ_k η_k (g_k − c_i + c), so option II equals
  Σ_k η_k g_k / Σ_k η_k, the learning-rate-weighted mean of the data gradients the steps
  used (:func:`scaffold_control_from_gradients`). That form is what clients compute: it is
  option II under SGD and stays a gradient with any local optimizer, where the weight form
  does not (with Adam, (x − y_i)/(K η_l) is a mean of normalised steps, not a gradient).

On the wire a group of named tensors travels as one blob under one key of
``RoundStart.extras`` / ``Update.extras``; the key ``control`` holds control variates
(the server's c in a round start, a client's Δc_i in an update), and its tensors become
``extras["control/<name>"]`` of the :class:`~unitedllm.optimizers.base.ClientUpdate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "CONTROL_EXTRA",
    "CONTROL_PREFIX",
    "SendsRoundExtras",
    "control_extras",
    "proximal_term",
    "scaffold_control_from_gradients",
    "scaffold_control_update",
    "scaffold_term",
]

CONTROL_EXTRA = "control"
CONTROL_PREFIX = CONTROL_EXTRA + "/"


@runtime_checkable
class SendsRoundExtras(Protocol):
    """A server optimizer whose clients need tensors besides the global weights (SCAFFOLD's c)."""

    def round_start_extras(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Groups of named tensors for every client of the next round, keyed like ``RoundStart.extras``."""
        ...


def _check_names(params: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(params) - set(other))
    if missing:
        raise KeyError(f"{what} lacks tensors for {missing[:5]}")


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's μ/2 Σ‖θ − θ_global‖² over ``params`` (differentiable in ``params``)."""
    _check_names(params, global_params, "global_params")
    total = torch.zeros((), dtype=torch.float32)
    for name, p in params.items():
        diff = p - global_params[name].to(device=p.device, dtype=p.dtype)
        total = total.to(p.device) + diff.float().square().sum()
    return total * (mu / 2.0)


def scaffold_term(
    params: Mapping[str, torch.Tensor],
    c_server: Mapping[str, torch.Tensor],
    c_client: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Σ⟨θ, c − c_i⟩: adding it to the loss turns each gradient g into SCAFFOLD's g − c_i + c."""
    _check_names(params, c_server, "c_server")
    _check_names(params, c_client, "c_client")
    total = torch.zeros((), dtype=torch.float32)
    for name, p in params.items():
        corr = (c_server[name] - c_client[name]).to(device=p.device, dtype=p.dtype)
        total = total.to(p.device) + (p * corr).float().sum()
    return total


def scaffold_control_update(
    c_client: Mapping[str, torch.Tensor],
    c_server: Mapping[str, torch.Tensor],
    global_weights: Mapping[str, torch.Tensor],
    local_weights: Mapping[str, torch.Tensor],
    *,
    num_steps: int,
    learning_rate: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD option II: (c_i⁺, Δc_i) with c_i⁺ = c_i − c + (x − y_i)/(K η_l), Δc_i = c_i⁺ − c_i."""
    if num_steps < 1 or learning_rate <= 0:
        raise ValueError(f"need num_steps >= 1 and learning_rate > 0, got {num_steps}, {learning_rate}")
    scale = 1.0 / (num_steps * learning_rate)
    new_c: dict[str, torch.Tensor] = {}
    delta_c: dict[str, torch.Tensor] = {}
    for name, x in global_weights.items():
        ci = c_client[name].to(torch.float64)
        c = c_server[name].to(torch.float64)
        y = local_weights[name].detach().to(torch.float64)
        updated = ci - c + (x.to(torch.float64) - y) * scale
        new_c[name] = updated.to(c_client[name].dtype)
        delta_c[name] = (updated - ci).to(c_client[name].dtype)
    return new_c, delta_c


def scaffold_control_from_gradients(
    c_client: Mapping[str, torch.Tensor],
    weighted_gradient_sum: Mapping[str, torch.Tensor],
    learning_rate_sum: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD option II from the steps' gradients: (c_i⁺, Δc_i), c_i⁺ = Σ_k η_k g_k / Σ_k η_k."""
    if learning_rate_sum <= 0:
        raise ValueError(f"need a positive sum of learning rates, got {learning_rate_sum}")
    new_c: dict[str, torch.Tensor] = {}
    delta_c: dict[str, torch.Tensor] = {}
    for name, ci in c_client.items():
        updated = weighted_gradient_sum[name].to(torch.float64) / learning_rate_sum
        new_c[name] = updated.to(ci.dtype)
        delta_c[name] = (updated - ci.to(torch.float64)).to(ci.dtype)
    return new_c, delta_c


def control_extras(delta_c: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ClientUpdate.extras`` carrying SCAFFOLD control-variate deltas."""
    return {CONTROL_PREFIX + name: t for name, t in delta_c.items()}
