"""UnitedLLM: federated fine-tuning of large language models across organisations and GPU clouds.

The public API is what this module exports. Heavy libraries (torch, transformers) are
imported only when a run starts, so ``import unitedllm`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unitedllm.errors import (
    CommError,
    ConfigError,
    IntegrityError,
    MissingDependency,
    ProtocolError,
    RoundError,
    TrainingError,
    UnitedLLMError,
    UpdateRejected,
)

if TYPE_CHECKING:
    from unitedllm.aggregator import Aggregator, RunResult
    from unitedllm.client import Client
    from unitedllm.config import Config, load_config
    from unitedllm.launch import launch
    from unitedllm.runner import run, run_async
    from unitedllm.training.base import LocalTrainer

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Client",
    "CommError",
    "Config",
    "ConfigError",
    "IntegrityError",
    "LocalTrainer",
    "MissingDependency",
    "ProtocolError",
    "RoundError",
    "RunResult",
    "TrainingError",
    "UnitedLLMError",
    "UpdateRejected",
    "__version__",
    "launch",
    "load_config",
    "run",
    "run_async",
]

_LAZY = {
    "Aggregator": "unitedllm.aggregator",
    "RunResult": "unitedllm.aggregator",
    "Client": "unitedllm.client",
    "Config": "unitedllm.config",
    "load_config": "unitedllm.config",
    "launch": "unitedllm.launch",
    "run": "unitedllm.runner",
    "run_async": "unitedllm.runner",
    "LocalTrainer": "unitedllm.training.base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'unitedllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
