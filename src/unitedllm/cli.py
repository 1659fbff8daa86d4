"""The ``unitedllm`` command: run a federation in one process, or one role of it per process.

Only light modules are imported at start-up; torch and transformers load when a run starts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from unitedllm.errors import ConfigError, UnitedLLMError
from unitedllm.role import run_output_dir

__all__ = ["app", "main"]

app = typer.Typer(
    name="unitedllm",
    help="Federated fine-tuning of LLMs: run a federation in one process, or the aggregator and clients apart.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: an error stays one line when stderr is a pipe (rich would wrap it at 80 columns for grep).
console = Console(stderr=True, soft_wrap=True)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (FedML-style YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train_args.comm_round=3 (repeatable)."),
]
RunIdOpt = Annotated[str, typer.Option("--run-id", help="Run id shared by the aggregator and all clients.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run from its last complete round (same --run-id).")
]
FreshOpt = Annotated[
    bool,
    typer.Option(
        "--fresh-if-missing",
        help="With --resume: start the run from round 0 when it has no checkpoint (otherwise refused).",
    ),
]


def _setup_logging(verbose: bool) -> None:
    from unitedllm.log_setup import setup_logging

    setup_logging(verbose, handler=_log_handler())


def _log_handler() -> logging.Handler:
    """Rich's columns on a terminal; one plain ``LEVEL message`` line per record in a pipe or a file."""
    from rich.logging import RichHandler

    from unitedllm.log_setup import line_handler

    if console.is_terminal:
        return RichHandler(console=console, show_path=False, rich_tracebacks=False)
    return line_handler("%(levelname)s %(message)s")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print UnitedLLM errors without a traceback: exit 2 for config mistakes, 1 for failed runs."""
    try:
        yield
    except ConfigError as exc:
        console.print(f"[bold red]error:[/bold red] {_escape(exc.render())}")
        raise typer.Exit(2) from None
    except UnitedLLMError as exc:
        console.print(f"[bold red]error:[/bold red] {_escape(str(exc))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    except OSError as exc:  # a full, read-only or misplaced output dir: what and where, no traceback
        console.print(f"[bold red]error:[/bold red] {_escape(_os_error_line(exc))}")
        raise typer.Exit(1) from None


def _os_error_line(exc: OSError) -> str:
    """``exc`` as one line naming the file, e.g. ``cannot write /out/run/metrics.jsonl: No space left on device``."""
    import errno

    reason = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else None
    if exc.errno in {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
    }:
        return f"cannot write {where}: {reason}" if where else f"cannot write the output: {reason}"
    return f"{reason}: {where}" if where else reason


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _load(config: Path, overrides: list[str] | None, run_id: str | None) -> Any:
    from unitedllm.config import load_config

    return load_config(config, overrides=list(overrides or []), run_id=run_id)


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: a new UUID).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress display.")] = False,
    resume: ResumeOpt = False,
    fresh_if_missing: FreshOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the aggregator and every client in this process (offline-capable)."""
    _setup_logging(verbose)
    with _user_errors():
        from unitedllm.runner import new_run_id

        if resume and not run_id:
            raise ConfigError("--resume needs the --run-id of the run to continue")
        run_id = run_id or new_run_id()
        cfg = _load(config, set_, run_id)
        _warn_ignored(cfg, "run")
        resume = _resume_or_fresh(cfg, run_id, resume=resume, fresh=fresh_if_missing)
        result = _run_embedded(cfg, run_id=run_id, quiet=quiet, resume=resume)
        console.print(f"run [bold]{run_id}[/bold] finished: {len(result.rounds)} rounds")
        console.print(f"final model: {result.final_dir}")
        from unitedllm.run_layout import RunLayout

        console.print(f"metrics:     {RunLayout(result.output_dir).metrics()}")


def _warn_ignored(cfg: Any, mode: Any) -> None:
    """One warning per config key that this command does not use."""
    from unitedllm.config.modes import ignored_keys

    for path, why in ignored_keys(cfg, mode):
        logging.getLogger("unitedllm").warning("%s is ignored: %s", path, why)


def _resume_or_fresh(cfg: Any, run_id: str, *, resume: bool, fresh: bool) -> bool:
    """Whether to resume: refuse ``--resume`` of a run with no checkpoint unless ``--fresh-if-missing``."""
    from unitedllm.checkpoints import SERVER_STATE_FILE
    from unitedllm.errors import ConfigProblem
    from unitedllm.run_layout import RunLayout

    if fresh and not resume:
        raise ConfigError(ConfigProblem("--fresh-if-missing", "only has a meaning with --resume"))
    if not resume:
        return False
    checkpoint = RunLayout(run_output_dir(cfg, run_id)).resume_point
    if (checkpoint / SERVER_STATE_FILE).is_file():
        return True
    if fresh:
        logging.getLogger("unitedllm").warning(
            "run %s has no checkpoint in %s; starting it from round 0 (--fresh-if-missing)",
            run_id,
            checkpoint,
        )
        return False
    raise ConfigError(
        ConfigProblem(
            "--resume",
            f"run {run_id} has no checkpoint to resume ({checkpoint} holds none); check --run-id and"
            " train_args.output_dir, or add --fresh-if-missing to start it from round 0",
        )
    )


