"""Logins: API tokens (``admin`` or ``read``) and one-time enrol tokens, stored only as sha256 hashes."""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["ADMIN", "READ", "ROLES", "hash_token", "new_token"]

ADMIN = "admin"
READ = "read"
ROLES = (ADMIN, READ)


def new_token(prefix: str) -> str:
    """A fresh token with 256 bits of randomness; the prefix says what it is for (``ulp_``, ``ule_``)."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens are long and random, so a plain sha256 is enough (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()
