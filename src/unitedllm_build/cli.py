"""The ``unitedllm-build`` command: build packages (``fedml build`` flags), ``validate`` a config, ``init`` a project.

Start-up imports stay light (no torch): the work is imported inside each command.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unitedllm.errors import ConfigError, UnitedLLMError
from unitedllm.log_setup import line_handler, setup_logging
from unitedllm.packaging.manifest import SECRET_ENV, read_package_secret

__all__ = ["app", "main"]


app = typer.Typer(
    name="unitedllm-build",
    help=(
        "Validate a UnitedLLM config and bundle code + config into server/client packages.\n\n"
        'unitedllm-build -t server -sf . -ep launch.py -cf config -df build -ig "build,*.ckpt"'
    ),
    add_completion=False,
    rich_markup_mode=None,
)


class PackageKind(str, Enum):
    server = "server"
    client = "client"


def _fail(exc: UnitedLLMError) -> typer.Exit:
    if isinstance(exc, ConfigError):
        from unitedllm_build.config_check import config_error_lines

        where = f" {exc.source}" if exc.source else ""
        typer.echo(f"error: invalid config{where}:", err=True)
        typer.echo(config_error_lines(exc), err=True)
    else:
        typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@app.callback(invoke_without_command=True)
def build(
    ctx: typer.Context,
    package_type: Annotated[
        PackageKind | None, typer.Option("--type", "-t", help="Which package: server (rank 0) or client")
    ] = None,
    source_folder: Annotated[
        Path, typer.Option("--source_folder", "-sf", help="The source code folder")
    ] = Path("."),
    entry_point: Annotated[
        str | None,
        typer.Option("--entry_point", "-ep", help="Entry point (a .py file) inside the source folder"),
    ] = None,
    config_folder: Annotated[
        Path,
        typer.Option("--config_folder", "-cf", help="Folder holding fedml_config.yaml (and bootstrap.sh)"),
    ] = Path("config"),
    dest_folder: Annotated[
        Path, typer.Option("--dest_folder", "-df", help="Packages go to DEST/dist-packages/")
    ] = Path("build"),
    ignore: Annotated[
        str | None,
        typer.Option("--ignore", "-ig", help='Comma-separated globs to leave out, e.g. "build,*.ckpt"'),
    ] = None,
    drop_secrets: Annotated[
        bool,
        typer.Option("--drop-secrets", help="Leave credential files out with a warning instead of refusing"),
    ] = False,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file", help=f"Sign the manifest with the secret in this file (or ${SECRET_ENV})"
        ),
    ] = None,
    allow_secret: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-secret",
            help="A secret-scan finding that is a false positive: PATH or PATH:LINE as the finding shows it"
            " (globs allowed; repeatable)",
        ),
    ] = None,
) -> None:
    """Build DEST/dist-packages/<type>-package.zip after validating the config and the entry point."""
    if ctx.invoked_subcommand is not None:
        if package_type is not None or entry_point is not None:
            typer.echo("error: build options (-t, -ep, ...) cannot be combined with a subcommand", err=True)
            raise typer.Exit(2)
        return
    if package_type is None and entry_point is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    if package_type is None:
        typer.echo("error: -t/--type is required: server or client", err=True)
        raise typer.Exit(2)
    if entry_point is None:
        typer.echo("error: -ep/--entry_point is required: the .py file that starts a node", err=True)
        raise typer.Exit(2)

    from unitedllm_build.builder import BuildRequest, build_package
    from unitedllm_build.ignore import parse_ignore_option

    _setup_logging()
    try:
        secret = read_package_secret(secret_file)
        result = build_package(
            BuildRequest(
                package_type=package_type.value,
                source_folder=source_folder,
                entry_point=entry_point,
                config_folder=config_folder,
                dest_folder=dest_folder,
                ignore=tuple(parse_ignore_option(ignore)),
                drop_secrets=drop_secrets,
                secret=secret,
                allow_secrets=tuple(allow_secret or ()),
            )
        )
    except UnitedLLMError as exc:
        raise _fail(exc) from None
    m = result.manifest
    try:
        shown = result.zip_path.relative_to(Path.cwd())
    except ValueError:
        shown = result.zip_path
    typer.echo(f"Built {m.package_type} package: {shown}")
    typer.echo(f"  files:   {len(m.files)} ({_human(m.total_size)} unpacked)")
    typer.echo(f"  size:    {_human(result.size)}")
    typer.echo(f"  sha256:  {result.sha256}")
    typer.echo(f"  entry:   {m.entry_point}   config sha256: {m.config_sha256}")
    typer.echo(f"  signed:  {'yes' if m.signature else 'no'}")
    for path in result.dropped_secrets:
        typer.echo(f"  dropped: {path} (credentials)")


@app.command("validate")
def validate(
    config: Annotated[Path, typer.Argument(help="A UnitedLLM/FedML config file (fedml_config.yaml)")],
    set_options: Annotated[
        list[str] | None, typer.Option("--set", help="Override a value, e.g. --set train_args.comm_round=3")
    ] = None,
) -> None:
    """Check a config file; print each problem as 'path: message' (exit 2) or OK (exit 0)."""
    from unitedllm_build.config_check import check_config

    try:
        check_config(config, set_options or [])
    except UnitedLLMError as exc:
        raise _fail(exc) from None
    typer.echo(f"OK: {config} is a valid UnitedLLM config")


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project (created if missing)")],
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder")] = False,
) -> None:
    """Create a ready UnitedLLM project: config, bootstrap.sh, launch.py and run scripts."""
    from unitedllm_build.scaffold import create_project

    try:
        created = create_project(directory, force=force)
    except UnitedLLMError as exc:
        raise _fail(exc) from None
    typer.echo(f"Created a UnitedLLM project in {directory} ({len(created)} files). Next:")
    typer.echo(f"  cd {directory}")
    typer.echo("  unitedllm-build validate config/fedml_config.yaml")
    typer.echo("  bash scripts/build.sh            # build/dist-packages/{server,client}-package.zip")
    typer.echo(
        f"  export {SECRET_ENV}=...      # before building: signs the packages, and package run checks it"
    )
    typer.echo("  unitedllm package run build/dist-packages/server-package.zip --rank 0 --run-id $RUN_ID")


@app.command("push")
def push(
    package: Annotated[Path, typer.Argument(help="server-package.zip or client-package.zip")],
    platform: Annotated[
        str | None, typer.Option("--platform", help="Platform URL (or $UNITEDLLM_PLATFORM_URL)")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Admin token (or $UNITEDLLM_PLATFORM_TOKEN)")
    ] = None,
) -> None:
    """Upload a package to a UnitedLLM platform, which verifies it, stores it by digest and signs it."""
    from unitedllm.platform.client import PlatformClient

    try:
        with PlatformClient(platform, token) as client:
            info = client.push(package)
    except UnitedLLMError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"pushed {package}: {info['kind']} package {info['digest']} ({info['size']} bytes), signed by the platform"
    )


def main() -> None:
    """Entry point of the ``unitedllm-build`` script."""
    app()


def _setup_logging() -> None:
    """The build says only what needs a look (``warning: ...``); secrets masked."""
    setup_logging(False, handler=line_handler("warning: %(message)s"), level=logging.WARNING)
