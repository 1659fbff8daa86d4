"""Reads a run's ``metrics.jsonl`` into per-round, per-client and evaluation tables for reports.

Works on a finished run and on one still writing: a torn last line is skipped (and counted),
rounds that have started but not ended are marked running, missing rounds are simply absent.
Lines are decoded as the typed events of :mod:`unitedllm.tracking.events`; each table field is
read from the one event field that holds it, and stays empty where the run did not record it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from unitedllm.phases import CLIENT_PHASES
from unitedllm.run_layout import RunLayout
from unitedllm.tracking.errors import RunNotFound
from unitedllm.tracking.events import (
    ClientErrorEvent,
    ClientJoinedEvent,
    EvalEvent,
    MetricEvent,
    RoundEvent,
    RoundStartEvent,
    RunEndEvent,
    SystemEvent,
    TrainEvent,
    WarningEvent,
    decode_event,
)

__all__ = ["ClientRound", "EvalPoint", "RoundRow", "RunData", "load_run", "metrics_path", "stack_parts"]

#: The parts a round's time is stacked from when its phases were recorded: the slowest client's
#: phases (``client <phase>``), then the aggregator's own, then what no phase holds (``other``).
#: The aggregator's fetch, decode and fold are one part; most of them overlap the clients' training.
_AGGREGATOR_PARTS = {
    "broadcast": ("broadcast",),
    "fold": ("fetch", "decode", "fold"),
    "finish": ("finish",),
    "wait": ("wait",),
    "evaluate": ("evaluate",),
    "checkpoint": ("checkpoint",),
}


def stack_parts() -> list[str]:
    """The names of a round's stacked parts when phases were recorded, in stacking order."""
    return [
        *(f"client {p}" for p in CLIENT_PHASES),
        *(f"aggregator {p}" for p in _AGGREGATOR_PARTS),
        "other",
    ]


def _phases(value: Any) -> dict[str, float]:
    """The recorded phases of an event (seconds by name), empty when there were none."""
    if value is None:
        return {}
    recorded = msgspec.structs.asdict(value)
    return {name: float(v) for name, v in recorded.items() if _num(v) is not None}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class RoundRow:
    """What the aggregator recorded about one round."""

    round: int
    selected: list[int] = field(default_factory=list)
    aggregated: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    eval_loss: float | None = None
    seconds: float | None = None
    aggregation_seconds: float | None = None
    #: The aggregator's seconds per phase (:data:`~unitedllm.phases.AGGREGATOR_PHASES`), if recorded.
    phases: dict[str, float] = field(default_factory=dict)
    finished: bool = False


@dataclass
class ClientRound:
    """One client's local round as the aggregator received it."""

    round: int
    rank: int
    train_loss: float | None = None
    samples: float | None = None
    train_seconds: float | None = None
    comm_seconds: float | None = None
    bytes_sent: float | None = None
    bytes_received: float | None = None
    tokens_per_second: float | None = None
    #: The client's seconds per phase (:data:`~unitedllm.phases.CLIENT_PHASES`), if recorded.
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalPoint:
    """An evaluation: of the global model after ``round`` (by the aggregator or a client) or a client's own."""

    round: int
    rank: int
    model: str
    loss: float | None
    perplexity: float | None
    samples: float | None = None


