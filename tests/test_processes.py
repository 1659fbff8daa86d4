"""Process-level runs over real MQTT + S3: same result as in-process, and survival of killed nodes.

Every node is a real ``unitedllm server`` / ``unitedllm client`` process talking to the session's
mosquitto and SeaweedFS (tests/conftest_services.py). Faults are real SIGKILLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_procs import NodeProcesses
from services import service_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_processes.yaml"
ADAPTER = Path("node_0") / "final" / "adapter_model.safetensors"
RUN_LIMIT_S = 300  # a whole tiny run takes ~10-40 s on two shared cores

pytestmark = [pytest.mark.services, pytest.mark.slow]


class Federation(NodeProcesses):
    """Starts a run's nodes as ``unitedllm server``/``client`` processes; kills whatever is left at the end."""

    run_limit_s = RUN_LIMIT_S

    def __init__(self, tmp: Path, run_id: str, env: dict[str, str], overrides: list[str]) -> None:
        super().__init__(tmp, tmp / "out" / run_id)
        self.run_id = run_id
        self.env = env
        self.overrides = overrides

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        sets = [x for o in self.overrides for x in ("--set", o)]
        argv = [sys.executable, "-m", "unitedllm", *args, str(CONFIG), "--run-id", self.run_id, *sets]
        return self.spawn(name, argv, env=self.env, cwd=ROOT)

    def server(self, *extra: str) -> subprocess.Popen[bytes]:
        return self._start("server", "server", *extra)

    def client(self, rank: int) -> subprocess.Popen[bytes]:
        return self._start(f"client{rank}", "client", "--rank", str(rank))


