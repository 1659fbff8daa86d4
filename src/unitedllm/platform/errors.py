"""Errors of the MLOps platform (controller, agent, CLI), under :class:`unitedllm.errors.UnitedLLMError`.

::

    PlatformError             the controller refused a request or could not be reached
    ├── CommandRefused        an agent refused a command (unsigned, forged, replayed, expired, not for it)
    └── PackageRefused        a package failed the platform's checks (manifest, signature, digest)
"""

from __future__ import annotations

from unitedllm.errors import UnitedLLMError

__all__ = ["CommandRefused", "PackageRefused", "PlatformError"]


class PlatformError(UnitedLLMError):
    """The controller refused a request, or could not be reached; ``status`` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class CommandRefused(PlatformError):
    """An agent refused a command; ``reason`` says why (unsigned, bad signature, replayed, expired, ...)."""

    def __init__(self, reason: str):
        super().__init__(f"command refused: {reason}")
        self.reason = reason


class PackageRefused(PlatformError):
    """A package failed the platform's checks before it was stored or run."""
