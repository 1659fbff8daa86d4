"""The self-contained HTML report: summary, round table, client table, plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
import time

from unitedllm.report.data import RunData
from unitedllm.report.plots import Plot
from unitedllm.report.table import COLUMNS, PHASE_COLUMNS, phase_rows, round_rows, status_line

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } .status { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f2f2f2; } td.left { text-align: left; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 0.4rem 0.8rem; border-radius: 4px; }
"""


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="left">{html.escape(c)}</td>' if i in left else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _client_rows(run: RunData) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for rank in run.ranks:
        mine = sorted((c for (_, r), c in run.clients.items() if r == rank), key=lambda c: c.round)
        last = mine[-1] if mine else None
        own_evals = [e for e in run.evals if e.rank == rank and e.loss is not None]
        rows.append(
            (
                str(rank),
                str(len(mine)),
                "-" if last is None or last.train_loss is None else f"{last.train_loss:.4f}",
                "-"
                if not own_evals
                else f"{own_evals[-1].loss:.4f} ({own_evals[-1].model}, round {own_evals[-1].round})",
                "-" if last is None or last.samples is None else f"{last.samples:.0f}",
                "-" if last is None or last.tokens_per_second is None else f"{last.tokens_per_second:.0f}",
            )
        )
    return rows


def _figure(plot: Plot) -> str:
    title = html.escape(plot.title)
    if plot.png is None:
        return (
            f'<figure><figcaption>{title}</figcaption><p class="note">{html.escape(plot.note)}</p></figure>'
        )
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
        f"<figcaption>{title}</figcaption></figure>"
    )


def render_html(run: RunData, plots: list[Plot]) -> str:
    """The whole report page; it references no file or network resource."""
    notes = []
    if not run.finished:
        notes.append(
            "The run has not ended (no run_end event): this is a snapshot of a run in progress "
            "or of one that stopped early."
        )
    if run.skipped_lines:
        notes.append(
            f"{run.skipped_lines} unreadable line(s) of metrics.jsonl were skipped "
            "(a line torn while the run writes it, or a damaged file)."
        )
    for round_idx, _, message in run.warnings:
        notes.append(f"warning: round {round_idx}: {message}")
    for round_idx, rank, message in run.client_errors:
        notes.append(f"client {rank} reported an error in round {round_idx}: {message}")
    for row in run.finished_rounds():
        for who, reason in row.rejected.items():
            notes.append(f"round {row.round}: update from client {who} refused: {reason}")
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    rounds = round_rows(run)
    round_table = (
        _table(COLUMNS, rounds, left=(1, 2)) if rounds else '<p class="note">no round has started yet</p>'
    )
    client_table = _table(
        ("client", "rounds trained", "last train loss", "last eval loss", "samples", "tokens/s"),
        _client_rows(run),
        left=(3,),
    )
    phases = phase_rows(run)
    phase_table = (
        "<h2>Where each round's time went</h2><p>Seconds per phase of each round, per rank: the "
        "aggregator's from sending the global model to the round's resume point on disk, each client's "
        "from the round's start to its update sent (round s is the aggregator's wall time).</p>"
        + _table(PHASE_COLUMNS, phases, left=(1,))
        if phases
        else ""
    )
    title = f"UnitedLLM run {run.run_id}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="status">{html.escape(status_line(run))} · '
        f"report generated {generated}</p>{note_html}"
        f"<h2>Rounds</h2>{round_table}{phase_table}<h2>Clients</h2>{client_table}"
        f"<h2>Plots</h2>{''.join(_figure(p) for p in plots)}"
        "</body></html>\n"
    )
