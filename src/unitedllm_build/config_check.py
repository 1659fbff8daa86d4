"""Config validation for the build tool, delegating to :mod:`unitedllm.config`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unitedllm.errors import ConfigError

__all__ = ["CONFIG_FILE_NAME", "check_config"]

CONFIG_FILE_NAME = (
    "fedml_config.yaml"  # FedML's package layout fixes this name: conf_file config/fedml_config.yaml
)


def check_config(path: Path, set_options: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` (every problem with its YAML path) unless ``path`` is a valid config."""
    from unitedllm.config import load_config
    from unitedllm.config.cli_support import parse_set_options

    overrides = parse_set_options(list(set_options)) if set_options else None
    load_config(path, overrides=overrides)


def config_error_lines(err: ConfigError) -> str:
    """The problems of ``err``, one ``path: message`` per line."""
    try:
        from unitedllm.config.cli_support import format_problems
    except ImportError:
        return "\n".join(str(p) for p in err.problems)
    return format_problems(err)
