"""Control messages over an MQTT broker (the transport half of ``comm_args.backend: MQTT_S3``).

Topics are namespaced by run: rank ``r`` subscribes to ``unitedllm/<run_id>/to/<r>``, and announces
itself on ``unitedllm/<run_id>/presence/<r>`` with a retained ``online`` message and an MQTT
last-will that turns it ``offline`` when the broker loses the connection. Everything is QoS 1.
Frames and presence are signed with the link's key (:class:`RankKeys`: client ``r``'s own key
for everything between it and the aggregator) and presence carries the connection's epoch, so a
forged or replayed presence cannot mark a rank online or gone (:class:`PresenceGuard`). Anyone
with the broker login can still overwrite a retained presence with junk; a rank that sees
anything but its own current presence on its topic publishes it again, so junk never hides a
live rank from its peers for longer than one round trip.

The connection is kept by a background task: a lost connection is re-established with
exponential backoff (paced by ``tenacity``), the subscriptions restored and the presence published again; after
``retry_window_s`` without a connection the transport gives up with a :class:`CommError`. Messages sent meanwhile wait in a per-peer
outbox, and a message for a peer is published only while that peer is known online (its retained
presence was seen on the current connection), so a broker restart that forgot everyone's session
cannot swallow it. QoS 1 may deliver a frame twice; the :class:`MessageGuard` drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unitedllm.comm.base import Incoming, Presence, Transport
from unitedllm.comm.settings import MqttSettings
from unitedllm.errors import CommError, MissingDependency
from unitedllm.protocol.messages import Message
from unitedllm.protocol.signing import MessageGuard, PresenceGuard, RankKeys, seal, seal_presence

if TYPE_CHECKING:
    import aiomqtt
    from tenacity import RetryCallState

__all__ = ["Backoff", "MqttTransport", "presence_topic", "to_topic"]

log = logging.getLogger(__name__)

# Session kept by the broker across our reconnects, so QoS 1 messages for us wait there.
_SESSION_EXPIRY_S = 3600
# A rank republishes its presence over junk at most this often (an insider flooding junk cannot
# make it flood the broker in turn).
_REPAIR_INTERVAL_S = 1.0
# MQTT reason codes that retrying cannot fix (v3 CONNACK 4/5, v5 134/135).
_AUTH_FAILURES = {4, 5, 134, 135}
# A rank with at most this many peers (a client: only the aggregator) subscribes to their presence
# topics one by one; with more (the aggregator) to the wildcard. A client on the wildcard would be
# sent every other client's presence: N x N messages for N clients, a storm at a few hundred.
_PRESENCE_TOPICS_MAX = 8
# Publishes awaiting the broker's acknowledgement at once, each to a different peer (a peer's own
# messages go out one after another, in order).
_PUBLISHES_IN_FLIGHT = 32


def to_topic(run_id: str, rank: int) -> str:
    """The topic rank ``rank`` receives its control messages on."""
    return f"unitedllm/{run_id}/to/{rank}"


def presence_topic(run_id: str, rank: int | str) -> str:
    """The retained presence topic of ``rank`` (``"+"`` for every rank)."""
    return f"unitedllm/{run_id}/presence/{rank}"


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnect attempts: ``initial`` doubling up to ``maximum`` seconds."""

    initial: float = 0.5
    maximum: float = 10.0

    def delay(self, failures: int) -> float:
        """The pause after the ``failures``-th failed attempt in a row (1: ``initial``)."""
        return float(min(self.initial * 2 ** max(0, failures - 1), self.maximum))


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def refused_login(exc: BaseException) -> bool:
    """Whether an aiomqtt error carries a CONNACK refusing the login (v3 codes 4/5, v5 134/135).

    Only meaningful for a connection that never came up: paho's "not connected" is code 4 as well.
    """
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)  # paho gives an int or a ReasonCode object
    return isinstance(value, int) and value in _AUTH_FAILURES


class _Closing(Exception):
    """Raised inside the connection's task group to end it after a clean close."""


class _ConnectionDown(Exception):
    """One connection attempt failed or a connection dropped: tenacity tries again after a pause."""


