"""Live terminal display of a run: one line per client (round, step, loss) and a table per round.

A ``warning`` event (e.g. the global eval loss rising sharply, :mod:`unitedllm.instability`) is
shown on its round's line, and marked in the summary table.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from unitedllm.aggregator import RoundSummary
    from unitedllm.training.base import StepEvent

__all__ = ["RunProgress"]


class RunProgress:
    """Shows local training progress live and prints a summary row when a round ends."""

    def __init__(self, *, comm_round: int, console: Console | None = None):
        self.comm_round = comm_round
        self.console = console or Console(stderr=True)
        self._steps: dict[int, StepEvent] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._started = time.perf_counter()
        self.rows: list[RoundSummary] = []
        #: Round index -> (kind, message) of the warnings logged for it.
        self.warnings: dict[int, list[tuple[str, str]]] = {}

    def __enter__(self) -> Self:
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
        self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def on_step(self, event: StepEvent) -> None:
        """Called from training threads after every optimizer step."""
        with self._lock:
            self._steps[event.rank] = event
        if self._live is not None:
            self._live.update(self._render())

    def on_round(self, summary: RoundSummary) -> None:
        self.rows.append(summary)
        self.console.print(_round_line(summary, self.comm_round))
        for _, message in self.warnings.get(summary.round_idx, []):
            self.console.print(
                f"[bold yellow]warning: round {summary.round_idx}: {escape(message)}[/bold yellow]"
            )
        if self._live is not None:
            self._live.update(self._render())

    def on_metric(self, record: dict[str, Any]) -> None:
        if record.get("event") == "warning":
            round_idx = record.get("round")
            kind = str(record.get("kind") or "warning")
            message = str(record.get("message") or kind)
            if isinstance(round_idx, int):
                self.warnings.setdefault(round_idx, []).append((kind, message))
            if not isinstance(round_idx, int) or any(s.round_idx == round_idx for s in self.rows):
                # The aggregator logs a round's warnings just before the round's line; these came later.
                self.console.print(
                    f"[bold yellow]warning: round {round_idx}: {escape(message)}[/bold yellow]"
                )
        elif record.get("event") == "rejected":
            self.console.print(
                f"[yellow]round {record['round']}: update from client {record['rank']} "
                f"refused: {record.get('reason')}[/yellow]"
            )

    def _render(self) -> Table:
        table = Table(
            title=f"UnitedLLM · {len(self.rows)}/{self.comm_round} rounds · "
            f"{time.perf_counter() - self._started:.0f}s",
            title_justify="left",
        )
        for column in ("client", "round", "step", "loss"):
            table.add_column(column, justify="right")
        with self._lock:
            events = sorted(self._steps.values(), key=lambda e: e.rank)
        for e in events:
            table.add_row(str(e.rank), str(e.round_idx), f"{e.step}/{e.max_steps}", f"{e.loss:.4f}")
        return table

    def summary_table(self) -> Table:
        """Every round of the run: clients, train loss, eval loss, seconds."""
        table = Table(title="Rounds", title_justify="left")
        for column in ("round", "clients", "train loss", "eval loss", "seconds", "refused", "warning"):
            table.add_column(column, justify="right")
        for s in self.rows:
            table.add_row(
                str(s.round_idx),
                ",".join(map(str, s.aggregated)),
                _fmt(s.train_loss),
                _fmt(s.eval_loss),
                f"{s.seconds:.1f}",
                str(len(s.rejected)) if s.rejected else "",
                ", ".join(kind for kind, _ in self.warnings.get(s.round_idx, [])),
            )
        return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _round_line(s: RoundSummary, total: int) -> str:
    parts = [
        f"round {s.round_idx} ({s.round_idx + 1}/{total})",  # round_idx as in metrics, checkpoints, tables
        f"clients {','.join(map(str, s.aggregated))}",
        f"train loss {_fmt(s.train_loss)}",
    ]
    if s.eval_loss is not None:
        parts.append(f"eval loss {_fmt(s.eval_loss)}")
    parts.append(f"{s.seconds:.1f}s")
    return " · ".join(parts)
