"""``unitedllm platform``: serve the controller, try it in one command, and script it (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from unitedllm.errors import ConfigError, UnitedLLMError

__all__ = ["platform_app"]

platform_app = typer.Typer(
    name="platform",
    help="The self-hosted MLOps platform: controller, devices, packages and runs.",
    no_args_is_help=True,
    add_completion=False,
)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
packages_app = typer.Typer(help="Pushed packages.", no_args_is_help=True)
runs_app = typer.Typer(help="Federated runs.", no_args_is_help=True)
platform_app.add_typer(devices_app, name="devices")
platform_app.add_typer(packages_app, name="packages")
platform_app.add_typer(runs_app, name="runs")
apps_app = typer.Typer(
    help="Applications: named, versioned server + client package pairs.", no_args_is_help=True
)
projects_app = typer.Typer(help="Projects: the runs of one application.", no_args_is_help=True)
configs_app = typer.Typer(help="Saved hyper-parameter configurations.", no_args_is_help=True)
platform_app.add_typer(apps_app, name="apps")
platform_app.add_typer(projects_app, name="projects")
platform_app.add_typer(configs_app, name="configs")

UrlOpt = Annotated[
    str | None, typer.Option("--platform", help="Controller URL (or $UNITEDLLM_PLATFORM_URL).")
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="API token (or $UNITEDLLM_PLATFORM_TOKEN).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc.render()}", err=True)
        raise typer.Exit(2) from None
    except UnitedLLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if getattr(exc, "status", None) in (400, 404, 409, 422) else 1) from None


def _client(url: str | None, token: str | None) -> Any:
    from unitedllm.platform.client import PlatformClient

    return PlatformClient(url, token)


def _show(value: Any, as_json: bool, row: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        typer.echo(json.dumps(value, indent=2, sort_keys=True))
        return
    for item in value if isinstance(value, list) else [value]:
        typer.echo(row(item))


@platform_app.command("serve")
def serve_command(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Platform key, master secret, SQLite file.")
    ] = Path(".unitedllm/platform"),
    db: Annotated[
        str | None, typer.Option("--db", help="SQLAlchemy URL (default: SQLite in --data-dir).")
    ] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8800,
    heartbeat_s: Annotated[float, typer.Option("--heartbeat-s", help="Expected heartbeat interval.")] = 5.0,
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            "--broker-dir", help="Manage mosquitto's passwd/acl files here (per-device identities)."
        ),
    ] = None,
) -> None:
    """Serve the controller: HTTP API and web page; S3 settings from $UNITEDLLM_S3_*."""
    from unitedllm.platform.server import serve

    with _errors():
        serve(data_dir, db_url=db, host=host, port=port, heartbeat_s=heartbeat_s, broker_dir=broker_dir)


@platform_app.command("demo")
def demo_command(
    until_finished: Annotated[
        bool, typer.Option("--until-finished", help="Exit when the run ends: 0 if FINISHED; stop everything.")
    ] = False,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Keep everything here.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override for the run.")] = None,
) -> None:
    """Local services, the controller and three agents on 127.0.0.1; push the quickstart and launch it."""
    from unitedllm.platform.demo import run_demo

    with _errors():
        code = run_demo(workdir, until_finished=until_finished, overrides=list(set_ or []))
    raise typer.Exit(code)


@platform_app.command("enrol-token")
def enrol_token(
    role: Annotated[str | None, typer.Option("--role", help="client or server (default: either).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a one-time token that enrols one device (`unitedllm agent --enrol TOKEN`)."""
    with _errors(), _client(url, token) as client:
        typer.echo(client.enrol_token(role))


def _device_row(d: dict[str, Any]) -> str:
    state = d["state"] if d.get("approved", True) else "PENDING"
    return f"{d['id']}  {d['name']:<16} {d['role']:<7} {state:<12} {d.get('run_id') or '-'}  key {d['fingerprint']}"


@devices_app.command("list")
def devices_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every enrolled device with its state (OFFLINE when its heartbeats stopped)."""
    with _errors(), _client(url, token) as client:
        _show(client.devices(), as_json, _device_row)


@devices_app.command("show")
def devices_show(ref: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """One device (by id or name) with its hardware and last metrics."""
    with _errors(), _client(url, token) as client:
        _show(client.device(ref), as_json, _device_row)


@devices_app.command("approve")
def devices_approve(ref: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a device that enrolled without a token (check its key fingerprint first)."""
    with _errors(), _client(url, token) as client:
        _show(client.approve(ref), as_json, _device_row)


def _package_row(p: dict[str, Any]) -> str:
    return f"{p['digest'][:16]}  {p['kind']:<7} {p['size']:>10}  {p['name']}"


@packages_app.command("list")
def packages_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Pushed packages (digest, kind, size, name)."""
    with _errors(), _client(url, token) as client:
        _show(client.packages(), as_json, _package_row)


@packages_app.command("push")
def packages_push(
    package: Path, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Upload a package: the platform verifies it, stores it by digest and signs it."""
    with _errors(), _client(url, token) as client:
        _show(client.push(package), as_json, _package_row)


def _run_row(r: dict[str, Any]) -> str:
    members = " ".join(f"{m['rank']}:{m['state']}" for m in r["members"])
    return f"{r['id']}  {r['state']:<12} {members}"


