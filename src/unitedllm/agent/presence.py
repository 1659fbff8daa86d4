"""The agent's presence on the platform's broker: a retained ``online``, and ``offline`` as its last will.

The agent logs in as its own device (the login the controller hands to its signed request) and
keeps one connection open. Before each (re)connection it registers a fresh will stamped with that
connection's start; once connected it publishes ``online`` with the same stamp. A clean shutdown
publishes ``offline`` itself; a killed agent's ``offline`` comes from the broker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from unitedllm.comm.settings import MqttSettings
from unitedllm.platform.presence import ONLINE, PRESENCE_OFFLINE, mqtt_client, presence_payload
from unitedllm.platform.signing import KeyPair

__all__ = ["PresenceBeacon", "broker_settings"]

log = logging.getLogger(__name__)


def broker_settings(identity: dict[str, str]) -> MqttSettings | None:
    """Where the broker is (``UNITEDLLM_MQTT_*``, as for the roles) with the device's own login;
    ``None`` (presence by heartbeats only) when this machine names no broker."""
    from unitedllm.comm.settings import resolve_mqtt
    from unitedllm.config.types import CommArgs
    from unitedllm.errors import ConfigError

    try:
        settings = resolve_mqtt(CommArgs(backend="MQTT_S3"))
    except ConfigError as exc:
        log.warning("presence by heartbeats only: no broker setting here (%s)", exc.render())
        return None
    return dataclasses.replace(settings, username=identity["username"], password=identity["password"])


class PresenceBeacon:
    """One broker connection that says this device is online; its will says offline."""

    def __init__(self, settings: MqttSettings, *, device_id: str, topic: str, keys: KeyPair):
        self.settings = settings
        self.device_id = device_id
        self.topic = topic
        self.keys = keys
        self.since = 0.0
        self._client = mqtt_client(settings, f"unitedllm-agent-{device_id}")
        self._client.on_pre_connect = self._before_connect
        self._client.on_connect = self._on_connect

    def _payload(self, status: str) -> bytes:
        return presence_payload(self.keys, self.device_id, status, self.since)

    def _before_connect(self, client: Any, _userdata: Any) -> None:
        # A will of its own for every connection: a stale will never outranks a newer online.
        self.since = max(time.time(), self.since + 0.001)
        client.will_set(self.topic, self._payload(PRESENCE_OFFLINE), qos=1, retain=True)

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("presence: the broker refused this device's login (%s)", reason)
            return
        client.publish(self.topic, self._payload(ONLINE), qos=1, retain=True)
        log.info("presence: online on the broker as %s", self.settings.username)

    def start(self) -> None:
        self._client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        """Say offline (a clean shutdown sends no will) and disconnect."""
        if self._client.is_connected():
            info = self._client.publish(self.topic, self._payload(PRESENCE_OFFLINE), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=5)
            except RuntimeError:
                pass  # the connection dropped meanwhile: the broker sends the will instead
        self._client.disconnect()
        self._client.loop_stop()
