"""Config keys that a way of running ignores, so the CLI can say so once instead of silently dropping them.

``unitedllm run`` trains every rank in one process: it runs no node bootstrap and starts no
launcher or multi-node silo, and with the LOCAL backend it talks to no broker or store. The
aggregator (``unitedllm server``) runs no bootstrap either; that is each client node's step.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from unitedllm.config.types import CommArgs, Config, EnvironmentArgs

__all__ = ["Mode", "ignored_keys"]

Mode = Literal["run", "server", "client"]


def _changed(
    section: msgspec.Struct, default: msgspec.Struct, keys: tuple[str, ...] | None = None
) -> list[str]:
    """The keys of ``section`` set to something other than their default."""
    names = keys if keys is not None else section.__struct_fields__
    out = []
    for name in names:
        value: Any = getattr(section, name)
        if value != getattr(default, name):
            out.append(name)
    return out


def ignored_keys(cfg: Config, mode: Mode) -> list[tuple[str, str]]:
    """``(YAML path, why)`` for each key set in ``cfg`` that ``mode`` does not use."""
    found: list[tuple[str, str]] = []
    if mode == "run":
        why = "unitedllm run trains every rank in this process (no bootstrap, launcher or multi-node silo)"
        found += [(f"environment_args.{k}", why) for k in _changed(cfg.environment_args, EnvironmentArgs())]
        if cfg.comm_args.backend == "LOCAL":
            why = "the LOCAL backend connects the ranks in this process (no broker, no store)"
            keys = ("mqtt", "s3", "mqtt_config_path", "s3_config_path")
            found += [(f"comm_args.{k}", why) for k in _changed(cfg.comm_args, CommArgs(), keys)]
    elif mode == "server" and cfg.environment_args.bootstrap is not None:
        found.append(
            ("environment_args.bootstrap", "the aggregator runs no bootstrap; each client node runs it")
        )
    return found
