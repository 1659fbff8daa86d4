"""``unitedllm export`` and ``unitedllm serve``: the command functions the ``unitedllm`` typer app mounts.

Only typer is imported here; torch, transformers and the web stack load when a command runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["export_command", "serve_command"]


@contextmanager
def _user_errors() -> Iterator[None]:
    """One line per problem, no traceback: exit 2 for usage and config mistakes, 1 for the rest."""
    from rich.console import Console
    from rich.markup import escape

    from unitedllm.errors import ConfigError, UnitedLLMError

    console = Console(stderr=True, soft_wrap=True)  # one line per problem, however long
    try:
        yield
    except ConfigError as exc:
        for problem in exc.problems:
            console.print(f"[bold red]error:[/bold red] {escape(str(problem))}")
        raise typer.Exit(2) from None
    except UnitedLLMError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def export_command(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder (train_args.output_dir).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write.", show_default=False)],
    round_: Annotated[
        str, typer.Option("--round", help="Which round's model: a number or 'final' (newest for --rank).")
    ] = "final",
    rank: Annotated[int, typer.Option("--rank", help="0: the global model; R: client R's local model.")] = 0,
    received: Annotated[
        bool, typer.Option("--received", help="With --rank: the global model as that client received it.")
    ] = False,
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge the adapter into the base (a plain transformers model).")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="The run's config: its digest and server optimizer go into the card."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Export a run's model (global, or a client's) as a Hugging Face folder with a provenance card."""
    _serve_logging(False)
    with _user_errors():
        from unitedllm.serving.export import export_model

        written = export_model(
            run_dir,
            out,
            round_spec=round_,
            rank=rank,
            received=received,
            merge=merge,
            config=config,
            force=force,
        )
        typer.echo(f"exported: {written}")


class EngineName(str, Enum):
    transformers = "transformers"
    vllm = "vllm"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run folder, an exported model folder, a base model folder, or (with --follow --run-id) "
            "the config file of an MQTT_S3 run.",
            show_default=False,
        ),
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="Serve a PEFT adapter as model NAME: NAME=PATH (repeatable)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to bind.")] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="UNITEDLLM_API_KEY",
            help="Require this bearer key (repeatable); required when --host is not loopback.",
            show_envvar=True,
        ),
    ] = None,
    engine: Annotated[
        EngineName, typer.Option("--engine", help="Generation engine.")
    ] = EngineName.transformers,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Move 'global' to each new round a live run saves (a run folder), or announces over "
            "MQTT_S3 (a config file: broker, S3 and keys from it and the UNITEDLLM_* environment, as "
            "`unitedllm run` reads them).",
        ),
    ] = False,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="With a config file: the id of the MQTT_S3 run to follow.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="With a config file: where the followed run's models are kept "
            "[default: ~/.cache/unitedllm/follow/RUN_ID].",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Requests decoded together at most.")
    ] = 16,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Waiting requests before 429.")] = 256,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.001, help="Seconds a request may wait and generate before 503."),
    ] = 300.0,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for torch.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")] = False,
) -> None:
    """Serve a run's models (or an exported one) behind an OpenAI-compatible HTTP API."""
    _serve_logging(verbose)
    with _user_errors():
        from unitedllm.errors import ConfigError, ConfigProblem
        from unitedllm.serving.server import ServeOptions, serve

        keys = list(api_key or [])
        if any(not k.strip() for k in keys):
            raise ConfigError(
                ConfigProblem(
                    "--api-key", "a key is empty (is UNITEDLLM_API_KEY set?): give a key or leave it out"
                )
            )
        if host not in LOOPBACK and not keys:
            raise ConfigError(
                ConfigProblem(
                    "--host", f"{host} is not loopback: give --api-key (or UNITEDLLM_API_KEY) as well"
                )
            )
        serve(
            ServeOptions(
                target=target,
                adapters=list(adapter or []),
                host=host,
                port=port,
                api_keys=keys,
                engine=engine.value,
                follow=follow,
                max_batch=max_batch,
                max_queue=max_queue,
                timeout_s=timeout,
                threads=threads,
                run_id=run_id,
                cache_dir=cache_dir,
            )
        )


def _serve_logging(verbose: bool) -> None:
    """Timestamped lines (a server's log is read later); libraries quiet, secrets masked."""
    from unitedllm.log_setup import line_handler, setup_logging

    setup_logging(verbose, handler=line_handler("%(asctime)s %(levelname)s %(name)s: %(message)s"))