class MqttTransport(Transport):
    """One rank's connection to the run's MQTT broker; sealed frames out, admitted messages in."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        rank: int,
        run_id: str,
        peers: set[int],
        keys: RankKeys | None = None,
        secret: bytes | None = None,
        connect_timeout_s: float = 30.0,
        flush_timeout_s: float = 10.0,
        retry_window_s: float = 120.0,
        backoff: Backoff = Backoff(),
    ):
        super().__init__(rank=rank, run_id=run_id)
        if keys is None:
            if secret is None:
                raise ValueError("MqttTransport needs keys or a secret")
            keys = RankKeys(shared=secret)
        self.settings = settings
        self.peers = set(peers) - {rank}
        self.keys = keys
        self.guard = MessageGuard(run_id=run_id, keys=keys, receiver=rank, valid_senders=self.peers)
        self.presence_guard = PresenceGuard(run_id=run_id, keys=keys, receiver=rank)
        self._epoch = 0  # this rank's current connection, as signed into its presence
        self.connect_timeout_s = connect_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.retry_window_s = retry_window_s
        self.backoff = backoff
        self.connections = 0  # successful connects so far; > 1 means it reconnected
        self._failures = 0  # failed connection attempts since the last successful connect
        self.repairs = 0  # times this rank put its presence back over something else
        self.delivered = 0  # messages the broker delivered to this rank (any topic)
        self._own_presence = b""  # the presence this rank last published
        self._repair = asyncio.Event()
        self._identifier = f"unitedllm-{run_id}-{rank}"
        self._outbox: dict[int, deque[bytes]] = {peer: deque() for peer in self.peers}
        self._queued: dict[int, None] = {}  # peers with queued messages, oldest first (an ordered set)
        self._reachable: set[int] = set()  # peers seen online on the current connection
        self._announced: dict[int, bool] = {}  # last presence handed to incoming()
        self._inbox: asyncio.Queue[Incoming | BaseException | None] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._down_since: float | None = None  # when the broker was last lost; None while connected

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            import aiomqtt  # noqa: F401 - fail early with the extra to install
        except ImportError:
            raise MissingDependency("aiomqtt", "mqtt-s3", "the MQTT_S3 backend") from None
        self._runner = asyncio.create_task(self._maintain(), name=f"unitedllm-mqtt-rank{self.rank}")
        connected = asyncio.create_task(self._connected.wait(), name="unitedllm-mqtt-first-connect")
        done, _ = await asyncio.wait(
            {self._runner, connected}, timeout=self.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if connected in done:
            return
        connected.cancel()
        if self._runner in done:
            self._runner.result()  # raises the fatal CommError
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        raise CommError(
            f"could not connect to the MQTT broker at {self.settings.address} within "
            f"{self.connect_timeout_s:g}s: {self._last_error or 'no answer'}"
        )

    async def _close(self) -> None:
        self._closing.set()
        if self._runner is not None and not self._runner.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), self.flush_timeout_s + 5)
            except TimeoutError:
                self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        left = sum(len(q) for q in self._outbox.values())
        if left:
            log.warning(
                "rank %d closed with %d unsent message(s) (their peers never came online)", self.rank, left
            )
        self._inbox.put_nowait(None)

    async def flush(self, timeout: float | None = None, *, reachable_only: bool = False) -> bool:
        """Wait until queued messages were published (``False`` if ``timeout`` passed first).

        With ``reachable_only``, messages for peers that are not online are not waited for.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while any(not reachable_only or peer in self._reachable for peer in self._queued):
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def is_online(self, rank: int) -> bool:
        """Whether ``rank`` was announced online on the current connection."""
        return rank in self._reachable

    # -- Transport ---------------------------------------------------------------------------

    async def _send(self, to: int, message: Message) -> None:
        if self._closed:
            raise CommError(f"rank {self.rank}: cannot send to rank {to}, the MQTT transport is closed")
        if to not in self._outbox:
            raise CommError(f"no rank {to} in this run (peers of rank {self.rank}: {sorted(self.peers)})")
        key = self.keys.link(self.rank, to)
        if key is None:
            raise CommError(f"rank {self.rank} holds no key to talk to rank {to}")
        self._outbox[to].append(seal(message, key))
        self._queued[to] = None
        self._wake.set()

    async def incoming(self) -> AsyncIterator[Incoming]:
        while True:
            item = await self._inbox.get()
            if item is None:
                self._inbox.put_nowait(None)  # let any other reader end too
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- the connection ----------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = _SESSION_EXPIRY_S
        self._epoch = max(time.time_ns(), self._epoch + 1)
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self._identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            # A fresh session on the first connect (forget a crashed predecessor's backlog), then resume it.
            clean_start=self.connections == 0,
            properties=properties,
            keepalive=s.keepalive,
            timeout=max(10.0, float(s.keepalive)),
            tls_context=s.ssl_context(),
            will=aiomqtt.Will(
                presence_topic(self.run_id, self.rank), self._presence(False), qos=1, retain=True
            ),
        )
        # aiomqtt warns from 10 unacknowledged publishes on; _pump_out keeps up to this many by design.
        client.pending_calls_threshold = _PUBLISHES_IN_FLIGHT + 8
        return client

    async def _maintain(self) -> None:
        """Keep one connection up until closed: connect, serve, and on loss reconnect with backoff.

        ``tenacity`` paces the attempts (``backoff``) and stops once the broker has been out of
        reach for ``retry_window_s`` after the first connection (before it, ``connect_timeout_s``
        decides); a refused login is not retried.
        """
        from tenacity import AsyncRetrying, retry_if_exception_type

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_ConnectionDown),
            # counted from the last successful connect: a drop hours later starts at ``initial`` again
            wait=lambda _state: self.backoff.delay(self._failures),
            stop=self._outage_outlasted_window,
            sleep=self._pause,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._connect_and_serve()
        except _ConnectionDown:
            error = CommError(
                f"rank {self.rank}: no connection to the MQTT broker at {self.settings.address} for "
                f"{self.retry_window_s:g}s ({self._last_error}); giving up (comm_args.retry_window_s)"
            )
            self._inbox.put_nowait(error)
            raise error from None

    def _outage_outlasted_window(self, state: RetryCallState) -> bool:
        """tenacity's stop: the broker was reached once and has now been out of reach too long."""
        down_since = self._down_since
        return (
            self._connected.is_set()
            and down_since is not None
            and time.monotonic() - down_since > self.retry_window_s
        )

    async def _pause(self, seconds: float) -> None:
        """tenacity's sleep between attempts, cut short by a close."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _connect_and_serve(self) -> None:
        """One connection: returns on a clean close, raises _ConnectionDown when it fails or drops."""
        import aiomqtt

        if self._closing.is_set():
            return
        connected = False
        try:
            async with self._client() as client:
                connected, self._down_since, self._failures = True, None, 0
                await self._serve(client)
        except Exception as raised:
            exc = _leaf(raised)
            if isinstance(exc, _Closing):
                return
            if not isinstance(exc, aiomqtt.MqttError | OSError):
                raise
            self._last_error = exc
            # Only a refused CONNECT is a login failure (paho's "not connected" is code 4 as well).
            if not connected and refused_login(exc):
                error = CommError(
                    f"the MQTT broker at {self.settings.address} refused the login of user "
                    f"{self.settings.username!r}: {exc} (check comm_args.mqtt.username/password or "
                    "UNITEDLLM_MQTT_USERNAME/UNITEDLLM_MQTT_PASSWORD)"
                )
                self._inbox.put_nowait(error)
                raise error from exc
            if self._connected.is_set():
                log.warning("rank %d lost the MQTT connection (%s); reconnecting", self.rank, exc)
            self._reachable.clear()
            self._failures += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
            raise _ConnectionDown from exc

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Subscribe, announce, then pump messages both ways until the connection drops or we close."""
        # Nothing legitimate is ever retained on a rank's inbox: drop whatever someone left there.
        await client.publish(to_topic(self.run_id, self.rank), b"", qos=1, retain=True)
        await client.subscribe(to_topic(self.run_id, self.rank), qos=1)
        for topic in self._presence_topics():
            await client.subscribe(topic, qos=1)
        await self._announce(client, True)
        self.connections += 1
        self._connected.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pump_out(client), name="unitedllm-mqtt-send")
            tg.create_task(self._pump_in(client), name="unitedllm-mqtt-receive")
            tg.create_task(self._repair_presence(client), name="unitedllm-mqtt-presence-repair")
            tg.create_task(self._watch_close(client), name="unitedllm-mqtt-close")

    def _presence_topics(self) -> list[str]:
        """The presence topics this rank follows: its peers' and its own (to repair it), or the wildcard."""
        if len(self.peers) > _PRESENCE_TOPICS_MAX:
            return [presence_topic(self.run_id, "+")]
        return [presence_topic(self.run_id, rank) for rank in sorted(self.peers | {self.rank})]

    async def _announce(self, client: aiomqtt.Client, online: bool) -> None:
        """Publish this rank's retained presence (and remember it, to spot anything else on its topic)."""
        self._own_presence = self._presence(online)
        await client.publish(
            presence_topic(self.run_id, self.rank), self._own_presence, qos=1, retain=True, timeout=10
        )

    async def _repair_presence(self, client: aiomqtt.Client) -> None:
        """Put this rank's presence back whenever something else (junk, a stale will) took its topic."""
        while True:
            await self._repair.wait()
            self._repair.clear()
            if self._closing.is_set():
                return
            log.warning("rank %d: its presence topic held something else; publishing it again", self.rank)
            self.repairs += 1
            await self._announce(client, True)
            await asyncio.sleep(_REPAIR_INTERVAL_S)

    async def _pump_out(self, client: aiomqtt.Client) -> None:
        """Publish queued frames in order, each peer's only while that peer is online.

        Only peers with queued messages are looked at, and up to ``_PUBLISHES_IN_FLIGHT`` peers'
        messages wait for the broker's acknowledgement at once (a round start to hundreds of
        clients is not hundreds of round trips one after another).
        """
        timeout = max(10.0, float(self.settings.keepalive))

        async def drain(peer: int) -> None:
            queue = self._outbox[peer]
            while queue and peer in self._reachable:
                await client.publish(to_topic(self.run_id, peer), queue[0], qos=1, timeout=timeout)
                queue.popleft()  # only once the broker acknowledged it: a lost one is re-sent
            if not queue:
                self._queued.pop(peer, None)

        while True:
            self._wake.clear()
            ready = [peer for peer in self._queued if peer in self._reachable]
            for start in range(0, len(ready), _PUBLISHES_IN_FLIGHT):
                async with asyncio.TaskGroup() as tg:
                    for peer in ready[start : start + _PUBLISHES_IN_FLIGHT]:
                        tg.create_task(drain(peer))
            if not self._wake.is_set():
                await self._wake.wait()

    async def _pump_in(self, client: aiomqtt.Client) -> None:
        """Hand admitted messages and presence changes to :meth:`incoming`."""
        mine = to_topic(self.run_id, self.rank)
        presence_prefix = presence_topic(self.run_id, "")
        async for received in client.messages:
            self.delivered += 1
            topic = received.topic.value
            payload = received.payload
            if not isinstance(payload, bytes | bytearray):
                log.warning("ignored a non-binary MQTT payload on %s", topic)
                continue
            if topic == mine:
                message = self.guard.admit(bytes(payload))
                if message is not None:
                    self._inbox.put_nowait(message)
            elif topic.startswith(presence_prefix):
                self._on_presence(topic[len(presence_prefix) :], bytes(payload))

    def _presence(self, online: bool) -> bytes:
        return seal_presence(
            self.keys,
            run_id=self.run_id,
            rank=self.rank,
            online=online,
            epoch=self._epoch,
            receivers=self.peers,
        )

    def _on_presence(self, rank_text: str, payload: bytes) -> None:
        try:
            rank = int(rank_text)
        except ValueError:
            return
        if rank == self.rank:
            if payload != self._own_presence and not self._closing.is_set():
                self._repair.set()
            return
        if rank not in self.peers:
            return
        online = self.presence_guard.admit(rank, payload)
        if online is None:
            return
        (self._reachable.add if online else self._reachable.discard)(rank)
        if online:
            self._wake.set()
        if self._announced.get(rank) != online:
            self._announced[rank] = online
            self._inbox.put_nowait(Presence(rank, online))

    async def _watch_close(self, client: aiomqtt.Client) -> None:
        """On close: give queued messages a bounded time to go out, say offline, end the connection."""
        await self._closing.wait()
        # A peer that is gone would only make closing wait the whole timeout.
        await self.flush(self.flush_timeout_s, reachable_only=True)
        await self._announce(client, False)
        raise _Closing
