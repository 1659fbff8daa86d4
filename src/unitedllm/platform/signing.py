"""Ed25519 signatures for the platform: its own key pair, device keys, signed commands and requests.

The controller signs every package digest it stores and every command it sends; each agent signs
every request it makes with the key pair it created before enrolling. Signed bytes are always a
canonical JSON encoding (sorted keys, no spaces), so both sides sign exactly the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from unitedllm.platform.errors import CommandRefused

__all__ = [
    "KeyPair",
    "canonical",
    "open_command",
    "public_key_from_text",
    "request_message",
    "seal_command",
    "verify",
]

# How far a signed request's clock may be from the controller's (replay window for requests).
REQUEST_SKEW_S = 120.0


def canonical(value: Any) -> bytes:
    """The one byte encoding that is signed: JSON with sorted keys and no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyPair:
    """An Ed25519 key pair kept in a file readable only by its owner (created on first use)."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[KeyPair, bool]:
        """The key pair in ``path``, creating it (mode 0600) when missing; returns (pair, created)."""
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
            return cls(key), False
        pair = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = pair._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return pair, True

    @property
    def public_text(self) -> str:
        """The public key as URL-safe base64 of its 32 raw bytes (what the other side stores)."""
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return _b64(raw)

    @property
    def fingerprint(self) -> str:
        """A short sha256 fingerprint of the public key, for people to compare."""
        return fingerprint(self.public_text)

    def sign(self, data: bytes) -> str:
        return _b64(self._private.sign(data))


def fingerprint(public_text: str) -> str:
    return hashlib.sha256(_unb64(public_text)).hexdigest()[:16]


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = _unb64(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"not an Ed25519 public key: {text[:16]!r}...") from exc


def verify(public_text: str, data: bytes, signature: str) -> bool:
    """Whether ``signature`` is a valid signature of ``data`` under the public key ``public_text``."""
    try:
        public_key_from_text(public_text).verify(_unb64(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def package_statement(digest: str) -> bytes:
    """What the platform signs for a stored package: its zip's sha256."""
    return canonical({"kind": "unitedllm-package", "sha256": digest})


# -- commands (controller -> agent) -------------------------------------------------------------


def seal_command(platform: KeyPair, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A command as sent: the payload and the platform's signature over its canonical bytes."""
    return {"payload": dict(payload), "signature": platform.sign(canonical(payload))}


def open_command(
    envelope: Mapping[str, Any], *, platform_public: str, device_id: str, now: float | None = None
) -> dict[str, Any]:
    """The payload of a signed command after every check; raises CommandRefused naming the failure.

    Replay (a nonce seen before) is checked by the caller, which keeps the nonces.
    """
    payload = envelope.get("payload")
    signature = envelope.get("signature")
    if not isinstance(payload, dict) or not isinstance(signature, str) or not signature:
        raise CommandRefused("unsigned (no payload and signature)")
    if not verify(platform_public, canonical(payload), signature):
        raise CommandRefused("signature does not match the platform's key")
    if payload.get("device_id") != device_id:
        raise CommandRefused(f"addressed to device {payload.get('device_id')!r}, this is {device_id!r}")
    expires = payload.get("expires_at")
    if not isinstance(expires, int | float):
        raise CommandRefused("no expiry")
    if (now if now is not None else time.time()) > expires:
        raise CommandRefused(f"expired at {expires:.0f}")
    if not isinstance(payload.get("nonce"), str) or not payload["nonce"]:
        raise CommandRefused("no nonce")
    return payload


# -- requests (agent -> controller) -------------------------------------------------------------


def request_message(method: str, path: str, timestamp: str, body: bytes) -> bytes:
    """What an agent signs for one HTTP request: method, path, its clock and the body's sha256."""
    return "\n".join([method.upper(), path, timestamp, hashlib.sha256(body).hexdigest()]).encode()
