"""Turns metric events into named scalars (``train/loss``, ``time/comm_s``...) that every tracker logs.

One mapping shared by TensorBoard, Weights & Biases and MLflow, so the three show the same
numbers under the same names. A scalar belongs to a *rank* (0 = aggregator, the whole
federation; 1..N = one client) and a *step*: the round for round-scoped events, the sample
index for ``system`` events (which have no round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Scalar", "rank_prefix", "scalars_of"]


@dataclass(frozen=True)
class Scalar:
    """One named number of one rank at one step."""

    tag: str
    value: float
    step: int
    rank: int
    wall_time: float | None = None


def rank_prefix(rank: int) -> str:
    """The name a rank goes by in trackers: ``server`` for the aggregator, ``client_<r>`` otherwise."""
    return "server" if rank == 0 else f"client_{rank}"


def _number(value: Any) -> float | None:
    # bools are ints in Python but never a metric here; NaN/inf are dropped (trackers choke on them).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _train(record: dict[str, Any]) -> dict[str, float | None]:
    m = record.get("metrics") or {}
    comm = [_number(m.get("download_seconds")), _number(m.get("upload_seconds"))]
    known = [c for c in comm if c is not None]
    return {
        "train/loss": _number(record.get("loss", m.get("train_loss"))),
        "train/samples": _number(record.get("samples", m.get("train_samples"))),
        "train/tokens_per_second": _number(m.get("tokens_per_second")),
        "time/train_s": _number(m.get("train_seconds", record.get("seconds"))),
        "time/comm_s": sum(known) if known else None,
        "time/download_s": comm[0],
        "time/upload_s": comm[1],
        # What the client sent is what the aggregator received (the update); the client received the global model.
        "comm/bytes_sent": _number(m.get("bytes_sent", record.get("bytes_received"))),
        "comm/bytes_received": _number(m.get("bytes_received")),
        **_phases(record),
    }


def _phases(record: dict[str, Any]) -> dict[str, float | None]:
    """``phase/<name>_s``: where the writer's round went (``phases`` on ``train`` and ``round`` events)."""
    phases = record.get("phases")
    return {f"phase/{name}_s": _number(v) for name, v in phases.items()} if isinstance(phases, dict) else {}


def _eval(record: dict[str, Any]) -> dict[str, float | None]:
    m = record.get("metrics") or {}
    prefix = "eval_local" if record.get("model") == "local" else "eval"
    out: dict[str, float | None] = {
        f"{prefix}/loss": _number(record.get("loss", m.get("eval_loss"))),
        f"{prefix}/perplexity": _number(m.get("perplexity")),
        f"{prefix}/samples": _number(record.get("samples")),
    }
    for category, loss in (record.get("per_category") or {}).items():
        out[f"{prefix}_category/{category}"] = _number(loss)
    return out


def _round(record: dict[str, Any]) -> dict[str, float | None]:
    return {
        "round/train_loss": _number(record.get("train_loss")),
        "round/eval_loss": _number(record.get("eval_loss")),
        "round/aggregated": float(len(record.get("aggregated") or [])),
        "round/rejected": float(len(record.get("rejected") or {})),
        "time/round_s": _number(record.get("seconds")),
        "time/aggregation_s": _number(record.get("aggregation_seconds")),
        **_phases(record),
    }


def _system(record: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in record.items():
        if key.startswith(("cpu_", "ram_", "process_", "gpu")):
            out[f"system/{key}"] = _number(value)
    return out


_MAPPERS = {"train": _train, "eval": _eval, "round": _round, "system": _system}


def scalars_of(record: dict[str, Any]) -> list[Scalar]:
    """The scalars a metric event carries (none for events without numbers, e.g. ``client_joined``)."""
    mapper = _MAPPERS.get(str(record.get("event")))
    if mapper is None:
        return []
    step = record.get("sample") if record.get("event") == "system" else record.get("round")
    if not isinstance(step, int) or isinstance(step, bool):
        return []
    rank = record.get("rank")
    rank = rank if isinstance(rank, int) else 0
    wall_time = _number(record.get("time"))
    return [
        Scalar(tag, value, step, rank, wall_time)
        for tag, value in mapper(record).items()
        if value is not None
    ]
