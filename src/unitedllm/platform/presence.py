"""Device presence on the broker: each agent's retained ``online`` and its last will ``offline``.

An agent logs in to the platform's broker as its own device (``device-<id>``) and keeps one
connection open. On every (re)connection it registers a retained last will ``offline`` and then
publishes a retained ``online``, both on ``unitedllm/devices/<id>/presence`` and both stamped
with that connection's start (``since``) and signed with the device key. When the agent's process
dies, the broker publishes the will and the controller shows the device OFFLINE at once.

The controller trusts a presence message only when the topic's device id is the payload's, the
device is enrolled, and the signature verifies under the key it enrolled with; the broker's ACL
also lets only ``device-<id>`` publish on that topic. Messages apply in the order of
``(since, online < offline)``, so the will of an earlier connection that arrives after a newer
``online`` changes nothing.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unitedllm.comm.settings import MqttSettings
from unitedllm.platform import signing
from unitedllm.platform.errors import PlatformError

__all__ = [
    "ONLINE",
    "PRESENCE_OFFLINE",
    "Presence",
    "PresenceListener",
    "mqtt_client",
    "open_presence",
    "presence_payload",
    "presence_topic",
]

log = logging.getLogger(__name__)

ONLINE = "online"
PRESENCE_OFFLINE = "offline"
STATUS_ORDER = {ONLINE: 0, PRESENCE_OFFLINE: 1}
TOPIC_FILTER = "unitedllm/devices/+/presence"
KIND = "unitedllm-presence"


def presence_topic(device_id: str) -> str:
    return f"unitedllm/devices/{device_id}/presence"


def presence_payload(keys: signing.KeyPair, device_id: str, status: str, since: float) -> bytes:
    """A presence message as published: the statement and the device's signature over it."""
    statement = {"kind": KIND, "device_id": device_id, "status": status, "since": since}
    return json.dumps({**statement, "signature": keys.sign(signing.canonical(statement))}).encode()


@dataclass(frozen=True)
class Presence:
    device_id: str
    status: str
    since: float

    def order(self) -> tuple[float, int]:
        return (self.since, STATUS_ORDER[self.status])


def open_presence(topic: str, payload: bytes, public_key_of: Callable[[str], str | None]) -> Presence:
    """The presence a message states, after every check; PlatformError naming the failure otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[:2] != ["unitedllm", "devices"] or parts[3] != "presence":
        raise PlatformError(f"presence on {topic!r}: not a device presence topic")
    device_id = parts[2]
    try:
        message = json.loads(payload)
        statement = {k: message[k] for k in ("kind", "device_id", "status", "since")}
        signature = str(message["signature"])
        since = float(statement["since"])
    except (ValueError, KeyError, TypeError):
        raise PlatformError(f"presence on {topic!r}: not a signed presence message") from None
    if statement["kind"] != KIND or statement["status"] not in STATUS_ORDER:
        raise PlatformError(f"presence on {topic!r}: unknown kind or status {statement['status']!r}")
    if statement["device_id"] != device_id:
        raise PlatformError(f"presence on {topic!r} speaks for device {statement['device_id']!r}")
    public_key = public_key_of(device_id)
    if public_key is None:
        raise PlatformError(f"presence on {topic!r}: device {device_id!r} is not enrolled")
    if not signing.verify(public_key, signing.canonical(statement), signature):
        raise PlatformError(f"presence on {topic!r}: the signature is not device {device_id!r}'s")
    return Presence(device_id, str(statement["status"]), since)


def mqtt_client(settings: MqttSettings, client_id: str) -> Any:
    """A paho client (MQTT 3.1.1) logged in with ``settings``, TLS when they name a CA file."""
    from paho.mqtt.client import Client
    from paho.mqtt.enums import CallbackAPIVersion

    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca_file is not None:
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
        if settings.tls_cert_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        client.tls_set_context(context)
    client.reconnect_delay_set(1, 10)
    return client


class PresenceListener:
    """The controller's subscription to every device's presence; ``apply`` gets each checked one."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        public_key_of: Callable[[str], str | None],
        apply: Callable[[Presence], object],
    ):
        self.settings = settings
        self.public_key_of = public_key_of
        self.apply = apply
        self.subscribed = threading.Event()
        self._client = mqtt_client(settings, f"unitedllm-controller-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self.subscribed.set()
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("presence: the broker refused the controller's login (%s)", reason)
            return
        client.subscribe(TOPIC_FILTER, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        if not message.payload:
            return  # a retained presence being cleared
        try:
            presence = open_presence(message.topic, bytes(message.payload), self.public_key_of)
            self.apply(presence)
        except PlatformError as exc:
            log.warning("presence refused: %s", exc)
        except Exception:  # a database hiccup must not end the subscription
            log.exception("presence on %s could not be applied", message.topic)
