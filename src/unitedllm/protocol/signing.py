"""Sealing and opening control messages: msgpack body + HMAC-SHA256 with the run secret.

A sealed frame is ``msgpack([body, mac])``. :class:`MessageGuard` opens frames and drops
what must never reach the round loop: bad MACs, another run's messages, ranks outside the
run, and replays (a sequence number not above the last one seen from that sender).
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import msgspec

from unitedllm.errors import ProtocolError
from unitedllm.protocol.messages import Message

__all__ = ["MessageGuard", "PresenceGuard", "open_frame", "seal", "seal_presence"]

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])
_presence_decoder = msgspec.msgpack.Decoder(tuple[bool, int, bytes])
_message_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def seal(message: Message, secret: bytes) -> bytes:
    """Encode ``message`` and sign it with ``secret``."""
    body = _encoder.encode(message)
    return _encoder.encode((body, _mac(secret, body)))


def open_frame(frame: bytes, secret: bytes) -> Message:
    """Check a frame's MAC and decode its message; raise :class:`ProtocolError` when either fails."""
    try:
        body, mac = _frame_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame: {exc}") from exc
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise ProtocolError("bad signature (HMAC check failed)")
    try:
        return _message_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc


class MessageGuard:
    """Opens frames for one receiver and drops forged, foreign, out-of-run and replayed messages."""

    def __init__(self, *, run_id: str, secret: bytes, valid_senders: set[int]):
        self.run_id = run_id
        self.secret = secret
        self.valid_senders = valid_senders
        self._last_seq: dict[int, int] = {}
        self.dropped: list[str] = []

    def admit(self, frame: bytes) -> Message | None:
        """The message in ``frame`` if it passes every check, else ``None`` (the reason is logged)."""
        try:
            message = open_frame(frame, self.secret)
        except ProtocolError as exc:
            return self._drop(str(exc))
        if message.run_id != self.run_id:
            return self._drop(f"message for run {message.run_id!r}, this is run {self.run_id!r}")
        if message.sender not in self.valid_senders:
            return self._drop(f"sender rank {message.sender} is not in this run")
        last = self._last_seq.get(message.sender, -1)
        if message.seq <= last:
            return self._drop(
                f"replayed message from rank {message.sender} (seq {message.seq} <= last seen {last})"
            )
        self._last_seq[message.sender] = message.seq
        return message

    def forget(self, sender: int) -> None:
        """Reset replay tracking for ``sender`` (a restarted process starts its sequence anew)."""
        self._last_seq.pop(sender, None)

    def _drop(self, reason: str) -> Message | None:
        """Record and log why a frame was dropped; returns ``None`` (no message) for ``admit``."""
        self.dropped.append(reason)
        log.warning("dropped message: %s", reason)
        return None


def _presence_mac(secret: bytes, run_id: str, rank: int, online: bool, epoch: int) -> bytes:
    return _mac(secret, _encoder.encode(("presence", run_id, rank, online, epoch)))


def seal_presence(secret: bytes, *, run_id: str, rank: int, online: bool, epoch: int) -> bytes:
    """A signed presence payload: ``rank`` is ``online`` (or not) as of connection ``epoch``.

    ``epoch`` grows with every connection of a rank (nanoseconds since 1970 at connect), so an
    old ``offline`` replayed later cannot mark a live rank gone.
    """
    return _encoder.encode((online, epoch, _presence_mac(secret, run_id, rank, online, epoch)))


class PresenceGuard:
    """Checks presence payloads: the run's HMAC, and no going back to an older connection.

    Within one connection ``offline`` is final: a replayed ``online`` of a connection that
    already said ``offline`` is dropped too.
    """

    def __init__(self, *, run_id: str, secret: bytes):
        self.run_id = run_id
        self.secret = secret
        self._latest: dict[int, tuple[int, bool]] = {}  # rank -> (epoch, online)
        self.dropped: list[str] = []

    def admit(self, rank: int, payload: bytes) -> bool | None:
        """Whether ``rank`` is online per ``payload``, or ``None`` when the payload is dropped (logged)."""
        try:
            online, epoch, mac = _presence_decoder.decode(payload)
        except msgspec.DecodeError:
            return self._drop(f"malformed presence payload for rank {rank}")
        if not hmac.compare_digest(mac, _presence_mac(self.secret, self.run_id, rank, online, epoch)):
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
        log.warning("dropped presence: %s", reason)
        return None
