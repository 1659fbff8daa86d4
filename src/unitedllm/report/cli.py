"""``unitedllm report RUN_DIR``: the command function the ``unitedllm`` typer app mounts.

Only typer is imported here; the report (and matplotlib) load when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["report_command"]


def report_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="The run's output directory (train_args.output_dir), e.g. .logs/UnitedLLM/<run_id>."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write the report (default: RUN_DIR/report).")
    ] = None,
    no_table: Annotated[bool, typer.Option("--no-table", help="Do not print the round table.")] = False,
) -> None:
    """Write plots and a self-contained HTML report of a run (finished or still running)."""
    from rich.console import Console
    from rich.markup import escape

    from unitedllm.errors import UnitedLLMError

    console = Console()
    try:
        from unitedllm.report.data import load_run
        from unitedllm.report.table import summary_table
        from unitedllm.report.write import write_run_report

        run = load_run(run_dir)
        if not no_table:
            console.print(summary_table(run))
        for round_idx, _, message in run.warnings:
            console.print(f"[yellow]warning: round {round_idx}: {escape(message)}[/yellow]")
        page = write_run_report(run, out_dir=out)
    except UnitedLLMError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"report: {page}")
