"""PNG plots of a run: eval loss, train loss, round time breakdown, bytes, system use.

Built on matplotlib's object API with the Agg canvas (no pyplot, no display, no global state),
so reports render headless and from any thread. Each plot returns ``None`` when the run has
no data for it yet, and the report says so instead of drawing an empty chart.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unitedllm.errors import MissingDependency
from unitedllm.report.data import RunData, stack_parts

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["Plot", "render_plots"]

_MB = 1024.0 * 1024.0
_STACK_COLOURS = {
    "train": "#4C72B0",
    "communication": "#DD8452",
    "aggregation": "#55A868",
    "other": "#B0B0B0",
}


@dataclass(frozen=True)
class Plot:
    """One rendered chart: its file name, title, PNG bytes, and a note when it could not be drawn."""

    name: str
    title: str
    png: bytes | None
    note: str = ""


def _figure(draw: Callable[[Axes], None], *, width: float = 8.0, height: float = 4.2) -> bytes:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependency("matplotlib", "tracking", "unitedllm report") from exc
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw(axes)
    axes.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _rounds_axis(axes: Axes, rounds: list[int]) -> None:
    axes.set_xlabel("round")
    if rounds and len(rounds) <= 30:
        axes.set_xticks(sorted(set(rounds)))


def _eval_loss(run: RunData) -> Plot:
    title = "Eval loss per round"
    points = [e for e in run.evals if e.loss is not None]
    if not points:
        return Plot(
            "eval_loss",
            title,
            None,
            "no evaluations yet (enable validation_args.is_aggregator_test or test_on_clients)",
        )

    def draw(axes: Axes) -> None:
        series: dict[tuple[int, str], list[tuple[int, float]]] = {}
        for e in points:
            series.setdefault((e.rank, e.model), []).append((e.round, e.loss or 0.0))
        for (rank, model), values in sorted(series.items()):
            values.sort()
            xs, ys = [r for r, _ in values], [v for _, v in values]
            if rank == 0:
                axes.plot(xs, ys, color="black", linewidth=2.4, marker="o", label="aggregator (global model)")
            elif model == "global":
                axes.plot(xs, ys, marker="o", label=f"client {rank} (global model)")
            else:
                axes.plot(
                    xs, ys, marker="x", linestyle="--", label=f"client {rank} (own model, before aggregation)"
                )
        axes.set_ylabel("eval loss")
        axes.set_title(title)
        _rounds_axis(axes, [e.round for e in points])
        axes.legend(fontsize="small")

    return Plot("eval_loss", title, _figure(draw))


def _train_loss(run: RunData) -> Plot:
    title = "Train loss per round"
    clients = [c for c in run.clients.values() if c.train_loss is not None]
    weighted = [(r.round, r.train_loss) for r in run.finished_rounds() if r.train_loss is not None]
    if not clients and not weighted:
        return Plot("train_loss", title, None, "no client updates received yet")

    def draw(axes: Axes) -> None:
        for rank in sorted({c.rank for c in clients}):
            values = sorted((c.round, c.train_loss or 0.0) for c in clients if c.rank == rank)
            axes.plot(
                [r for r, _ in values], [v for _, v in values], marker="o", alpha=0.8, label=f"client {rank}"
            )
        if weighted:
            axes.plot(
                [r for r, _ in weighted],
                [v for _, v in weighted],
                color="black",
                linewidth=2.4,
                marker="s",
                label="sample-weighted mean (aggregated clients)",
            )
        axes.set_ylabel("train loss (last local step)")
        axes.set_title(title)
        _rounds_axis(axes, [c.round for c in clients] + [r for r, _ in weighted])
        axes.legend(fontsize="small")

    return Plot("train_loss", title, _figure(draw))


def _phase_colours() -> dict[str, Any]:
    """One colour per stacked phase (tab20's pairs), ``other`` grey as before."""
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    parts = [p for p in stack_parts() if p != "other"]
    return {**{part: palette(i % 20) for i, part in enumerate(parts)}, "other": _STACK_COLOURS["other"]}


def _round_time(run: RunData) -> Plot:
    rows = run.finished_rounds()
    phased = [run.phase_breakdown(row) for row in rows]
    by_phase = bool(rows) and all(b is not None for b in phased)
    title = (
        "Round time by phase: the slowest client's, the aggregator's, other"
        if by_phase
        else "Round time: slowest client's train and communication, aggregation, other"
    )
    if not rows:
        return Plot("round_time", title, None, "no round has finished yet")

    def draw(axes: Axes) -> None:
        if by_phase:
            breakdowns = [b for b in phased if b is not None]
            colours = _phase_colours()
        else:  # a run written before phases were recorded
            breakdowns = [run.time_breakdown(row) for row in rows]
            colours = _STACK_COLOURS
        xs = [row.round for row in rows]
        bottom = [0.0] * len(rows)
        for part, colour in colours.items():
            heights = [b[part] for b in breakdowns]
            if not any(heights):
                continue  # a phase this run never spent time in: no bar, no legend entry
            axes.bar(xs, heights, bottom=bottom, color=colour, label=part)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axes.set_ylabel("seconds")
        axes.set_title(title, fontsize="medium")
        _rounds_axis(axes, xs)
        if by_phase:  # up to fifteen parts: beside the bars, not over them
            axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            axes.legend(fontsize="small")

    return Plot("round_time", title, _figure(draw))


def _bytes(run: RunData) -> Plot:
    title = "Bytes per round: client uploads (updates) and downloads (global model)"
    rounds = sorted({c.round for c in run.clients.values()})
    if not rounds:
        return Plot("bytes", title, None, "no client updates received yet")

    def draw(axes: Axes) -> None:
        sizes = [run.round_bytes(r) for r in rounds]
        width = 0.4
        axes.bar(
            [r - width / 2 for r in rounds],
            [s[0] / _MB for s in sizes],
            width,
            label="uploaded by clients",
            color="#C44E52",
        )
        axes.bar(
            [r + width / 2 for r in rounds],
            [s[1] / _MB for s in sizes],
            width,
            label="downloaded by clients",
            color="#8172B3",
        )
        axes.set_ylabel("MiB")
        axes.set_title(title, fontsize="medium")
        _rounds_axis(axes, rounds)
        axes.legend(fontsize="small")

    return Plot("bytes", title, _figure(draw))


def _system(run: RunData) -> Plot | None:
    title = "System use over time"
    samples = [s for s in run.system if isinstance(s.get("elapsed_s"), (int, float))]
    if not samples:
        return None  # sampling was off: no chart and no note

    def draw(axes: Axes) -> None:
        for rank in sorted({int(s.get("rank", 0)) for s in samples}):
            mine = [s for s in samples if s.get("rank") == rank]
            who = "aggregator" if rank == 0 else f"client {rank}"
            axes.plot(
                [s["elapsed_s"] for s in mine],
                [_float(s.get("cpu_percent")) for s in mine],
                label=f"{who} CPU %",
            )
            axes.plot(
                [s["elapsed_s"] for s in mine],
                [_float(s.get("ram_percent")) for s in mine],
                linestyle="--",
                label=f"{who} RAM %",
            )
            gpus = sorted({k for s in mine for k in s if k.startswith("gpu") and k.endswith("_util_percent")})
            for key in gpus:
                axes.plot(
                    [s["elapsed_s"] for s in mine],
                    [_float(s.get(key)) for s in mine],
                    linestyle=":",
                    label=f"{who} {key.removesuffix('_util_percent').upper()} util %",
                )
        axes.set_xlabel("seconds since sampling started")
        axes.set_ylabel("percent")
        axes.set_title(title)
        axes.legend(fontsize="small")

    return Plot("system", title, _figure(draw))


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def render_plots(run: RunData) -> list[Plot]:
    """Every chart of the report, in display order."""
    plots = [_eval_loss(run), _train_loss(run), _round_time(run), _bytes(run)]
    system = _system(run)
    if system is not None:
        plots.append(system)
    return plots
