"""Paths a config names, relative to the config file: the one rule every reader of a path follows.

A relative path is looked up next to the config file first, then (unchanged) in the current
directory; a model or tokenizer name found in neither stays as it is (a hub name such as
``EleutherAI/pythia-70m``). :func:`resolve_config_paths` applies the rule once, when a config is
loaded from a file, to every key that names a local file or folder, so later readers (the
MQTT/S3 settings files, per-rank keys, the node bootstrap, the DeepSpeed config, models, data)
need not know where the config came from.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from unitedllm.config.types import Config

__all__ = ["beside_config", "resolve_config_paths"]


def beside_config(value: str, config_dir: Path) -> str:
    """``value`` as the path next to the config file when that exists, else unchanged.

    A ``{rank}`` template counts as existing when its folder does.
    """
    path = Path(value).expanduser()
    if not value or path.is_absolute():
        return value
    candidate = config_dir / path
    probe = candidate.parent if "{rank}" in candidate.name else candidate
    return str(candidate) if "{rank}" not in str(probe) and probe.exists() else value


def _optional(value: str | None, config_dir: Path) -> str | None:
    return None if value is None else beside_config(value, config_dir)


def resolve_config_paths(cfg: Config, config_dir: Path) -> Config:
    """``cfg`` with every relative local path that exists next to the config file made absolute."""
    model, data, comm = cfg.model_args, cfg.data_args, cfg.comm_args
    model = msgspec.structs.replace(
        model,
        model_name_or_path=beside_config(model.model_name_or_path, config_dir),
        tokenizer_name_or_path=_optional(model.tokenizer_name_or_path, config_dir),
    )
    data = msgspec.structs.replace(
        data,
        dataset_path=[beside_config(p, config_dir) for p in data.dataset_path],
        client_dataset_path=[beside_config(p, config_dir) for p in data.client_dataset_path],
    )
    comm = msgspec.structs.replace(
        comm,
        mqtt_config_path=_optional(comm.mqtt_config_path, config_dir),
        s3_config_path=_optional(comm.s3_config_path, config_dir),
        rank_keys_path=_optional(comm.rank_keys_path, config_dir),
    )
    env = msgspec.structs.replace(
        cfg.environment_args, bootstrap=_optional(cfg.environment_args.bootstrap, config_dir)
    )
    train = msgspec.structs.replace(cfg.train_args, deepspeed=_optional(cfg.train_args.deepspeed, config_dir))
    return msgspec.structs.replace(
        cfg, model_args=model, data_args=data, comm_args=comm, environment_args=env, train_args=train
    )
