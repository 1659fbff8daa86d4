"""Logging of dropped frames that a flood cannot turn into a flood of log lines.

Every frame a guard drops is counted; the first ``burst`` of each window are logged one by one
with their reason, the rest of that window are summed up in one line when the next window begins
(or when :meth:`DropLog.flush` is called): an attacker or a broken peer sending junk as fast as
the broker allows leaves a few lines a minute, and the reasons still show.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["DropLog"]


class DropLog:
    """Logs ``dropped <what>: <reason>`` at most ``burst`` times per ``window`` seconds, then a summary."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        burst: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what
        self.logger = logger
        self.burst = burst
        self.window = window
        self._clock = clock
        self._window_start: float | None = None
        self._logged = 0
        self._suppressed = 0
        self._last_reason = ""
        self.total = 0

    def __call__(self, reason: str) -> None:
        now = self._clock()
        if self._window_start is None or now - self._window_start >= self.window:
            self.flush()
            self._window_start, self._logged = now, 0
        self.total += 1
        if self._logged < self.burst:
            self._logged += 1
            self.logger.warning("dropped %s: %s", self.what, reason)
        else:
            self._suppressed += 1
            self._last_reason = reason

    def flush(self) -> None:
        """Log how many drops of the current window were not logged one by one (if any)."""
        if self._suppressed:
            self.logger.warning(
                "dropped %d more %s frame(s) in the last %.0f s, not logged one by one (the last: %s)",
                self._suppressed,
                self.what,
                self.window,
                self._last_reason,
            )
            self._suppressed = 0
