"""The typed run config: loading YAML (FedML's ``fedml_config.yaml`` unchanged), overrides, checks, schema.

Importing this package does not import torch; only the server-optimizer name check does,
when a config is loaded.
"""

from unitedllm.config.loader import config_digest, dump_config, load_config
from unitedllm.config.schema import config_schema, validate_file
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