@runs_app.command("create")
def runs_create(
    server: Annotated[str, typer.Option("--server", help="Aggregator device (id or name).")],
    clients: Annotated[list[str], typer.Option("--client", help="Client device, ranks 1..N in order.")],
    project: Annotated[str | None, typer.Option("--project", help="Run the project's application.")] = None,
    config: Annotated[str | None, typer.Option("--config", help="A saved configuration.")] = None,
    server_package: Annotated[str | None, typer.Option("--server-package", help="Digest or prefix.")] = None,
    client_package: Annotated[str | None, typer.Option("--client-package", help="Digest or prefix.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override (repeatable).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Launch a run on chosen devices: a project's application, or packages by digest."""
    if project is None and not (server_package and client_package):
        typer.echo("error: give --project, or both --server-package and --client-package", err=True)
        raise typer.Exit(2)
    fields: dict[str, Any] = {
        "server_device": server,
        "client_devices": clients,
        "overrides": list(set_ or []),
    }
    fields |= {"project": project, "config": config}
    if project is None:
        fields |= {"server_package": server_package, "client_package": client_package}
    with _errors(), _client(url, token) as client:
        _show(client.launch(**fields), as_json, _run_row)


@runs_app.command("list")
def runs_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every run with its state and its members' states."""
    with _errors(), _client(url, token) as client:
        _show(client.runs(), as_json, _run_row)


@runs_app.command("show")
def runs_show(run_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """One run."""
    with _errors(), _client(url, token) as client:
        _show(client.run(run_id), as_json, _run_row)


@runs_app.command("logs")
def runs_logs(
    run_id: str,
    device: Annotated[str | None, typer.Option("--device", help="Only this device's log.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The roles' output, as the agents streamed it."""
    with _errors(), _client(url, token) as client:
        batches = client.logs(run_id, device=device)
        if as_json:
            typer.echo(json.dumps(batches, indent=2))
        else:
            for batch in batches:
                sys.stdout.write(batch["text"])


@runs_app.command("stop")
def runs_stop(run_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Stop every role of a run; it ends KILLED."""
    with _errors(), _client(url, token) as client:
        _show(client.stop(run_id), as_json, _run_row)


@apps_app.command("list")
def apps_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Applications with their versions."""
    with _errors(), _client(url, token) as client:
        _show(client.applications(), as_json, lambda a: f"{a['name']:<20} v{a['versions'][-1]['version']}")


@apps_app.command("save")
def apps_save(
    name: str,
    server_package: Annotated[str, typer.Option("--server-package", help="Digest or prefix.")],
    client_package: Annotated[str, typer.Option("--client-package", help="Digest or prefix.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an application, or add a version with new packages."""
    with _errors(), _client(url, token) as client:
        app = client.save_application(name, server_package=server_package, client_package=client_package)
        _show(app, as_json, lambda a: f"{a['name']:<20} v{a['versions'][-1]['version']}")


@projects_app.command("list")
def projects_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Projects and their applications."""
    with _errors(), _client(url, token) as client:
        _show(client.projects(), as_json, lambda p: f"{p['name']:<20} {p['application']}")


@projects_app.command("create")
def projects_create(
    name: str,
    app: Annotated[str, typer.Option("--app", help="The application its runs use.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a project for an application."""
    with _errors(), _client(url, token) as client:
        _show(client.create_project(name, app), as_json, lambda p: f"{p['name']:<20} {p['application']}")


def _config_row(c: dict[str, Any]) -> str:
    return f"{c['name']:<20} " + " ".join(f"{k}={json.dumps(v)}" for k, v in c["overrides"].items())


@configs_app.command("list")
def configs_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Saved configurations."""
    with _errors(), _client(url, token) as client:
        _show(client.configs(), as_json, _config_row)


@configs_app.command("save")
def configs_save(
    name: str,
    set_: Annotated[list[str], typer.Option("--set", help="KEY=VALUE (repeatable; values are YAML).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or replace a configuration; checked against the config schema."""
    from unitedllm.config.cli_support import parse_set_options

    with _errors(), _client(url, token) as client:
        _show(client.save_config(name, parse_set_options(set_)), as_json, _config_row)


@configs_app.command("delete")
def configs_delete(name: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Delete a saved configuration."""
    with _errors(), _client(url, token) as client:
        client.delete_config(name)
        typer.echo(f"deleted {name}")


@runs_app.command("abort")
def runs_abort(run_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Kill every role of a run at once (no grace period); it ends KILLED."""
    with _errors(), _client(url, token) as client:
        _show(client.abort(run_id), as_json, _run_row)


@runs_app.command("model")
def runs_model(
    run_id: str,
    out: Annotated[Path, typer.Option("--out", help="Folder to save the zip in.")] = Path("."),
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a finished run's final model, exported as `unitedllm export` writes it (a zip)."""
    from unitedllm.platform.final_model import serve_command

    if not out.is_dir():
        typer.echo(f"error: --out {out}: not a folder", err=True)
        raise typer.Exit(2)
    with _errors(), _client(url, token) as client:
        path = client.download_model(run_id, out)
    if as_json:
        typer.echo(json.dumps({"path": str(path), "serve": serve_command(run_id)}, indent=2))
    else:
        typer.echo(f"saved {path}; serve it with: {serve_command(run_id)}")