@pytest.fixture
def federation(
    request: pytest.FixtureRequest, tmp_path: Path, run_id: str
) -> Iterator[Callable[..., Federation]]:
    """A factory of process federations on the session's mosquitto + SeaweedFS; kills leftovers."""
    mqtt = request.getfixturevalue("mqtt_settings")
    s3 = request.getfixturevalue("s3_settings")
    made: list[Federation] = []

    def make(*overrides: str, name: str = "mqtt") -> Federation:
        env = {
            **os.environ,
            **service_env(mqtt, s3),
            "UNITEDLLM_RUN_SECRET": "processes-test-secret",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        tmp = tmp_path / name
        tmp.mkdir()
        fed = Federation(
            tmp,
            f"{run_id}-{name}",
            env,
            [
                f"train_args.output_dir={tmp}/out/{{run_id}}",
                f"data_args.cache_dir={tmp_path}/cache",
                *overrides,
            ],
        )
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.kill_all()


def run_local(tmp: Path, run_id: str, *overrides: str) -> Path:
    """The same config run in one process with the LOCAL backend; returns its output dir."""
    sets = [
        x
        for o in (
            "comm_args.backend=LOCAL",
            f"train_args.output_dir={tmp}/out/{{run_id}}",
            f"data_args.cache_dir={tmp}/cache",
            *overrides,
        )
        for x in ("--set", o)
    ]
    done = subprocess.run(
        [sys.executable, "-m", "unitedllm", "run", str(CONFIG), "--run-id", run_id, "-q", *sets],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=RUN_LIMIT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return tmp / "out" / run_id


def run_processes(fed: Federation, clients: int = 2) -> None:
    server = fed.server()
    nodes = [fed.client(rank) for rank in range(1, clients + 1)]
    codes = [fed.wait(p) for p in (server, *nodes)]
    assert codes == [0] * (clients + 1), fed.logs()


def compare_adapters(a: Path, b: Path) -> str:
    """Why two adapter files differ, tensor by tensor (for the failure message)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f"different tensor names: {sorted(ta.keys() ^ tb.keys())[:5]}"
    diffs = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta}
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    return f"{sum(v > 0 for v in diffs.values())}/{len(diffs)} tensors differ; largest max|diff|: {worst}"


# ---- 1. equivalence ------------------------------------------------------------------------------------


def test_processes_over_mqtt_s3_give_the_same_adapter_as_one_local_process(
    federation: Callable[..., Federation], tmp_path: Path
) -> None:
    fed = federation()
    run_processes(fed)
    local = run_local(tmp_path / "local", "local-equivalence")
    assert fed.aggregated() == {0: [1, 2], 1: [1, 2], 2: [1, 2]}
    ours, theirs = fed.output_dir / ADAPTER, local / ADAPTER
    assert ours.is_file() and theirs.is_file()
    assert ours.read_bytes() == theirs.read_bytes(), compare_adapters(ours, theirs)


# ---- 2. a client killed mid-round ---------------------------------------------------------------------

# Long enough local training (~5 s a round here) that the kill lands while rank 2 trains round 1;
# quorum 1 lets rank 1 go on alone.
SLOW_ROUNDS = (
    "train_args.local_max_steps=400",
    "comm_args.min_updates_per_round=1",
    "comm_args.round_timeout_s=60",
)


def kill_rank_2_in_round_1(fed: Federation) -> subprocess.Popen[bytes]:
    """Start a server and two clients, SIGKILL rank 2 once round 1 started; check round 1 went on without it."""
    server = fed.server()
    fed.client(1)
    victim = fed.client(2)
    fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1, timeout=RUN_LIMIT_S)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    round_1 = fed.wait_for(lambda e: e.get("event") == "round" and e.get("round") == 1, timeout=120)
    assert round_1["aggregated"] == [1], "round 1 aggregates the surviving client only"
    # The last will marks rank 2 offline, so the round does not wait out its 60 s deadline.
    server_log = fed.log("server")
    assert "round 1: clients [2] went offline" in server_log, server_log[-3000:]
    assert "round 1: deadline passed" not in server_log, "the aggregator waited out the deadline"
    return server


def test_killed_client_is_left_out_and_the_run_completes(federation: Callable[..., Federation]) -> None:
    fed = federation("train_args.comm_round=3", *SLOW_ROUNDS)
    server = kill_rank_2_in_round_1(fed)
    assert fed.wait(server) == 0, fed.logs()
    assert fed.aggregated() == {0: [1, 2], 1: [1], 2: [1]}
    assert (fed.output_dir / ADAPTER).is_file()
    assert fed.events("run_end")


def test_client_restarted_in_the_same_round_rejoins(federation: Callable[..., Federation]) -> None:
    fed = federation("train_args.comm_round=5", *SLOW_ROUNDS)
    server = kill_rank_2_in_round_1(fed)
    rejoined = fed.client(2)  # same rank again, back while round 2 runs
    assert fed.wait(server) == 0, fed.logs()
    rounds = fed.aggregated()
    assert sorted(rounds) == list(range(5)) and rounds[1] == [1]
    assert rounds[4] == [1, 2], (
        f"the restarted rank 2 never made it back into a round: {rounds}\n{fed.logs()}"
    )
    assert fed.wait(rejoined, timeout=60) == 0, fed.logs()


def test_client_restarted_rounds_later_rejoins(federation: Callable[..., Federation]) -> None:
    fed = federation("train_args.comm_round=5", *SLOW_ROUNDS)
    server = kill_rank_2_in_round_1(fed)
    fed.wait_for(lambda e: e.get("event") == "round" and e.get("round") == 2, timeout=120)
    rejoined = fed.client(2)  # back after round 2 closed without it
    assert fed.wait(server) == 0, fed.logs()
    rounds = fed.aggregated()
    assert rounds[2] == [1]
    assert rounds[4] == [1, 2], (
        f"the restarted rank 2 never made it back into a round: {rounds}\n{fed.logs()}"
    )
    assert fed.wait(rejoined, timeout=60) == 0, fed.logs()


# ---- 3. the aggregator killed and resumed ------------------------------------------------------------


def test_aggregator_killed_after_round_2_of_4_resumes_to_the_same_adapter(
    federation: Callable[..., Federation], tmp_path: Path
) -> None:
    four_rounds = "train_args.comm_round=4"
    fed = federation(four_rounds, name="resumed")
    server = fed.server()
    clients = [fed.client(1), fed.client(2)]
    # Rounds count from 0 on the wire: round 1 closing is the second of four.
    fed.wait_for(lambda e: e.get("event") == "round" and e.get("round") == 1, timeout=RUN_LIMIT_S)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    assert all(c.poll() is None for c in clients), "clients wait for the aggregator to come back"
    resumed = fed.server("--resume")
    codes = [fed.wait(p) for p in (resumed, *clients)]
    assert codes == [0, 0, 0], fed.logs()
    assert [e["round"] for e in fed.events("resume")] == [1], (
        "the restarted aggregator resumed after round 2 of 4"
    )
    assert fed.aggregated() == {0: [1, 2], 1: [1, 2], 2: [1, 2], 3: [1, 2]}

    local = run_local(tmp_path / "local", "local-resume", four_rounds)
    ours, theirs = fed.output_dir / ADAPTER, local / ADAPTER
    assert ours.read_bytes() == theirs.read_bytes(), compare_adapters(ours, theirs)
    # Each client also holds the final model, byte-identical to the aggregator's.
    for rank in (1, 2):
        theirs_final = fed.output_dir / f"node_{rank}" / "final" / "adapter_model.safetensors"
        assert theirs_final.read_bytes() == ours.read_bytes()
