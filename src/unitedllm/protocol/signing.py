"""Sealing and opening control messages and presence: msgpack + HMAC-SHA256 with the link's key.

Keys are per client rank (:class:`RankKeys`): everything said between the aggregator (rank 0)
and client ``r`` is signed with rank ``r``'s key, in both directions. The aggregator holds every
client's key, a client only its own, so a client cannot speak as another rank. A run with only
the shared run secret uses that one key for every link (and so trusts every client with every
rank). See ``docs/protocol.md`` for the threat model.

A sealed frame is ``msgpack([body, mac])``. :class:`MessageGuard` opens frames and drops what
must never reach the round loop: bad MACs, another run's messages, ranks outside the run,
replays (a sequence number not above the last one seen from that sender) and sequence numbers
too far ahead of the receiver's clock (one forged frame must not silence a rank for good).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping

import msgspec

from unitedllm.errors import ProtocolError
from unitedllm.protocol.drop_log import DropLog
from unitedllm.protocol.messages import Message

__all__ = [
    "SEQ_AHEAD_LIMIT_NS",
    "MessageGuard",
    "PresenceGuard",
    "RankKeys",
    "open_frame",
    "seal",
    "seal_presence",
]

log = logging.getLogger(__name__)

SERVER_RANK = 0
# Sequence numbers follow the sender's wall clock (ns); one further ahead of the receiver's clock
# than this is refused, so a forged frame can hold a rank's replay guard at most this long.
SEQ_AHEAD_LIMIT_NS = 120 * 1_000_000_000

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])
_presence_decoder = msgspec.msgpack.Decoder(tuple[bool, int, dict[int, bytes]])
_message_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class _Sender(msgspec.Struct):
    """Just enough of a message body to pick the key it must be signed with."""

    sender: int


_sender_decoder = msgspec.msgpack.Decoder(_Sender)


class RankKeys:
    """The HMAC keys one process holds: client rank -> key, and optionally one key for every rank.

    The link between the aggregator and client ``r`` (either direction) is signed with ``r``'s key.
    """

    def __init__(self, keys: Mapping[int, bytes] | None = None, *, shared: bytes | None = None):
        self._keys = dict(keys or {})
        self.shared = shared

    @classmethod
    def of(cls, secret: bytes | RankKeys) -> RankKeys:
        """``secret`` as keys: a bare run secret signs every link."""
        return secret if isinstance(secret, RankKeys) else cls(shared=secret)

    def link(self, a: int, b: int) -> bytes | None:
        """The key of the link between ranks ``a`` and ``b`` (one of them the aggregator), if held."""
        client = b if a == SERVER_RANK else a
        return self._keys.get(client, self.shared)

    def ranks(self) -> set[int]:
        """The client ranks with a key of their own."""
        return set(self._keys)


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def seal(message: Message, secret: bytes) -> bytes:
    """Encode ``message`` and sign it with ``secret`` (the key of the link it travels on)."""
    body = _encoder.encode(message)
    return _encoder.encode((body, _mac(secret, body)))


def _split(frame: bytes) -> tuple[bytes, bytes]:
    try:
        return _frame_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame: {exc}") from exc


def _check(body: bytes, mac: bytes, secret: bytes) -> Message:
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise ProtocolError("bad signature (HMAC check failed)")
    try:
        return _message_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc


def open_frame(frame: bytes, secret: bytes) -> Message:
    """Check a frame's MAC and decode its message; raise :class:`ProtocolError` when either fails."""
    body, mac = _split(frame)
    return _check(body, mac, secret)


