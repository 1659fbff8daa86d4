"""A small SVG line plot of the loss per round for the run page (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["line_plot", "loss_plot"]

WIDTH, HEIGHT, PAD = 420, 160, 30


def loss_plot(rounds: Sequence[dict[str, Any]]) -> str | None:
    """Train (and eval) loss against round as inline SVG, or ``None`` with fewer than two rounds."""
    series = {
        name: [(float(r["round"]), float(r[name])) for r in rounds if isinstance(r.get(name), int | float)]
        for name in ("train_loss", "eval_loss")
    }
    return line_plot(series, x_label="round", element_id="loss-plot", label="loss per round")


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    *,
    x_label: str,
    element_id: str,
    label: str,
    x_format: str = "{:g}",
) -> str | None:
    """Several named series as one inline SVG line plot, or ``None`` with fewer than two x values."""
    points = [p for values in series.values() for p in values]
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_y = (y1 - y0) or 1.0

    def at(x: float, y: float) -> str:
        px = PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
        py = HEIGHT - PAD - (y - y0) / span_y * (HEIGHT - 2 * PAD)
        return f"{px:.1f},{py:.1f}"

    palette = ["#0b57d0", "#b00020", "#1b7f3b", "#8e44ad"]
    lines = [
        f'<polyline fill="none" stroke="{palette[i % 4]}" stroke-width="2" '
        f'points="{" ".join(at(x, y) for x, y in values)}"/>'
        f'<text x="{WIDTH - PAD}" y="{12 + 14 * i}" text-anchor="end" fill="{palette[i % 4]}" '
        f'font-size="11">{escape(name)}</text>'
        for i, (name, values) in enumerate(series.items())
        if values
    ]
    axes = (
        f'<text x="{PAD}" y="{HEIGHT - 8}" font-size="11">{x_label} {x_format.format(x0)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end" font-size="11">'
        f"{x_label} {x_format.format(x1)}</text>"
        f'<text x="2" y="{PAD}" font-size="11">{y1:.3g}</text>'
        f'<text x="2" y="{HEIGHT - PAD}" font-size="11">{y0:.3g}</text>'
    )
    return (
        f'<svg id="{escape(element_id)}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(label)}">{axes}{"".join(lines)}</svg>'
    )
