"""The networked backend (``comm_args.backend: MQTT_S3``): control messages over MQTT, tensors in S3.

The two halves live in :mod:`unitedllm.comm.mqtt` and :mod:`unitedllm.comm.s3`; connection
settings are resolved by :mod:`unitedllm.comm.settings`, and :func:`unitedllm.comm.factory.open_backend`
builds both from a run config.
"""

from unitedllm.comm.mqtt import Backoff, MqttTransport, presence_topic, to_topic
from unitedllm.comm.s3 import S3BlobStore
from unitedllm.comm.settings import MqttSettings, S3Settings

__all__ = [
    "Backoff",
    "MqttSettings",
    "MqttTransport",
    "S3BlobStore",
    "S3Settings",
    "presence_topic",
    "to_topic",
]
