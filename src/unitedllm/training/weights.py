"""Move the trainable tensors in and out of a model, and fingerprint the frozen base.

The trainable tensors are exactly the parameters with ``requires_grad`` (the LoRA
adapters with ``peft_type: lora``, everything with ``none``), keyed by their
``named_parameters`` names, which are stable for a given config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from unitedllm.errors import TrainingError

if TYPE_CHECKING:
    import torch

__all__ = ["base_fingerprint", "base_state_dict", "load_trainable", "trainable_state"]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors, in the dtype they train in."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _listed(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def load_trainable(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's trainable tensors; names and shapes must match exactly."""
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = set(params) - set(weights)
    unexpected = set(weights) - set(params)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
        raise TrainingError("weights do not fit the model's trainable tensors: " + "; ".join(parts))
    for name, p in params.items():
        w = weights[name]
        if tuple(w.shape) != tuple(p.shape):
            raise TrainingError(
                f"weights do not fit the model: {name} has shape {tuple(w.shape)}, the model expects {tuple(p.shape)}"
            )
        if not torch.is_floating_point(w):
            raise TrainingError(f"weights do not fit the model: {name} has non-float dtype {w.dtype}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(device=p.device, dtype=p.dtype))


def _is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base model's tensors under the plain ``transformers`` names (adapters left out)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if _is_adapter(name):
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the frozen base tensors (names, dtypes, shapes, bytes) in name order, plus the config."""
    import torch

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        # Architecture settings matter even when nothing is frozen (``peft_type: none``).
        settings = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    for name in sorted(frozen):
        t = frozen[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
