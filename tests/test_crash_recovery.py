"""Crash recovery in the default run: real processes over real MQTT + S3, real SIGKILLs, a small model.

Each node is its own process (``tests/linear_node.py``: the public ``Aggregator``/``Client``
with the plain-PyTorch trainer), talking to the session's mosquitto and SeaweedFS. Clients
hold each round at a gate the test opens, so a kill lands at a known point of the run; every
wait is for an event (a line in ``metrics.jsonl``, a gate marker), bounded only against a hang.
The Hugging Face versions of these runs are in ``test_processes.py`` (``nox -s slow``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from linear_trainer import LinearTrainer
from services import service_env

from unitedllm.config import load_config
from unitedllm.runner import run_async

pytestmark = pytest.mark.services

NODE = Path(__file__).resolve().parent / "linear_node.py"
LIMIT_S = 180  # only a hung run takes this long
MODEL = Path("node_0") / "final" / "model.safetensors"

Event = dict[str, Any]


class Nodes:
    """A run's nodes as processes; waits on their metrics and gate markers; kills leftovers."""

    def __init__(self, tmp: Path, run_id: str, env: dict[str, str], settings: dict[str, Any]) -> None:
        self.tmp, self.run_id, self.env = tmp, run_id, env
        self.gates = tmp / "gates"
        self.gates.mkdir()
        self.output_dir = tmp / "out" / run_id
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, role: str, rank: int = 0, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{role}{rank}-{len(self.procs)}.log").open("wb")
        args = ["--rank", str(rank), "--gates", str(self.gates)] if role == "client" else []
        proc = subprocess.Popen(
            [sys.executable, str(NODE), role, str(self.config), "--run-id", self.run_id, *args, *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def open_gate(self, *rounds: int) -> None:
        for round_idx in rounds:
            (self.gates / f"open-{round_idx}").touch()

    def events(self, kind: str) -> list[Event]:
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:  # being written right now
                continue
        return [e for e in found if e.get("event") == kind]

    def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        """Until ``done()``; fails at once when every node has exited, or after LIMIT_S (a hang)."""
        deadline = time.monotonic() + LIMIT_S
        while not done():
            if all(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                pytest.fail(f"never saw {what}\n{self.logs()}")
            time.sleep(0.02)

    def entered(self, rank: int, round_idx: int) -> bool:
        return (self.gates / f"entered-{rank}-{round_idx}").exists()

    def round_closed(self, round_idx: int) -> bool:
        return any(e["round"] == round_idx for e in self.events("round"))

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.args!r} still running after {LIMIT_S}s\n{self.logs()}")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def aggregated(self) -> dict[int, list[int]]:
        """Round -> ranks whose updates made that round's aggregate (the last record wins after a resume)."""
        return {e["round"]: e["aggregated"] for e in self.events("round")}

    def log(self, name: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob(f"{name}-*.log")))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def settings(output_dir: Path, **train_args: Any) -> dict[str, Any]:
    return {
        "train_args": {
            "client_num_in_total": 2,
            "client_num_per_round": 2,
            "local_max_steps": 4,
            "output_dir": str(output_dir / "{run_id}"),
            **train_args,
        },
        "comm_args": {"backend": "MQTT_S3", "round_timeout_s": LIMIT_S, "join_timeout_s": LIMIT_S},
    }


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path, run_id: str) -> Iterator[Callable[..., Nodes]]:
    mqtt = request.getfixturevalue("mqtt_settings")
    s3 = request.getfixturevalue("s3_settings")
    env = {
        **os.environ,
        **service_env(mqtt, s3),
        "UNITEDLLM_RUN_SECRET": "crash-recovery-secret",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    made: list[Nodes] = []

    def make(**train_args: Any) -> Nodes:
        comm = train_args.pop("comm_args", {})
        conf = settings(tmp_path / "out", **train_args)
        conf["comm_args"].update(comm)
        made.append(Nodes(tmp_path, run_id, env, conf))
        return made[-1]

    try:
        yield make
    finally:
        for run in made:
            run.stop_all()


def uninterrupted(tmp_path: Path, run: Nodes) -> Path:
    """The same config run in one process over the in-process backend; its final model file."""
    cfg = load_config(run.config, overrides={"comm_args.backend": "LOCAL"})
    result = asyncio.run(
        run_async(cfg, run_id="uninterrupted", trainer_factory=lambda _cfg, rank: LinearTrainer(rank))
    )
    return result.final_dir / "model.safetensors"


def test_aggregator_killed_mid_run_resumes_over_mqtt_s3_to_the_uninterrupted_bytes(
    nodes: Callable[..., Nodes], tmp_path: Path
) -> None:
    run = nodes(comm_round=4)
    server = run.start("server")
    clients = [run.start("client", 1), run.start("client", 2)]
    run.open_gate(0, 1)
    # Round 1 is on disk and both clients are training round 2 when the aggregator dies.
    run.wait_until("round 1 closed", lambda: run.round_closed(1))
    run.wait_until("round 2 started", lambda: run.entered(1, 2) and run.entered(2, 2))
    run.kill(server)
    assert all(c.poll() is None for c in clients), "clients wait for the aggregator to come back"

    resumed = run.start("server", 0, "--resume")
    run.open_gate(2, 3)
    assert [run.wait(p) for p in (resumed, *clients)] == [0, 0, 0], run.logs()
    assert [e["round"] for e in run.events("resume")] == [1]
    assert run.aggregated() == {0: [1, 2], 1: [1, 2], 2: [1, 2], 3: [1, 2]}
    assert not run.events("rejected")
    reference = uninterrupted(tmp_path, run)
    assert (run.output_dir / MODEL).read_bytes() == reference.read_bytes()


def test_killed_client_is_left_out_at_once_and_the_run_completes_with_quorum(
    nodes: Callable[..., Nodes],
) -> None:
    run = nodes(comm_round=3, comm_args={"min_updates_per_round": 1})
    server = run.start("server")
    run.start("client", 1)
    victim = run.start("client", 2)
    run.open_gate(0)
    run.wait_until("both clients in round 1", lambda: run.entered(1, 1) and run.entered(2, 1))
    run.kill(victim)
    run.open_gate(1, 2)
    assert run.wait(server) == 0, run.logs()
    assert run.aggregated() == {0: [1, 2], 1: [1], 2: [1]}
    assert run.events("run_end")
    server_log = run.log("server0")
    # The broker's last will marked rank 2 offline: the rounds did not wait out their deadline.
    assert "clients [2] went offline" in server_log, server_log[-3000:]
    assert "deadline passed" not in server_log