@dataclass
class RunData:
    """Everything a report shows about one run."""

    run_dir: Path
    rounds: dict[int, RoundRow] = field(default_factory=dict)
    clients: dict[tuple[int, int], ClientRound] = field(default_factory=dict)
    evals: list[EvalPoint] = field(default_factory=list)
    system: list[dict[str, Any]] = field(default_factory=list)
    joined: set[int] = field(default_factory=set)
    client_errors: list[tuple[int | None, int, str]] = field(default_factory=list)
    #: (round, kind, message) of each ``warning`` event, e.g. a sharp rise of the global eval loss.
    warnings: list[tuple[int | None, str, str]] = field(default_factory=list)
    finished: bool = False
    skipped_lines: int = 0
    first_time: float | None = None
    last_time: float | None = None

    @property
    def run_id(self) -> str:
        """The run's folder name; ``<run>/node_<rank>`` for a client's own records."""
        folder = self.run_dir.resolve()
        return f"{folder.parent.name}/{folder.name}" if folder.name.startswith("node_") else folder.name

    @property
    def ranks(self) -> list[int]:
        """Every client rank seen in the run."""
        seen = (
            set(self.joined) | {rank for _, rank in self.clients} | {e.rank for e in self.evals if e.rank > 0}
        )
        for row in self.rounds.values():
            seen |= set(row.selected)
        return sorted(seen)

    def finished_rounds(self) -> list[RoundRow]:
        return [self.rounds[r] for r in sorted(self.rounds) if self.rounds[r].finished]

    def client_rounds(self, round_idx: int) -> list[ClientRound]:
        return [c for (r, _), c in sorted(self.clients.items()) if r == round_idx]

    def slowest_client(self, round_idx: int) -> ClientRound | None:
        """The client whose recorded phases took longest in a round (None when none recorded phases)."""
        timed = [c for c in self.client_rounds(round_idx) if c.phases]
        return max(timed, key=lambda c: sum(c.phases.values()), default=None)

    def phase_breakdown(self, row: RoundRow) -> dict[str, float] | None:
        """A round's wall time as :func:`stack_parts`: the slowest client's phases, the aggregator's, the rest.

        None when the run did not record phases (written by an older UnitedLLM).
        """
        slowest = self.slowest_client(row.round)
        if slowest is None or not row.phases:
            return None
        parts = {f"client {p}": slowest.phases.get(p, 0.0) for p in CLIENT_PHASES}
        for part, names in _AGGREGATOR_PARTS.items():
            parts[f"aggregator {part}"] = sum(row.phases.get(n, 0.0) for n in names)
        parts["other"] = max(0.0, (row.seconds or 0.0) - sum(parts.values()))
        return parts

    def time_breakdown(self, row: RoundRow) -> dict[str, float]:
        """Seconds of a round on its critical path: the slowest client's train and comm, aggregation, rest."""
        clients = self.client_rounds(row.round)
        slowest = max(clients, key=lambda c: (c.train_seconds or 0.0) + (c.comm_seconds or 0.0), default=None)
        train = (slowest.train_seconds or 0.0) if slowest else 0.0
        comm = (slowest.comm_seconds or 0.0) if slowest else 0.0
        aggregation = row.aggregation_seconds or 0.0
        other = max(0.0, (row.seconds or 0.0) - train - comm - aggregation)
        return {"train": train, "communication": comm, "aggregation": aggregation, "other": other}

    def global_eval(self, round_idx: int) -> tuple[float | None, float | None]:
        """Loss and perplexity of the global model after a round: the aggregator's, else the clients' mean."""
        points = [
            e for e in self.evals if e.round == round_idx and e.model == "global" and e.loss is not None
        ]
        own = [e for e in points if e.rank == 0]
        if own:
            return own[-1].loss, own[-1].perplexity
        if not points:
            return None, None
        weights = [e.samples or 1.0 for e in points]
        loss = sum(w * (e.loss or 0.0) for w, e in zip(weights, points, strict=True)) / sum(weights)
        # Perplexity only where the trainer reports one (a token-level LM loss); exp(MSE) would mean nothing.
        has_perplexity = all(e.perplexity is not None for e in points)
        return loss, math.exp(min(loss, 50.0)) if has_perplexity else None

    def round_bytes(self, round_idx: int) -> tuple[float, float]:
        """Bytes uploaded by clients (updates) and downloaded by them (the global model) in a round."""
        clients = self.client_rounds(round_idx)
        return (sum(c.bytes_sent or 0.0 for c in clients), sum(c.bytes_received or 0.0 for c in clients))


