"""A client silo of 2 processes (torchrun, DeepSpeed ZeRO-2, ZeRO-3 on CPU) trains like one process,
and an aggregator silo of 2 processes (torchrun) evaluates and saves like one.

Each test starts a real ``unitedllm server`` and ``unitedllm client`` over the session's mosquitto
and SeaweedFS; the client runs as a silo of 2 processes (gloo on CPU; DeepSpeed with
``DS_ACCELERATOR=cpu``). Batch equivalence: 2 ranks x per-device batch 2 see exactly the samples
of 1 rank x batch 4, in the same order (each optimizer step's global batch is split across the
ranks and the loss is averaged over all its tokens), and the optimizer and schedule continue
across rounds, so the final global adapter must match the single-process run's within float
rounding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from services import require, service_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_processes.yaml"
ADAPTER = Path("node_0") / "final" / "adapter_model.safetensors"
LIMIT_S = 400
ONE_CLIENT = [
    "train_args.client_num_in_total=1",
    "train_args.client_num_per_round=1",
    "train_args.comm_round=2",
    "validation_args.test_on_client_ranks=[1]",
]
SILO = ["environment_args.nproc_per_node=2", "train_args.per_device_train_batch_size=2"]
ENGINES = {
    "torchrun": ["environment_args.launcher=torch"],
    "zero2": [
        "environment_args.launcher=deepspeed",
        "train_args.deepspeed=configs/deepspeed/ds_z2_fp32_config.json",
    ],
    "zero3": [
        "environment_args.launcher=deepspeed",
        "train_args.deepspeed=configs/deepspeed/ds_z3_fp32_config.json",
    ],
}

pytestmark = pytest.mark.services


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same client as one process with batch 4 (everything in one process, LOCAL backend)."""
    tmp = tmp_path_factory.mktemp("one-process")
    overrides = [
        "comm_args.backend=LOCAL",
        f"train_args.output_dir={tmp}/out/{{run_id}}",
        f"data_args.cache_dir={tmp}/cache",
        *ONE_CLIENT,
        "train_args.per_device_train_batch_size=4",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "unitedllm", "run", str(CONFIG), "--run-id", "one", "-q", *_sets(overrides)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=LIMIT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return tmp / "out" / "one"


class Run:
    """A server and one client process; their output goes to files; leftovers are killed at the end."""

    def __init__(self, tmp: Path, run_id: str, env: dict[str, str], overrides: list[str]):
        self.tmp, self.run_id, self.env = tmp, run_id, env
        self.overrides = [
            f"train_args.output_dir={tmp}/out/{{run_id}}",
            f"data_args.cache_dir={tmp}/cache",
            # A DeepSpeed silo builds its CPU ops on first start: on a busy machine that alone can pass
            # the example's 60 s join deadline, which these tests are not about.
            "comm_args.join_timeout_s=600",
            *ONE_CLIENT,
            *overrides,
        ]
        self.output_dir = tmp / "out" / run_id
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, silo: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start ``unitedllm <args>``; ``silo`` overrides (launcher settings) apply to this process alone."""
        with (self.tmp / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "unitedllm",
                    *args,
                    str(CONFIG),
                    "--run-id",
                    self.run_id,
                    *_sets(self.overrides),
                    *_sets(list(silo)),
                ],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-4000:]}" for n in self.procs)

    def wait(self, name: str, timeout: float = LIMIT_S) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout:g}s\n{self.logs()}")

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the client passes it on to its launcher
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def events(self, kind: str) -> list[dict[str, Any]]:
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [e for e in map(json.loads, filter(None, lines)) if e.get("event") == kind]


@pytest.fixture
def make_run(request: pytest.FixtureRequest, tmp_path: Path, run_id: str) -> Iterator[Any]:
    mqtt, s3 = request.getfixturevalue("mqtt_settings"), request.getfixturevalue("s3_settings")
    env = {
        **os.environ,
        **service_env(mqtt, s3),
        "UNITEDLLM_RUN_SECRET": "silo-test-secret",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    runs: list[Run] = []

    def make(*overrides: str) -> Run:
        run = Run(tmp_path, run_id, env, list(overrides))
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            run.kill_all()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_process_silo_trains_like_one_process(engine: str, make_run: Any, one_process: Path) -> None:
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        require("deepspeed is not installed (pip install 'unitedllm[deepspeed]'; scripts/setup.sh does)")
    run = make_run("tracking_args.enable_tensorboard=true")
    run.start("server", "server")
    run.start("client", "client", "--rank", "1", silo=[*SILO, *ENGINES[engine]])
    assert [run.wait("server"), run.wait("client")] == [0, 0], run.logs()

    client_log = run.log("client")
    assert "silo of 2 processes" in client_log, client_log[-3000:]
    # The silo leader alone opened the client's trackers: one TensorBoard event file.
    files = list((run.output_dir / "node_1" / "tensorboard").rglob("events.out.tfevents.*"))
    assert [f.parent.name for f in files] == ["client_1"], files
    if engine.startswith("zero"):
        stage = engine[-1]
        found = re.search(
            rf"DeepSpeed ZeRO stage {stage}: (\d+) of (\d+) trainable tensors partitioned", client_log
        )
        assert found, client_log[-3000:]
        partitioned, total = map(int, found.groups())
        assert total > 0 and partitioned == (total if stage == "3" else 0)

    ours, theirs = _adapter(run.output_dir / ADAPTER), _adapter(one_process / ADAPTER)
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    moved = max(float(theirs[k].abs().max()) for k in theirs if "lora_B" in k)  # lora_B starts at zero
    assert worst < 1e-5, f"{engine}: silo adapter differs from the one-process adapter by up to {worst:g}"
    assert moved > 1e3 * 1e-5, "training barely moved the adapter: the comparison would prove nothing"
    # The silo's evaluation of the global model (all ranks scoring shares of the test split) agrees too.
    mine = {(e["round"], e["rank"]): e["loss"] for e in run.events("eval")}
    one = {
        (e["round"], e["rank"]): e["loss"]
        for e in (json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines() if x)
        if e.get("event") == "eval"
    }
    assert mine.keys() == one.keys() and (1, 1) in mine
    assert all(abs(mine[k] - one[k]) < 1e-4 for k in mine), (mine, one)


def _one_process_evals(one_process: Path) -> dict[tuple[int, int], float]:
    lines = (one_process / "metrics.jsonl").read_text().splitlines()
    return {
        (e["round"], e["rank"]): e["loss"]
        for e in map(json.loads, filter(None, lines))
        if e["event"] == "eval"
    }


AGGREGATOR_SILO = ["environment_args.launcher=torch", "environment_args.nproc_per_node=2"]


def test_evaluating_aggregator_runs_as_a_torchrun_silo(make_run: Any, one_process: Path) -> None:
    """A 2-process aggregator (each rank scores half the test split) gives the one-process run's numbers."""
    run = make_run("train_args.per_device_train_batch_size=4", "tracking_args.enable_tensorboard=true")
    run.start("server", "server", silo=AGGREGATOR_SILO)
    run.start("client", "client", "--rank", "1")
    assert [run.wait("server"), run.wait("client")] == [0, 0], run.logs()
    server_log = run.log("server")
    assert "aggregator: silo of 2 processes (torch)" in server_log, server_log[-3000:]
    assert "client 1: launcher python" in run.log("client")

    ours, theirs = _adapter(run.output_dir / ADAPTER), _adapter(one_process / ADAPTER)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    mine = {(e["round"], e["rank"]): e["loss"] for e in run.events("eval")}
    one = _one_process_evals(one_process)
    assert mine.keys() == one.keys() and (0, 0) in mine and (1, 0) in mine
    assert all(abs(mine[k] - one[k]) < 1e-4 for k in mine), (mine, one)
    # The final adapter points at the randomly initialised base that silo rank 0 wrote to node_0/init.
    init = run.output_dir / "node_0" / "init"
    assert (init / "model.safetensors").is_file()
    adapter_config = json.loads((run.output_dir / ADAPTER.parent / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == init.resolve()
    # Only silo rank 0 opened the trackers: one TensorBoard event file per rank it logged for.
    files = list((run.output_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(f.parent.name for f in files) == ["client_1", "server"], files


@pytest.mark.slow
def test_aggregator_silo_resumes(make_run: Any) -> None:
    """--resume reaches the aggregator's silo: round 1 follows round 0, which is not redone."""
    first = make_run("train_args.comm_round=1")
    first.start("server", "server", silo=AGGREGATOR_SILO)
    first.start("client", "client", "--rank", "1")
    assert [first.wait("server"), first.wait("client")] == [0, 0], first.logs()
    more = make_run("train_args.comm_round=2")
    more.start("server-resumed", "server", "--resume", silo=AGGREGATOR_SILO)
    more.start("client-resumed", "client", "--rank", "1")
    assert [more.wait("server-resumed"), more.wait("client-resumed")] == [0, 0], more.logs()
    assert "resuming run" in more.log("server-resumed")
    assert [e["round"] for e in more.events("resume")] == [0]
    assert [e["round"] for e in more.events("round")] == [0, 1]
    assert {(1, 0), (0, 0)} <= {(e["round"], e["rank"]) for e in more.events("eval")}


def _silo_ranks(client_pid: int) -> dict[int, int]:
    """pid of each silo worker under the client process, by its RANK."""
    import psutil

    ranks: dict[int, int] = {}
    for child in psutil.Process(client_pid).children(recursive=True):
        try:
            if "unitedllm.silo.worker" in " ".join(child.cmdline()):
                ranks[int(child.environ()["RANK"])] = child.pid
        except (psutil.NoSuchProcess, KeyError):
            continue
    return ranks


def test_a_dead_follower_ends_the_whole_silo_with_an_error(make_run: Any) -> None:
    pytest.importorskip("psutil")
    run = make_run("train_args.local_max_steps=2000", "comm_args.round_timeout_s=300")
    run.start("server", "server")
    client = run.start("client", "client", "--rank", "1", silo=[*SILO, *ENGINES["torchrun"]])
    # Round 0 has started and both silo ranks are up: the follower dies with the run under way.
    deadline = time.monotonic() + LIMIT_S
    ranks: dict[int, int] = {}
    while time.monotonic() < deadline and client.poll() is None:
        ranks = _silo_ranks(client.pid) if run.events("round_start") else {}
        if sorted(ranks) == [0, 1]:
            break
        time.sleep(0.05)
    assert sorted(ranks) == [0, 1], run.logs()
    os.kill(ranks[1], signal.SIGKILL)
    code = run.wait("client", timeout=120)  # a silo that hangs after losing a rank fails here
    assert code != 0, run.logs()
    log = run.log("client")
    assert "client 1: the torch silo exited with code" in log, log[-3000:]
    assert "Traceback (most recent call last)" not in log.split("the torch silo exited")[-1]
    import psutil

    alive = [
        pid for pid in ranks.values() if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    assert not alive, "a silo process outlived the client"


def test_a_refused_leader_stops_its_followers_and_the_client_fails(make_run: Any) -> None:
    run = make_run()
    run.start("server", "server")
    # Another seed builds another random base model: the aggregator refuses this client.
    client = run.start(
        "client", "client", "--rank", "1", silo=[*SILO, *ENGINES["torchrun"], "common_args.random_seed=7"]
    )
    assert run.wait("client", timeout=LIMIT_S) != 0, run.logs()
    log = run.log("client")
    assert "the aggregator refused this client" in log, log[-3000:]
    assert "silo rank 1 stops too" in log, log[-3000:]
    assert "client 1: the torch silo exited with code" in log
    assert client.returncode == 1
