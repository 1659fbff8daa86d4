"""The typed run config: loading YAML (FedML's ``fedml_config.yaml`` unchanged), overrides, checks, schema.

Importing this package does not import torch; only the server-optimizer name check does,
when a config is loaded.
"""

from typing import TYPE_CHECKING, Any

from unitedllm.config.loader import config_digest, dump_config, load_config
from unitedllm.config.types import (
    CommArgs,
    CommonArgs,
    Config,
    DataArgs,
    DeviceArgs,
    EnvironmentArgs,
    ModelArgs,
    MqttArgs,
    S3Args,
    ServerOptimizerArgs,
    TrackingArgs,
    TrainArgs,
    ValidationArgs,
)

if TYPE_CHECKING:
    from unitedllm.config.schema import config_schema, validate_file

__all__ = [
    "CommArgs",
    "CommonArgs",
    "Config",
    "DataArgs",
    "DeviceArgs",
    "EnvironmentArgs",
    "ModelArgs",
    "MqttArgs",
    "S3Args",
    "ServerOptimizerArgs",
    "TrackingArgs",
    "TrainArgs",
    "ValidationArgs",
    "config_digest",
    "config_schema",
    "dump_config",
    "load_config",
    "validate_file",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import unitedllm.config` stays light; the schema and file validation load on first use.
    if name in ("config_schema", "validate_file"):
        from unitedllm.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'unitedllm.config' has no attribute {name!r}")
