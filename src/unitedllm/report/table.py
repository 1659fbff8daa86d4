"""The per-round summary of a run, as rows of text shared by the terminal table and the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from unitedllm.phases import AGGREGATOR_PHASES, CLIENT_PHASES
from unitedllm.report.data import RunData

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["COLUMNS", "PHASE_COLUMNS", "phase_rows", "round_rows", "status_line", "summary_table"]

#: Every phase a client or the aggregator records, clients' first (:mod:`unitedllm.phases`).
PHASES = (*CLIENT_PHASES, *(p for p in AGGREGATOR_PHASES if p not in CLIENT_PHASES))
PHASE_COLUMNS = ("round", "rank", "round s", *(f"{p} s" for p in PHASES))

COLUMNS = (
    "round",
    "clients",
    "refused",
    "train loss",
    "eval loss",
    "ppl",
    "round s",
    "train s",
    "comm s",
    "agg s",
    "MiB up",
    "MiB down",
)
_MB = 1024.0 * 1024.0


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def round_rows(run: RunData) -> list[tuple[str, ...]]:
    """One row per round seen, finished or running, in round order (cells as in :data:`COLUMNS`)."""
    rows: list[tuple[str, ...]] = []
    for index in sorted(run.rounds):
        row = run.rounds[index]
        if not row.finished:
            clients = ",".join(map(str, row.selected))
            rows.append((str(index), clients, "", "running", *["-"] * (len(COLUMNS) - 4)))
            continue
        eval_loss, perplexity = run.global_eval(index)
        times = run.time_breakdown(row)
        up, down = run.round_bytes(index)
        rows.append(
            (
                str(index),
                ",".join(map(str, row.aggregated)),
                ",".join(row.rejected) or "",
                _fmt(row.train_loss, ".5g"),
                _fmt(eval_loss, ".5g"),
                _fmt(perplexity, ".5g"),
                _fmt(row.seconds, ".2f"),
                _fmt(times["train"], ".2f"),
                _fmt(times["communication"], ".2f"),
                _fmt(row.aggregation_seconds, ".3f"),
                _fmt(up / _MB, ".2f"),
                _fmt(down / _MB, ".2f"),
            )
        )
    return rows


def phase_rows(run: RunData) -> list[tuple[str, ...]]:
    """Seconds per phase of each finished round, per rank (cells as in :data:`PHASE_COLUMNS`).

    The aggregator's row first (``0 (aggregator)``), then each client that recorded its phases; a
    phase a rank does not have is ``-``. Empty for a run written before phases were recorded.
    """
    rows: list[tuple[str, ...]] = []
    for row in run.finished_rounds():
        timed = [c for c in run.client_rounds(row.round) if c.phases]
        if not row.phases and not timed:
            continue
        wall = _fmt(row.seconds, ".2f")
        if row.phases:
            cells = (_fmt(row.phases.get(p), ".3f") for p in PHASES)
            rows.append((str(row.round), "0 (aggregator)", wall, *cells))
        slowest = run.slowest_client(row.round)
        for client in timed:
            who = f"{client.rank} (slowest)" if client is slowest and len(timed) > 1 else str(client.rank)
            cells = (_fmt(client.phases.get(p), ".3f") for p in PHASES)
            rows.append((str(row.round), who, wall, *cells))
    return rows


def status_line(run: RunData) -> str:
    """Finished or in progress, rounds done, clients, wall time; and what was skipped."""
    done = len(run.finished_rounds())
    state = "finished" if run.finished else "in progress" if done or run.rounds else "not started"
    parts = [state, f"{done} round{'s' if done != 1 else ''} done", f"{len(run.ranks)} clients"]
    if run.first_time is not None and run.last_time is not None:
        parts.append(f"{run.last_time - run.first_time:.1f}s of metrics")
    if run.skipped_lines:
        parts.append(f"{run.skipped_lines} unreadable line(s) skipped")
    if run.warnings:
        rounds = ", ".join(str(r) for r, _, _ in run.warnings)
        parts.append(f"{len(run.warnings)} warning{'s' if len(run.warnings) != 1 else ''} (round {rounds})")
    return " · ".join(parts)


def summary_table(run: RunData | Path) -> Table:
    """A rich Table of every round of a run (pass a run directory or loaded :class:`RunData`)."""
    from rich import box
    from rich.table import Table

    from unitedllm.report.data import load_run

    run = run if isinstance(run, RunData) else load_run(Path(run))
    rows = round_rows(run)
    # Twelve columns do not fit a terminal: leave out those with nothing to say (no refusals, no perplexity).
    keep = [i for i, name in enumerate(COLUMNS) if i < 2 or any(r[i] not in ("", "-") for r in rows)]
    table = Table(
        title=f"run {run.run_id} · {status_line(run)}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for i in keep:
        table.add_column(
            COLUMNS[i].replace(" ", "\n"),
            justify="left" if COLUMNS[i] in ("clients", "refused") else "right",
            no_wrap=COLUMNS[i] != "refused",
        )
    for cells in rows:
        table.add_row(*(cells[i] for i in keep))
    return table