class MessageGuard:
    """Opens frames for rank ``receiver`` and drops forged, foreign, out-of-run, replayed and far-future ones."""

    def __init__(
        self,
        *,
        run_id: str,
        valid_senders: set[int],
        secret: bytes | RankKeys | None = None,
        keys: RankKeys | None = None,
        receiver: int = SERVER_RANK,
        clock_ns: Callable[[], int] = time.time_ns,
    ):
        if keys is None and secret is None:
            raise ValueError("MessageGuard needs keys or a secret")
        self.run_id = run_id
        self.keys = keys if keys is not None else RankKeys.of(secret)  # type: ignore[arg-type]
        self.receiver = receiver
        self.valid_senders = valid_senders
        self._clock_ns = clock_ns
        self._last_seq: dict[int, int] = {}
        self.dropped: list[str] = []
        self._drop_log = DropLog("message", log)

    def admit(self, frame: bytes) -> Message | None:
        """The message in ``frame`` if it passes every check, else ``None`` (the reason is logged)."""
        try:
            body, mac = _split(frame)
            sender = _sender_decoder.decode(body).sender
        except ProtocolError as exc:
            return self._drop(str(exc))
        except msgspec.DecodeError as exc:
            return self._drop(f"malformed message: {exc}")
        if sender not in self.valid_senders:
            return self._drop(f"sender rank {sender} is not in this run")
        key = self.keys.link(sender, self.receiver)
        if key is None:
            return self._drop(f"no key for rank {sender} (bad signature: cannot check its HMAC)")
        try:
            message = _check(body, mac, key)
        except ProtocolError as exc:
            return self._drop(str(exc))
        if message.run_id != self.run_id:
            return self._drop(f"message for run {message.run_id!r}, this is run {self.run_id!r}")
        limit = self._clock_ns() + SEQ_AHEAD_LIMIT_NS
        if message.seq > limit:
            return self._drop(
                f"message from rank {sender} with seq {message.seq}, more than "
                f"{SEQ_AHEAD_LIMIT_NS // 1_000_000_000}s ahead of this clock"
            )
        last = self._last_seq.get(sender, -1)
        if message.seq <= last:
            return self._drop(f"replayed message from rank {sender} (seq {message.seq} <= last seen {last})")
        self._last_seq[sender] = message.seq
        return message

    def forget(self, sender: int) -> None:
        """Reset replay tracking for ``sender`` (a restarted process starts its sequence anew)."""
        self._last_seq.pop(sender, None)

    def _drop(self, reason: str) -> Message | None:
        """Record and log why a frame was dropped; returns ``None`` (no message) for ``admit``."""
        self.dropped.append(reason)
        del self.dropped[:-1000]  # a flood of junk must not grow memory without bound
        self._drop_log(reason)
        return None


def _presence_mac(secret: bytes, run_id: str, rank: int, to: int, online: bool, epoch: int) -> bytes:
    return _mac(secret, _encoder.encode(("presence", run_id, rank, to, online, epoch)))


def seal_presence(
    secret: bytes | RankKeys,
    *,
    run_id: str,
    rank: int,
    online: bool,
    epoch: int,
    receivers: set[int] | None = None,
) -> bytes:
    """A signed presence payload: ``rank`` is ``online`` (or not) as of connection ``epoch``.

    It carries one MAC per receiving rank, each with the key of the link to that rank, so a
    client holding only its own key can check the aggregator's presence. ``receivers`` defaults
    to the aggregator (a client's presence). ``epoch`` grows with every connection of a rank
    (nanoseconds since 1970 at connect), so an old ``offline`` replayed later cannot mark a live
    rank gone.
    """
    keys = RankKeys.of(secret)
    macs: dict[int, bytes] = {}
    for to in sorted(receivers if receivers is not None else {SERVER_RANK}):
        key = keys.link(rank, to)
        if key is not None:
            macs[to] = _presence_mac(key, run_id, rank, to, online, epoch)
    return _encoder.encode((online, epoch, macs))


class PresenceGuard:
    """Checks presence payloads for rank ``receiver``: the link's HMAC, and no going back to an older connection.

    Within one connection ``offline`` is final: a replayed ``online`` of a connection that
    already said ``offline`` is dropped too.
    """

    def __init__(
        self,
        *,
        run_id: str,
        secret: bytes | RankKeys | None = None,
        keys: RankKeys | None = None,
        receiver: int = SERVER_RANK,
    ):
        if keys is None and secret is None:
            raise ValueError("PresenceGuard needs keys or a secret")
        self.run_id = run_id
        self.keys = keys if keys is not None else RankKeys.of(secret)  # type: ignore[arg-type]
        self.receiver = receiver
        self._latest: dict[int, tuple[int, bool]] = {}  # rank -> (epoch, online)
        self.dropped: list[str] = []
        self._drop_log = DropLog("presence", log)

    def admit(self, rank: int, payload: bytes) -> bool | None:
        """Whether ``rank`` is online per ``payload``, or ``None`` when the payload is dropped (logged)."""
        try:
            online, epoch, macs = _presence_decoder.decode(payload)
        except msgspec.DecodeError:
            return self._drop(f"malformed presence payload for rank {rank}")
        key = self.keys.link(rank, self.receiver)
        mac = macs.get(self.receiver)
        if key is None or mac is None:
            return self._drop(f"presence of rank {rank} with a bad signature (no MAC this rank can check)")
        if not hmac.compare_digest(mac, _presence_mac(key, self.run_id, rank, self.receiver, online, epoch)):
            return self._drop(f"presence of rank {rank} with a bad signature (HMAC check failed)")
        latest = self._latest.get(rank)
        if latest is not None:
            last_epoch, last_online = latest
            if epoch < last_epoch or (epoch == last_epoch and online and not last_online):
                return self._drop(
                    f"replayed presence of rank {rank} (connection {epoch}, latest {last_epoch})"
                )
        self._latest[rank] = (epoch, online)
        return online

    def _drop(self, reason: str) -> bool | None:
        """Record and log why a presence payload was dropped; returns ``None`` for ``admit``."""
        self.dropped.append(reason)
        del self.dropped[:-1000]
        self._drop_log(reason)
        return None
