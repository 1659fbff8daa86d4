"""The global models an MQTT_S3 run announces, heard by an observer that never speaks on the run's broker.

The aggregator tells each client of a round where the global model is: ``RoundStart`` of round r
carries the global weights after round r-1, ``Finish`` the final ones (after the last round). Both
travel on the clients' topics (:func:`~unitedllm.comm.mqtt.to_topic`), sealed with the key of the
link to that client. The observer subscribes to the topics of the client ranks whose keys it holds
and opens each frame with the same :class:`~unitedllm.protocol.signing.MessageGuard` a client uses:
a frame that is not the aggregator's (bad HMAC, another run, a replay) is dropped and logged there.
It publishes nothing (no presence, no will), so the run does not see it, and several copies of one
round's announcement (one per client) come out as one :class:`GlobalAnnouncement`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from unitedllm.comm.mqtt import Backoff, refused_login, to_topic
from unitedllm.comm.settings import MqttSettings
from unitedllm.errors import CommError, MissingDependency
from unitedllm.protocol.messages import BlobRef, Finish, RoundStart
from unitedllm.protocol.signing import MessageGuard, RankKeys

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["GlobalAnnouncement", "RunAnnouncements"]

log = logging.getLogger(__name__)

AGGREGATOR = 0
_RECONNECT = Backoff(initial=0.5, maximum=10.0)  # the run's own transport's pauses


@dataclass(frozen=True)
class GlobalAnnouncement:
    """The global model after ``round``, at ``ref`` in the run's blob store (as the aggregator signed it)."""

    round: int
    ref: BlobRef
    final: bool = False


class RunAnnouncements:
    """Listens to a run's broker for global models; iterate :meth:`announcements` (an async context manager).

    ``links`` maps each observed client rank to the key of its link with the aggregator.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        run_id: str,
        links: dict[int, bytes],
        connect_timeout_s: float = 30.0,
    ):
        if not links:
            raise ValueError("RunAnnouncements needs the key of at least one client rank's link")
        self.settings = settings
        self.run_id = run_id
        self.guards = {
            rank: MessageGuard(
                run_id=run_id, keys=RankKeys({rank: key}), receiver=rank, valid_senders={AGGREGATOR}
            )
            for rank, key in links.items()
        }
        self.connect_timeout_s = connect_timeout_s
        self._identifier = f"unitedllm-{run_id}-observer-{secrets.token_hex(4)}"
        self._queue: asyncio.Queue[GlobalAnnouncement | BaseException] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen: set[int] = set()

    @property
    def ranks(self) -> list[int]:
        """The client ranks whose topics are observed."""
        return sorted(self.guards)

    async def __aenter__(self) -> Self:
        try:
            import aiomqtt  # noqa: F401 - fail early with the extra to install
        except ImportError:
            raise MissingDependency("aiomqtt", "mqtt-s3", "following an MQTT_S3 run") from None
        self._task = asyncio.create_task(self._listen(), name="unitedllm-follow-broker")
        connected = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait(
            {self._task, connected}, timeout=self.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if connected not in done:
            connected.cancel()
            await self.__aexit__(None, None, None)
            raise CommError(
                f"could not reach the MQTT broker at {self.settings.address} within "
                f"{self.connect_timeout_s:g}s to follow run {self.run_id}"
            )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def announcements(self) -> AsyncIterator[GlobalAnnouncement]:
        """Each round's global model once, as its first signed announcement arrives."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def admit(self, rank: int, payload: bytes) -> GlobalAnnouncement | None:
        """The announcement in a frame on client ``rank``'s topic, if it is a new, signed one."""
        guard = self.guards.get(rank)
        if guard is None or not payload:  # an empty payload clears a retained message: nothing said
            return None
        message = guard.admit(payload)
        match message:
            case RoundStart(round=start) if start >= 1:
                announced = GlobalAnnouncement(start - 1, message.global_ref)
            case Finish(final_ref=BlobRef() as ref, round=end) if end >= 1:
                announced = GlobalAnnouncement(end - 1, ref, final=True)
            case _:
                return None
        if announced.round in self._seen:
            return None
        self._seen.add(announced.round)
        return announced

    async def _listen(self) -> None:
        """Keep one subscription up; a lost connection is made again with growing pauses."""
        import aiomqtt

        failures = 0  # failed connections since the last good one: the pause grows with them
        while True:
            connected = False
            try:
                async with self._client() as client:
                    connected = True
                    for rank in self.ranks:
                        await client.subscribe(to_topic(self.run_id, rank), qos=1)
                    if self._connected.is_set():
                        log.info("following run %s again on %s", self.run_id, self.settings.address)
                    self._connected.set()
                    failures = 0
                    async for received in client.messages:
                        payload = received.payload
                        if not isinstance(payload, bytes | bytearray):
                            continue
                        rank = int(received.topic.value.rsplit("/", 1)[-1])
                        announced = self.admit(rank, bytes(payload))
                        if announced is not None:
                            self._queue.put_nowait(announced)
            except aiomqtt.MqttError as exc:
                if not connected and not self._connected.is_set() and refused_login(exc):
                    self._queue.put_nowait(
                        CommError(
                            f"the MQTT broker at {self.settings.address} refused the login of user "
                            f"{self.settings.username!r} (check UNITEDLLM_MQTT_USERNAME/UNITEDLLM_MQTT_PASSWORD)"
                        )
                    )
                    return
                log.warning("lost the MQTT broker at %s (%s); reconnecting", self.settings.address, exc)
            failures += 1
            await asyncio.sleep(_RECONNECT.delay(failures))

    def _client(self) -> aiomqtt.Client:
        import aiomqtt

        s = self.settings
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self._identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=s.keepalive,
            timeout=max(10.0, float(s.keepalive)),
            tls_context=s.ssl_context(),
        )