def metrics_path(run_dir: Path) -> Path:
    """The ``metrics.jsonl`` of a run directory (or the file itself), or :class:`RunNotFound`."""
    if run_dir.is_file() and run_dir.name.endswith(".jsonl"):
        return run_dir
    if not run_dir.exists():
        raise RunNotFound(str(run_dir), "the directory does not exist")
    if not run_dir.is_dir():
        raise RunNotFound(str(run_dir), "it is not a directory")
    path = RunLayout(run_dir).metrics()
    if not path.is_file():
        raise RunNotFound(
            str(run_dir),
            "it has no metrics.jsonl (give the run's train_args.output_dir, e.g. .logs/UnitedLLM/<run_id>)",
        )
    return path


def load_run(run_dir: Path) -> RunData:
    """Parse a run directory's metrics; raises :class:`RunNotFound` when there is none."""
    path = metrics_path(run_dir)
    data = RunData(run_dir=path.parent)
    with path.open("rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                event = decode_event(line)
            except msgspec.DecodeError:
                data.skipped_lines += 1  # a torn last line while the run writes, or a damaged file
                continue
            if event is not None:  # None: an event this version does not know
                _add(data, event, line)
    if not data.rounds:
        _rounds_from_clients(data)
    return data


def _rounds_from_clients(data: RunData) -> None:
    """A client's own ``node_<rank>/metrics.jsonl`` has no aggregator rounds: one row per round it trained."""
    for (round_idx, rank), trained in sorted(data.clients.items()):
        row = data.rounds.setdefault(round_idx, RoundRow(round_idx, finished=True))
        row.selected.append(rank)
        row.aggregated.append(rank)
        row.train_loss = trained.train_loss
        row.seconds = (trained.train_seconds or 0.0) + (trained.comm_seconds or 0.0)
        row.eval_loss = data.global_eval(round_idx)[0]


def _add(data: RunData, event: MetricEvent, line: bytes) -> None:
    when = event.time
    if when is not None and math.isfinite(when):
        data.first_time = when if data.first_time is None else min(data.first_time, when)
        data.last_time = when if data.last_time is None else max(data.last_time, when)
    round_idx, rank = event.round, event.rank
    match event:
        case ClientJoinedEvent():
            data.joined.add(rank)
        case RunEndEvent():
            data.finished = True
        case ClientErrorEvent(message=message):
            data.client_errors.append((round_idx, rank, message))
        case WarningEvent(kind=kind, message=message):
            data.warnings.append((round_idx, kind, message or kind))
        case SystemEvent():
            data.system.append(msgspec.json.decode(line))  # with the per-GPU readings the Struct leaves out
        case RoundStartEvent(selected=selected) if round_idx is not None:
            data.rounds.setdefault(round_idx, RoundRow(round_idx)).selected = list(selected)
        case RoundEvent() if round_idx is not None:
            row = data.rounds.setdefault(round_idx, RoundRow(round_idx))
            row.selected = list(event.selected) or row.selected
            row.aggregated = list(event.aggregated)
            row.rejected = {str(k): v for k, v in event.rejected.items()}
            row.train_loss = _num(event.train_loss)
            row.eval_loss = _num(event.eval_loss)
            row.seconds = _num(event.seconds)
            row.aggregation_seconds = _num(event.aggregation_seconds)
            row.phases = _phases(event.phases)
            row.finished = True
        case TrainEvent() if round_idx is not None:
            m = event.metrics
            comm = [_num(m.get("download_seconds")), _num(m.get("upload_seconds"))]
            known = [c for c in comm if c is not None]
            data.clients[(round_idx, rank)] = ClientRound(
                round=round_idx,
                rank=rank,
                train_loss=_num(event.loss),
                samples=_num(event.samples),
                train_seconds=_num(event.seconds),
                comm_seconds=sum(known) if known else None,
                # The client's own upload and download, as it measured them (both views write them in metrics).
                bytes_sent=_num(m.get("bytes_sent")),
                bytes_received=_num(m.get("bytes_received")),
                tokens_per_second=_num(m.get("tokens_per_second")),
                phases=_phases(event.phases),
            )
        case EvalEvent() if round_idx is not None:
            data.evals.append(
                EvalPoint(
                    round=round_idx,
                    rank=rank,
                    model=event.model,
                    loss=_num(event.loss),
                    perplexity=_num(event.metrics.get("perplexity")),
                    samples=_num(event.samples),
                )
            )
