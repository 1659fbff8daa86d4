"""The base of every tracker: a metrics listener that never lets a tracker failure stop a run."""

from __future__ import annotations

import abc
import logging
import threading
from types import TracebackType
from typing import Any, Self

from unitedllm.tracking.scalars import Scalar, rank_prefix, scalars_of

__all__ = ["TrackerSink", "flat_key"]

log = logging.getLogger(__name__)


def flat_key(scalar: Scalar) -> str:
    """The key of a scalar in a single-namespace tracker (W&B, MLflow): client metrics under ``client_<r>/``."""
    if scalar.rank == 0:
        return scalar.tag
    if scalar.tag.startswith("system/"):
        # Keep every system metric under system/ so one step axis (the sample index) covers them all.
        return f"system/{rank_prefix(scalar.rank)}/{scalar.tag.removeprefix('system/')}"
    return f"{rank_prefix(scalar.rank)}/{scalar.tag}"


class TrackerSink(abc.ABC):
    """A ``MetricsLog`` listener that writes each event's scalars to one tracking backend."""

    name: str = "tracker"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed = False
        self._closed = False

    def __call__(self, record: dict[str, Any]) -> None:
        scalars = scalars_of(record)
        if not scalars or self._closed:
            return
        with self._lock:
            try:
                self.write(scalars)
            # A tracker (disk full, W&B service gone) must never fail a federated round: warn once, go on.
            except Exception as exc:  # noqa: BLE001
                if not self._failed:
                    log.warning(
                        "%s: could not record metrics (%s); the run goes on without it", self.name, exc
                    )
                self._failed = True

    @abc.abstractmethod
    def write(self, scalars: list[Scalar]) -> None:
        """Record the scalars of one event."""

    def finish(self, *, failed: bool) -> None:
        """Flush and close the backend; ``failed`` says whether the run ended with an error."""

    def close(self, *, failed: bool = False) -> None:
        """Finish once; closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.finish(failed=failed)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)
