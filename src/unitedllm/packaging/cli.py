"""``unitedllm package``: verify and run packages built by ``unitedllm-build`` (mounted by the main CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unitedllm.errors import UnitedLLMError
from unitedllm.log_setup import line_handler, setup_logging
from unitedllm.packaging.archive import DEFAULT_MAX_BYTES
from unitedllm.packaging.manifest import SECRET_ENV, read_package_secret

__all__ = ["package_app"]


package_app = typer.Typer(
    name="package",
    help="Verify and run server/client packages built by unitedllm-build.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(exc: UnitedLLMError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


MaxSize = Annotated[
    int, typer.Option("--max-size-mb", min=1, help="Refuse packages that unpack to more than this many MiB.")
]
AllowUnauthenticated = Annotated[
    bool,
    typer.Option(
        "--allow-unauthenticated",
        help="Accept a package with no valid signature under a package secret (its files and manifest"
        " could both have been rewritten).",
    ),
]
SecretFile = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        help=f"File holding the package secret; the manifest must be signed with it (or set ${SECRET_ENV}).",
    ),
]


@package_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_command(
    ctx: typer.Context,
    package: Annotated[Path, typer.Argument(help="server-package.zip or client-package.zip")],
    rank: Annotated[
        int, typer.Option("--rank", help="0 for the aggregator (server package), 1..N for clients")
    ],
    run_id: Annotated[
        str, typer.Option("--run-id", "--run_id", help="Run id shared by every node of the run")
    ],
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Where to unpack (default .unitedllm/packages/<run_id>/rank_<N>)"),
    ] = None,
    max_size_mb: MaxSize = DEFAULT_MAX_BYTES // 2**20,
    secret_file: SecretFile = None,
    allow_unauthenticated: AllowUnauthenticated = False,
) -> None:
    """Verify every digest and the signature, unpack safely, run the bootstrap, then start the entry point.

    Arguments after ``--`` go to the entry point (e.g. ``-- --set comm_args.mqtt.host=broker``).
    """
    from unitedllm.packaging.runner import run_package  # keeps `unitedllm --help` light

    _setup_logging()
    try:
        code = run_package(
            package,
            rank=rank,
            run_id=run_id,
            workdir=workdir,
            extra_args=list(ctx.args),
            secret=read_package_secret(secret_file),
            allow_unauthenticated=allow_unauthenticated,
            max_bytes=max_size_mb * 2**20,
        )
    except UnitedLLMError as exc:
        raise _fail(exc) from None
    if code != 0:
        typer.echo(f"error: entry point exited with code {code}", err=True)
    raise typer.Exit(code)


@package_app.command("verify")
def verify_command(
    package: Annotated[Path, typer.Argument(help="server-package.zip or client-package.zip")],
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Where to unpack (default: a temp folder)")
    ] = None,
    max_size_mb: MaxSize = DEFAULT_MAX_BYTES // 2**20,
    secret_file: SecretFile = None,
    allow_unauthenticated: AllowUnauthenticated = False,
) -> None:
    """Check a package's safety, every file digest and its signature without running anything.

    Exit 2 when any check fails, including an unauthenticated package (no valid signature under
    a package secret) unless --allow-unauthenticated is given; the output says which it is.
    """
    import tempfile

    from unitedllm.packaging.runner import prepare_package

    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = prepare_package(
                package,
                workdir or Path(tmp),
                secret=read_package_secret(secret_file),
                allow_unauthenticated=allow_unauthenticated,
                max_bytes=max_size_mb * 2**20,
            )
            m = prepared.manifest
            trust = (
                "signed under the package secret"
                if prepared.authenticated
                else "UNAUTHENTICATED: no valid signature under a package secret, so its files and"
                " manifest could both have been rewritten"
            )
            typer.echo(
                f"OK: {package} is a verified {m.package_type} package: {len(m.files)} files,"
                f" {m.total_size} bytes, entry {m.entry_point}, unitedllm {m.unitedllm_version}; {trust}"
            )
    except UnitedLLMError as exc:
        raise _fail(exc) from None


def _setup_logging() -> None:
    """``LEVEL logger: message`` lines for ``package run``; libraries quiet, secrets masked."""
    setup_logging(False, handler=line_handler("%(levelname)s %(name)s: %(message)s"))