def _run_embedded(cfg: Any, *, run_id: str, quiet: bool, resume: bool) -> Any:
    from unitedllm.launch import tracked
    from unitedllm.progress import RunProgress
    from unitedllm.runner import run_async

    progress = RunProgress(comm_round=cfg.train_args.comm_round, console=console)
    with tracked(cfg, run_id=run_id, listeners=[progress.on_metric]) as metrics:
        if quiet:
            result = asyncio.run(
                run_async(cfg, run_id=run_id, metrics=metrics, on_round=progress.on_round, resume=resume)
            )
        else:
            with progress:
                result = asyncio.run(
                    run_async(
                        cfg,
                        run_id=run_id,
                        metrics=metrics,
                        on_step=progress.on_step,
                        on_round=progress.on_round,
                        resume=resume,
                    )
                )
    console.print(progress.summary_table())
    return result


@app.command()
def server(
    config: ConfigArg,
    run_id: RunIdOpt,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    fresh_if_missing: FreshOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the aggregator (rank 0) of a run whose clients are separate processes.

    When it evaluates the global model (validation_args.is_aggregator_test), environment_args.launcher
    may start it as a silo of several processes under torchrun or DeepSpeed, like a client (docs/silos.md).
    """
    _setup_logging(verbose)
    with _user_errors():
        from unitedllm.launch import launch

        cfg = _load(config, set_, run_id)
        _warn_ignored(cfg, "server")
        resume = _resume_or_fresh(cfg, run_id, resume=resume, fresh=fresh_if_missing)
        reason = launch(
            config, rank=0, run_id=run_id, overrides=list(set_ or []), verbose=verbose, resume=resume
        )
        from unitedllm.run_layout import RunLayout

        final = RunLayout(run_output_dir(_load(config, set_, run_id), run_id)).final()
        console.print(f"run {run_id} finished ({reason}); final model: {final}")


@app.command()
def client(
    config: ConfigArg,
    rank: Annotated[int, typer.Option("--rank", help="This client's rank, 1..client_num_in_total.")],
    run_id: RunIdOpt,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run one client (silo) of a run; it serves rounds until the aggregator finishes.

    The node's bootstrap runs first; environment_args.launcher may start the client as a silo of
    several processes under torchrun or DeepSpeed (docs/silos.md).
    """
    _setup_logging(verbose)
    with _user_errors():
        from unitedllm.errors import ConfigProblem
        from unitedllm.launch import launch

        if rank == 0:
            raise ConfigError(
                ConfigProblem("--rank", "0 is the aggregator's rank; start it with 'unitedllm server'")
            )
        reason = launch(config, rank=rank, run_id=run_id, overrides=list(set_ or []), verbose=verbose)
        console.print(f"client {rank}: run {run_id} finished ({reason})")


from unitedllm.report.cli import report_command

app.command("report")(report_command)

from unitedllm.serving.cli import export_command, serve_command

app.command("export")(export_command)
app.command("serve")(serve_command)


@app.command("dev-services")
def dev_services(
    mqtt_port: Annotated[
        int | None, typer.Option("--mqtt-port", help="MQTT port (default: a free one).")
    ] = None,
    s3_port: Annotated[int | None, typer.Option("--s3-port", help="S3 port (default: a free one).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Keep data and logs here.")] = None,
    no_tls: Annotated[bool, typer.Option("--no-tls", help="No TLS listener for MQTT.")] = False,
) -> None:
    """Start mosquitto and SeaweedFS on 127.0.0.1 for trying MQTT_S3 by hand (Ctrl-C stops them)."""
    _setup_logging(False)
    with _user_errors():
        from unitedllm.devservices import serve

        serve(workdir, tls=not no_tls, mqtt_port=mqtt_port, s3_port=s3_port)


from unitedllm.packaging.cli import package_app

app.add_typer(package_app, name="package")

from unitedllm.platform.cli import platform_app

app.add_typer(platform_app, name="platform")

from unitedllm.agent.cli import agent_command

app.command("agent")(agent_command)


@app.command()
def version() -> None:
    """Print the UnitedLLM version."""
    from unitedllm import __version__

    typer.echo(__version__)


def main() -> None:
    """Entry point of the ``unitedllm`` script."""
    if not console.is_terminal:
        # click's one-line "Error: ..." instead of rich's 80-column box when stderr is a pipe or a file
        app.rich_markup_mode = None
    try:
        app()
    except ConfigError as exc:  # raised while parsing options
        console.print(f"error: {_escape(exc.render())}")
        sys.exit(2)
