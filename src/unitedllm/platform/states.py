"""FedML's state names for runs and devices, and how a run's state follows from its members' states."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FAILED",
    "FINISHED",
    "IDLE",
    "INITIALIZING",
    "KILLED",
    "OFFLINE",
    "QUEUED",
    "RUNNING",
    "STATES",
    "STOPPING",
    "TERMINAL",
    "run_state",
]

OFFLINE = "OFFLINE"
IDLE = "IDLE"
QUEUED = "QUEUED"
INITIALIZING = "INITIALIZING"
RUNNING = "RUNNING"
STOPPING = "STOPPING"
KILLED = "KILLED"
FAILED = "FAILED"
FINISHED = "FINISHED"
STATES = (OFFLINE, IDLE, QUEUED, INITIALIZING, RUNNING, STOPPING, KILLED, FAILED, FINISHED)
TERMINAL = frozenset({KILLED, FAILED, FINISHED})
# How far along a role is; a heartbeat's re-sync never moves a role back.
PROGRESS = {QUEUED: 0, INITIALIZING: 1, RUNNING: 2, STOPPING: 3, KILLED: 4, FAILED: 4, FINISHED: 4}
# What an agent may report about a role it runs.
REPORTABLE = frozenset({INITIALIZING, RUNNING, STOPPING, KILLED, FAILED, FINISHED})


def run_state(current: str, members: Sequence[tuple[int, str]]) -> str:
    """The run's state from ``(rank, state)`` of every member and whether a stop was asked for.

    The run is FINISHED when every role has ended and the aggregator (rank 0) finished; a client
    that failed does not end the run by itself (the aggregator's deadline and quorum rules apply).
    """
    if current in TERMINAL:
        return current
    states = dict(members)
    if all(state in TERMINAL for state in states.values()):
        if current == STOPPING:
            return KILLED
        return FINISHED if states.get(0) == FINISHED else FAILED
    if current == STOPPING:
        return STOPPING
    if any(state == RUNNING for state in states.values()):
        return RUNNING
    if any(state in (INITIALIZING, *TERMINAL) for state in states.values()):
        return INITIALIZING
    return QUEUED
