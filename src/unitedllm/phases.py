"""Where a round's time goes: seconds per phase, per rank, written with the round's events.

A client times its side of a round (from the round's start message to its update sent) in
:data:`CLIENT_PHASES`; the aggregator times its side (from sending the global model to the
round's resume point on disk) in :data:`AGGREGATOR_PHASES`. A client's phases travel to the
aggregator in its update's metrics under ``phase/<name>`` (:func:`to_metrics`), so the run's
``metrics.jsonl`` holds every rank's phases in its ``train`` events and the aggregator's in its
``round`` events (:mod:`unitedllm.tracking.events`).

The phases of one rank do not overlap, except the aggregator's fetching of the next update while
it folds the current one; time a rank spends in none of them (a client waiting for the next
round, the aggregator waiting for updates) is in none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

__all__ = [
    "AGGREGATOR_PHASES",
    "CLIENT_PHASES",
    "METRIC_PREFIX",
    "PhaseClock",
    "from_metrics",
    "shared_model_wait",
    "to_metrics",
]

#: A client's round: the global model's download, its decoding, the trainer's set-up (loading the
#: weights, building the round's Trainer), waiting for a model shared with other ranks in this
#: process (before training, evaluating or saving), local training, evaluations, encoding the
#: update, uploading it, and its checkpoints.
CLIENT_PHASES = (
    "fetch",
    "decode",
    "setup",
    "wait",
    "train",
    "evaluate",
    "encode",
    "upload",
    "checkpoint",
)
#: The aggregator's round: sending the global model, fetching and decoding updates, folding them,
#: finishing the round (the server step), waiting for a model shared with clients in this process,
#: evaluating the new global model, and its checkpoints (the round's model folder, the global
#: model's encoding and the resume point).
AGGREGATOR_PHASES = ("broadcast", "fetch", "decode", "fold", "finish", "wait", "evaluate", "checkpoint")
#: How a client's phases are named in its update's metrics: ``phase/fetch``, ...
METRIC_PREFIX = "phase/"


class PhaseClock:
    """Seconds spent in each of ``names`` (summed when a phase recurs), and the wall time since it was made.

    Blocks of the same phase that overlap (the aggregator fetching several updates at once, each in
    its own task on the event loop) count once: a phase's seconds are the wall time during which at
    least one of its blocks ran. ``waited`` (when given) reads a running total of seconds spent
    waiting for a shared model (:attr:`HFLocalTrainer.wait_seconds
    <unitedllm.training.hf.HFLocalTrainer.wait_seconds>`); what it grows by inside a phase is
    counted as ``wait`` instead.
    """

    def __init__(self, names: tuple[str, ...], *, waited: Callable[[], float] | None = None):
        self.names = names
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._waited = waited
        self._started = time.perf_counter()
        self._open: dict[str, tuple[int, float, float]] = {}  # name -> (blocks running, since, waited then)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (also when it raises), less any wait for a shared model in it."""
        running, since, waited = self._open.get(name, (0, time.perf_counter(), self.waited()))
        self._open[name] = (running + 1, since, waited)
        try:
            yield
        finally:
            running, since, waited = self._open.pop(name)
            if running > 1:
                self._open[name] = (running - 1, since, waited)
            else:
                elapsed = time.perf_counter() - since
                if self._waited is not None:
                    wait = min(max(0.0, self._waited() - waited), elapsed)
                    self.add("wait", wait)
                    elapsed -= wait
                self.add(name, elapsed)

    def waited(self) -> float:
        """The running total of seconds waited for a shared model (0 without one)."""
        return self._waited() if self._waited is not None else 0.0

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` (clamped at zero) to ``name``."""
        if name not in self.seconds:
            raise KeyError(f"unknown phase {name!r}; phases are {', '.join(self.names)}")
        self.seconds[name] += max(0.0, seconds)

    def wall(self) -> float:
        """Seconds since this clock was made."""
        return time.perf_counter() - self._started


def shared_model_wait(trainer: object) -> Callable[[], float] | None:
    """What reads ``trainer``'s running total of seconds waited for a shared model, if it keeps one."""
    if not isinstance(getattr(trainer, "wait_seconds", None), float):
        return None
    return lambda: float(getattr(trainer, "wait_seconds", 0.0))


def to_metrics(seconds: Mapping[str, float]) -> dict[str, float]:
    """``{"phase/<name>": seconds}``: a client's phases as update metrics."""
    return {f"{METRIC_PREFIX}{name}": value for name, value in seconds.items()}


def from_metrics(metrics: Mapping[str, object]) -> tuple[dict[str, float], dict[str, object]]:
    """An update's metrics split into its phases (by name) and the rest."""
    phases: dict[str, float] = {}
    rest: dict[str, object] = {}
    for key, value in metrics.items():
        if key.startswith(METRIC_PREFIX) and isinstance(value, int | float) and not isinstance(value, bool):
            phases[key.removeprefix(METRIC_PREFIX)] = float(value)
        else:
            rest[key] = value
    return phases, rest
