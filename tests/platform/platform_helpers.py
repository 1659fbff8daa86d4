"""Helpers of the platform tests: controller and agent processes, the sleeper role, waiting.

Roles come from "sleeper" packages built by ``unitedllm-build``: their entry point prints a few
lines, reports which rank keys it was given (names only), ticks ``train_args.local_max_steps``
times 0.2 s and exits with ``common_args.random_seed`` as its code; with ``train_args.seed=99`` it
ignores SIGTERM (config keys, so the overrides pass the checks ``unitedllm package run`` makes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from unitedllm.devservices import free_port
from unitedllm.platform.client import PlatformClient

SLEEPER = """
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv if "=" in a and not a.startswith("-"))
rank = sys.argv[sys.argv.index("--rank") + 1]
keys = sorted(k for k in os.environ if k.startswith("UNITEDLLM_RANK_KEY_"))
print(f"sleeper rank {rank} started; keys: {','.join(keys)}; run secret set: {'UNITEDLLM_RUN_SECRET' in os.environ}", flush=True)
run_id = sys.argv[sys.argv.index("--run_id") + 1]
if args.get("train_args.seed") == "99":  # a role that will not stop when asked
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
metrics = None
if rank == "0":  # the aggregator's metrics.jsonl: one round every 5 ticks, as the platform reads it
    from pathlib import Path
    out = Path(".logs/UnitedLLM") / run_id
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("a")
for tick in range(int(args.get("train_args.local_max_steps", "10"))):
    print(f"tick {tick}", flush=True)
    if metrics is not None and tick % 5 == 4:
        event = {"event": "round", "round": tick // 5, "rank": 0, "time": time.time(), "selected": [1, 2], "aggregated": [1, 2], "train_loss": 5.0 / (tick + 1), "eval_loss": None, "seconds": 1.0}
        metrics.write(json.dumps(event) + "\\n")
        metrics.flush()
    time.sleep(0.2)
sys.exit(int(args.get("common_args.random_seed", "0")))
"""


def build_quickstart_packages(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A project ``unitedllm-build init`` made in ``tmp_path``, and the server and client packages its
    ``scripts/build.sh`` builds."""
    project = tmp_path / "project"
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "unitedllm-build"), "init", str(project)], check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", "scripts/build.sh"], cwd=project, check=True, capture_output=True, env=env)
    dist = project / "build" / "dist-packages"
    return project, dist / "server-package.zip", dist / "client-package.zip"


def wait_until(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    """The first truthy ``check()`` within ``timeout``; fails naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@dataclass
class Controller:
    """A ``unitedllm platform serve`` process; :meth:`restart` keeps its data folder and port."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    token: str = ""
    args: tuple[str, ...] = ("--heartbeat-s", "1")  # more ``platform serve`` options

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / "controller.log"

    def start(self) -> None:
        token_file = self.data_dir.parent / "admin.token"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "unitedllm", "platform", "serve", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), *self.args],
                env={**self.env, "UNITEDLLM_PLATFORM_ADMIN_TOKEN_FILE": str(token_file)},
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until("the controller to answer", self._healthy, timeout=60)
        self.token = self.token or token_file.read_text().strip()

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"controller exited: {self.log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200
        return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self, token: str | None = None) -> PlatformClient:
        return PlatformClient(self.url, token or self.token)


@dataclass
class AgentProcess:
    """A ``unitedllm agent`` process with its state folder."""

    name: str
    role: str
    state_dir: Path
    env: dict[str, str]
    url: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.state_dir.parent / f"{self.name}.log"

    @property
    def device_id(self) -> str:
        return str(json.loads((self.state_dir / "enrolment.json").read_text())["device_id"])

    def start(self, token: str | None = None) -> None:
        enrol = ["--platform", self.url, *(["--enrol", token] if token else [])]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "unitedllm", "agent", *enrol, "--role", self.role, "--name", self.name,
                 "--state-dir", str(self.state_dir), "--heartbeat-s", "1", "--stop-roles-on-exit"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def role_record(self) -> dict[str, Any] | None:
        path = self.state_dir / "role.json"
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
        return None

    def kill(self) -> None:
        """SIGKILL: the agent dies at once and its role (in a session of its own) keeps running."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch(
    client: PlatformClient, packages: dict[str, str], *sets: str, clients: tuple[str, ...] = ("c1", "c2")
) -> str:
    run = client.launch(
        server_package=packages["server"],
        client_package=packages["client"],
        server_device="agg",
        client_devices=list(clients),
        overrides=list(sets),
    )
    return str(run["id"])


def wait_running(client: PlatformClient, run_id: str, timeout: float = 120.0) -> None:
    """Until every rank of the run reports RUNNING; the failure shows the run and its events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.run(run_id)
        if all(m["state"] == "RUNNING" for m in run["members"]):
            return
        time.sleep(0.2)
    pytest.fail(f"run {run_id} not running: {run}\n{client.events(run_id)}")


def wait_for_state(
    client: PlatformClient, run_id: str, *states: str, timeout: float = 120.0
) -> dict[str, Any]:
    return dict(
        wait_until(
            f"run {run_id} to be {'/'.join(states)}",
            lambda: (r := client.run(run_id))["state"] in states and r,
            timeout,
        )
    )


def assert_loads_over_its_base(zip_path: Path, into: Path) -> Path:
    """Unzip an exported model the platform handed out and load it with ``PeftModel.from_pretrained``
    over the base its adapter config names, with its tokenizer and chat template; returns its folder."""
    import zipfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(into)
    (folder,) = into.iterdir()
    assert folder.name == zip_path.name.removesuffix(".zip")
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
    assert any("lora_" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "Hi" in prompt
    for name in ("README.md", "unitedllm_export.json", "prompt_template.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    return folder


def controller_core(path: Path, samples_kept: int = 720) -> Any:
    """The controller's core (no HTTP, no store) on a SQLite file: for rules that need no process."""
    from unitedllm.comm.settings import S3Settings
    from unitedllm.platform import signing
    from unitedllm.platform.controller import Controller as ControllerCore
    from unitedllm.platform.db import Database
    from unitedllm.platform.store import PackageStore

    db = Database(f"sqlite:///{path}")
    db.upgrade()
    store = PackageStore(S3Settings("http://127.0.0.1:9", "unused", "unused", "unused"))
    return ControllerCore(
        db, keys=signing.KeyPair.generate(), master_secret=b"m" * 32, store=store, samples_kept=samples_kept
    )
