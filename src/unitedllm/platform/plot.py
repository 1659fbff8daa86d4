"""A small SVG line plot of the loss per round for the run page (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["loss_plot"]

WIDTH, HEIGHT, PAD = 420, 160, 30


def loss_plot(rounds: Sequence[dict[str, Any]]) -> str | None:
    """Train (and eval) loss against round as inline SVG, or ``None`` with fewer than two rounds."""
    series = {
        name: [(r["round"], r[name]) for r in rounds if isinstance(r.get(name), int | float)]
        for name in ("train_loss", "eval_loss")
    }
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

    colours = {"train_loss": "#0b57d0", "eval_loss": "#b00020"}
    lines = [
        f'<polyline fill="none" stroke="{colours[name]}" stroke-width="2" points="{" ".join(at(x, y) for x, y in values)}"/>'
        f'<text x="{WIDTH - PAD}" y="{12 + 14 * i}" text-anchor="end" fill="{colours[name]}" font-size="11">{name}</text>'
        for i, (name, values) in enumerate(series.items())
        if values
    ]
    axes = (
        f'<text x="{PAD}" y="{HEIGHT - 8}" font-size="11">round {x0}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end" font-size="11">round {x1}</text>'
        f'<text x="2" y="{PAD}" font-size="11">{y1:.3f}</text><text x="2" y="{HEIGHT - PAD}" font-size="11">{y0:.3f}</text>'
    )
    return f'<svg id="loss-plot" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="loss per round">{axes}{"".join(lines)}</svg>'
