"""Reading ``train_args.deepspeed``: the DeepSpeed JSON file, checked before any process starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unitedllm.errors import ConfigError, ConfigProblem

__all__ = ["mixed_precision", "read_deepspeed_config", "zero_stage"]

log = logging.getLogger(__name__)

KEY = "train_args.deepspeed"


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """The parsed DeepSpeed config; a missing or malformed file is a ConfigError naming ``train_args.deepspeed``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            ConfigProblem(KEY, f"cannot read the DeepSpeed config {str(path)!r}: {exc.strerror}")
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(ConfigProblem(KEY, f"{str(path)!r} is not valid JSON: {exc}")) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            ConfigProblem(KEY, f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
        )
    stage = (
        data.get("zero_optimization", {}).get("stage", 0)
        if isinstance(data.get("zero_optimization"), dict)
        else 0
    )
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            ConfigProblem(KEY, f"{str(path)!r}: zero_optimization.stage is {stage!r}, expected 0-3")
        )
    return data


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage the config asks for (0 when it has no ``zero_optimization``)."""
    section = config.get("zero_optimization")
    return int(section.get("stage", 0)) if isinstance(section, dict) else 0


def _enabled(config: dict[str, Any], key: str) -> bool | None:
    section = config.get(key)
    value = section.get("enabled") if isinstance(section, dict) else None
    return value if isinstance(value, bool) else None  # "auto" or absent: the training arguments decide


def mixed_precision(path: str | Path, *, bf16: bool, fp16: bool) -> tuple[bool, bool]:
    """``(bf16, fp16)`` for the Hugging Face arguments: a DeepSpeed config that fixes them wins, and says so."""
    config = read_deepspeed_config(path)
    out = {"bf16": bf16, "fp16": fp16}
    for key in ("bf16", "fp16"):
        fixed = _enabled(config, key)
        if fixed is not None and fixed != out[key]:
            log.info("train_args.%s: %s, as %s sets %s.enabled", key, fixed, Path(path).name, key)
            out[key] = fixed
    if out["bf16"] and out["fp16"]:
        raise ConfigError(
            ConfigProblem(KEY, f"{str(path)!r} enables both bf16 and fp16 (with train_args); choose one")
        )
    return out["bf16"], out["fp16"]
