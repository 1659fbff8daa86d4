"""Client-side maths of FedProx and SCAFFOLD, as pure functions a local trainer can call.

Both corrections are written as extra loss terms, so a Hugging Face ``Trainer`` only has
to add them in ``compute_loss`` (autograd does the rest)::

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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "CONTROL_PREFIX",
    "control_extras",
    "proximal_term",
    "scaffold_control_update",
    "scaffold_term",
]

CONTROL_PREFIX = "control/"


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


def control_extras(delta_c: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ClientUpdate.extras`` carrying SCAFFOLD control-variate deltas."""
    return {CONTROL_PREFIX + name: t for name, t in delta_c.items()}
