"""Run reports: ``unitedllm report RUN_DIR`` writes plots and a self-contained HTML page from metrics.jsonl.

This package imports nothing heavy at import time; matplotlib loads only when a report is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["summary_table", "write_report"]


def write_report(run_dir: Path, *, out_dir: Path | None = None) -> Path:
    """Write ``<run_dir>/report/report.html`` and its PNG plots; returns the HTML path."""
    from unitedllm.report.write import write_report as write

    return write(run_dir, out_dir=out_dir)


def summary_table(run_dir: Path) -> Table:
    """A rich Table of every round of the run in ``run_dir``."""
    from unitedllm.report.table import summary_table as table

    return table(run_dir)
