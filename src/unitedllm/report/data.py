"""Reads a run's ``metrics.jsonl`` into per-round, per-client and evaluation tables for reports.

Works on a finished run and on one still writing: a torn last line is skipped (and counted),
rounds that have started but not ended are marked running, missing rounds are simply absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitedllm.tracking.errors import RunNotFound

__all__ = ["ClientRound", "EvalPoint", "RoundRow", "RunData", "load_run", "metrics_path"]


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
    path = run_dir / "metrics.jsonl"
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
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                data.skipped_lines += 1  # a torn last line while the run writes, or a damaged file
                continue
            if isinstance(record, dict):
                _add(data, record)
            else:
                data.skipped_lines += 1
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


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _add(data: RunData, record: dict[str, Any]) -> None:
    event, round_idx, rank = record.get("event"), _int(record.get("round")), _int(record.get("rank"))
    when = _num(record.get("time"))
    if when is not None:
        data.first_time = when if data.first_time is None else min(data.first_time, when)
        data.last_time = when if data.last_time is None else max(data.last_time, when)
    if rank is None:
        return
    if event == "client_joined":
        data.joined.add(rank)
    elif event == "run_end":
        data.finished = True
    elif event == "client_error":
        data.client_errors.append((round_idx, rank, str(record.get("message", ""))))
    elif event == "system":
        data.system.append(record)
    elif round_idx is None:
        return
    elif event == "round_start":
        row = data.rounds.setdefault(round_idx, RoundRow(round_idx))
        row.selected = [r for r in record.get("selected") or [] if isinstance(r, int)]
    elif event == "round":
        row = data.rounds.setdefault(round_idx, RoundRow(round_idx))
        row.selected = [r for r in record.get("selected") or row.selected if isinstance(r, int)]
        row.aggregated = [r for r in record.get("aggregated") or [] if isinstance(r, int)]
        rejected = record.get("rejected") or {}
        row.rejected = {str(k): str(v) for k, v in rejected.items()} if isinstance(rejected, dict) else {}
        row.train_loss = _num(record.get("train_loss"))
        row.eval_loss = _num(record.get("eval_loss"))
        row.seconds = _num(record.get("seconds"))
        row.aggregation_seconds = _num(record.get("aggregation_seconds"))
        row.finished = True
    elif event == "train":
        m = _dict(record.get("metrics"))
        comm = [_num(m.get("download_seconds")), _num(m.get("upload_seconds"))]
        known = [c for c in comm if c is not None]
        data.clients[(round_idx, rank)] = ClientRound(
            round=round_idx,
            rank=rank,
            train_loss=_num(record.get("loss", m.get("train_loss"))),
            samples=_num(record.get("samples")),
            train_seconds=_num(m.get("train_seconds", record.get("seconds"))),
            comm_seconds=sum(known) if known else None,
            bytes_sent=_num(m.get("bytes_sent", record.get("bytes_received"))),
            bytes_received=_num(m.get("bytes_received")),
            tokens_per_second=_num(m.get("tokens_per_second")),
        )
    elif event == "eval":
        m = _dict(record.get("metrics"))
        point = EvalPoint(
            round=round_idx,
            rank=rank,
            model=str(record.get("model") or "global"),
            loss=_num(record.get("loss", m.get("eval_loss"))),
            perplexity=_num(m.get("perplexity")),
            samples=_num(record.get("samples")),
        )
        data.evals.append(point)
