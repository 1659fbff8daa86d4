"""``unitedllm platform demo``: the whole platform on 127.0.0.1 in one command.

It starts mosquitto and SeaweedFS, the controller and three agents (one aggregator, two clients)
as separate processes, builds and pushes the quickstart project's packages, launches the run and
prints each state change. With ``until_finished`` it returns 0 once the run is FINISHED (1 if it
ends otherwise) and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from unitedllm.platform.broker import BrokerAccess
from unitedllm.platform.client import PlatformClient
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.final_model import serve_command
from unitedllm.platform.states import TERMINAL

__all__ = ["run_demo"]

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 1800.0
AGENTS = (("aggregator", "server"), ("client-1", "client"), ("client-2", "client"))


class _Processes:
    """The demo's child processes, each logging to its own file; stopped in reverse order."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.env = env
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "unitedllm", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _name, process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # agents stop their roles, then exit
        for _name, process in reversed(self.started):
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PlatformError(f"the controller exited with code {process.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise PlatformError(f"the controller did not answer on {url} within {START_TIMEOUT_S:.0f} s; see {log}")


def _build_quickstart(workdir: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """``unitedllm-build init`` the quickstart project and build its server and client packages."""
    project = workdir / "project"
    if not (project / "build" / "dist-packages" / "client-package.zip").is_file():
        build = [str(Path(sys.executable).parent / "unitedllm-build")]
        subprocess.run([*build, "init", str(project)], env=env, check=True, capture_output=True)
        result = subprocess.run(
            ["bash", "scripts/build.sh"], cwd=project, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise PlatformError(f"building the quickstart packages failed: {result.stderr.strip()[-500:]}")
    dist = project / "build" / "dist-packages"
    return dist / "server-package.zip", dist / "client-package.zip"


@contextlib.contextmanager
def _services(workdir: Path) -> Iterator[dict[str, str]]:
    """mosquitto (devices' identities and ACLs managed by the controller) and SeaweedFS."""
    from unitedllm.devservices import SeaweedS3

    mqtt = _ManagedMosquitto(workdir / "mosquitto", broker_dir=workdir / "broker")
    s3 = SeaweedS3(workdir / "seaweedfs")
    asyncio.run(mqtt.start())
    try:
        asyncio.run(s3.start())
        try:
            yield {
                "UNITEDLLM_MQTT_HOST": HOST,
                "UNITEDLLM_MQTT_PORT": str(mqtt.port),
                "UNITEDLLM_MQTT_USERNAME": mqtt.username,
                "UNITEDLLM_MQTT_PASSWORD": mqtt.password,
                "UNITEDLLM_S3_ENDPOINT_URL": s3.endpoint_url,
                "UNITEDLLM_S3_BUCKET": "unitedllm-platform",
                "UNITEDLLM_S3_ACCESS_KEY_ID": s3.access_key_id,
                "UNITEDLLM_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
            }
        finally:
            asyncio.run(s3.stop())
    finally:
        asyncio.run(mqtt.stop())


def _managed_mosquitto_class() -> type:
    from unitedllm.devservices import Mosquitto

    class ManagedMosquitto(Mosquitto):
        """The dev broker, reading the password and ACL files the controller writes in ``broker_dir``.

        Its own operator account stays in ``passwd.static`` with access to every topic.
        """

        def __init__(self, workdir: Path, *, broker_dir: Path):
            super().__init__(workdir, tls=False)
            self.broker_dir = broker_dir

        def _prepare(self) -> None:
            super()._prepare()
            d = self.broker_dir
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.workdir / "passwd", d / "passwd.static")
            (d / "acl.static").write_text(f"user {self.username}\ntopic readwrite #\n")
            if not (d / "acl").is_file():
                BrokerAccess(d).write({}, [])
            text = self.config_path.read_text().replace(
                f"password_file {self.workdir / 'passwd'}", f"password_file {d / 'passwd'}"
            )
            self.config_path.write_text(text + f"acl_file {d / 'acl'}\npid_file {d / 'mosquitto.pid'}\n")

    return ManagedMosquitto


def _ManagedMosquitto(workdir: Path, *, broker_dir: Path) -> Any:  # noqa: N802 - a class made on first use
    return _managed_mosquitto_class()(workdir, broker_dir=broker_dir)


def _follow(client: PlatformClient, run_id: str, out: IO[str], names: dict[str, str]) -> str:
    """Print each state change of the run until it ends; returns the final state."""
    after, deadline = 0, time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        for event in client.events(run_id, after):
            after = event["id"]
            who = (
                f"rank {event['rank']} ({names.get(event['device_id'], '?')})"
                if event["device_id"]
                else "run"
            )
            detail = f"  {event['detail']}" if event["detail"] else ""
            print(f"{run_id}  {who:<24} {event['state']}{detail}", file=out, flush=True)
        state = str(client.run(run_id)["state"])
        if state in TERMINAL and not client.events(run_id, after):
            return state
        time.sleep(1.0)
    return "TIMEOUT"


def run_demo(
    workdir: Path | None = None,
    *,
    until_finished: bool = False,
    overrides: list[str] | None = None,
    port: int | None = None,
    out: IO[str] | None = None,
) -> int:
    """Run the demo; returns the exit code (0 when the run FINISHED)."""
    from unitedllm.devservices import free_port

    stream = out or sys.stdout
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unitedllm-demo-")))
        workdir = workdir.resolve()
        services_env = stack.enter_context(_services(workdir / "services"))
        env = {**os.environ, **services_env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["UNITEDLLM_PLATFORM_ADMIN_TOKEN_FILE"] = str(workdir / "admin.token")
        port = port or free_port()
        url = f"http://{HOST}:{port}"
        procs = _Processes(workdir / "logs", env)
        stack.callback(procs.stop_all)
        controller = procs.start(
            "controller", "platform", "serve", "--data-dir", str(workdir / "controller"),
            "--port", str(port), "--heartbeat-s", "2", "--broker-dir", str(workdir / "services" / "broker"),
        )  # fmt: skip
        _wait_healthy(url, controller, workdir / "logs" / "controller.log")
        token = (workdir / "admin.token").read_text().strip()
        client = stack.enter_context(PlatformClient(url, token))
        print(f"controller: {url}/ (logs in {workdir / 'logs'})", file=stream, flush=True)
        server_zip, client_zip = _build_quickstart(workdir, env)
        server_pkg, client_pkg = client.push(server_zip), client.push(client_zip)
        print(
            f"pushed and signed: server {server_pkg['digest'][:12]}, client {client_pkg['digest'][:12]}",
            file=stream,
        )
        for name, role in AGENTS:
            procs.start(
                f"agent-{name}", "agent", "--platform", url, "--enrol", client.enrol_token(role), "--role", role,
                "--name", name, "--state-dir", str(workdir / "agents" / name), "--heartbeat-s", "2",
                "--stop-roles-on-exit",
            )  # fmt: skip
        names = _wait_online(client, {n for n, _ in AGENTS})
        run = client.launch(
            server_package=server_pkg["digest"],
            client_package=client_pkg["digest"],
            server_device="aggregator",
            client_devices=["client-1", "client-2"],
            overrides=[f"train_args.output_dir={workdir / 'out'}/{{run_id}}", *(overrides or [])],
        )
        run_id = run["id"]
        print(f"launched {run_id}: watch it at {url}/runs/{run_id}", file=stream, flush=True)
        if not until_finished:
            with contextlib.suppress(KeyboardInterrupt):
                _follow(client, run_id, stream, names)
                print("the run has ended; Ctrl-C stops the demo", file=stream, flush=True)
                while True:
                    time.sleep(3600)
            return 0
        state = _follow(client, run_id, stream, names)
        if state not in TERMINAL:
            client.stop(run_id)
            _follow(client, run_id, stream, names)
        final = workdir / "out" / run_id / "node_0" / "final"
        for row in client.rounds(run_id):
            loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
            print(
                f"{run_id}  round {row['round']}: aggregated {row['aggregated']}, train loss {loss}",
                file=stream,
            )
        if state == "FINISHED":
            try:  # the page's download, as a file here
                model = client.download_model(run_id, workdir)
                print(
                    f"{run_id}  exported model: {model}; serve it with: {serve_command(run_id)}", file=stream
                )
            except PlatformError as exc:
                print(f"{run_id}  no exported model: {exc}", file=stream)
            print(f"{run_id} FINISHED; final model: {final}", file=stream, flush=True)
            return 0
        print(f"{run_id} ended {state}; logs in {workdir / 'logs'}", file=stream, flush=True)
        return 1
    return 1


def _wait_online(client: PlatformClient, names: set[str]) -> dict[str, str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        online = {d["name"]: d["id"] for d in client.devices() if d["online"]}
        if names <= online.keys():
            return {device_id: name for name, device_id in online.items()}
        time.sleep(0.5)
    raise PlatformError(f"agents {sorted(names)} did not come online within {START_TIMEOUT_S:.0f} s")
