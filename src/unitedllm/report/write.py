"""Writes a run's report: ``<run_dir>/report/report.html`` plus one PNG per chart."""

from __future__ import annotations

import os
from pathlib import Path

from unitedllm.report.data import RunData, load_run
from unitedllm.report.html import render_html
from unitedllm.report.plots import render_plots
from unitedllm.run_layout import RunLayout

__all__ = ["write_report", "write_run_report"]


def _write_atomic(path: Path, data: bytes) -> None:
    # Someone may have the report open (or a browser reloading it) while a live run is re-reported.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(run_dir: Path, *, out_dir: Path | None = None) -> Path:
    """Render the report of a finished or running run; returns the path of ``report.html``.

    Raises :class:`~unitedllm.tracking.errors.RunNotFound` when ``run_dir`` has no ``metrics.jsonl``.
    """
    return write_run_report(load_run(Path(run_dir)), out_dir=out_dir)


def write_run_report(run: RunData, *, out_dir: Path | None = None) -> Path:
    """Render the report of already loaded run data; returns the path of ``report.html``."""
    target = out_dir or RunLayout(run.run_dir).report
    target.mkdir(parents=True, exist_ok=True)
    plots = render_plots(run)
    for plot in plots:
        if plot.png is not None:
            _write_atomic(target / f"{plot.name}.png", plot.png)
    page = target / "report.html"
    _write_atomic(page, render_html(run, plots).encode("utf-8"))
    return page
