"""Process federations for fault tests: nodes as real processes on real mosquitto + SeaweedFS.

Each node is ``python -m faults.node`` (the linear trainer, so a run takes seconds); every rank
gets its own key the way the platform hands them out (the aggregator all of them, a client only
its own). :func:`reference_model` runs the same config undisturbed in one process, for the
byte-for-byte comparison.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from node_procs import Event, NodeProcesses

TESTS = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 150
MODEL = Path("node_0") / "final" / "model.safetensors"

__all__ = ["MODEL", "Event", "Federation", "reference_model", "run_config"]


def run_config(tmp: Path, *, clients: int = 2, rounds: int = 3, **comm: Any) -> dict[str, Any]:
    """A small linear-trainer run over MQTT_S3 (connection settings come from the environment)."""
    return {
        "train_args": {
            "client_num_in_total": clients,
            "client_num_per_round": clients,
            "comm_round": rounds,
            "local_max_steps": 4,
            "output_dir": str(tmp / "out" / "{run_id}"),
        },
        "validation_args": {"is_aggregator_test": False, "test_on_clients": "no"},
        "tracking_args": {"log_system_metrics": False},
        "comm_args": {"backend": "MQTT_S3", "round_timeout_s": 120, "join_timeout_s": 60, **comm},
    }


class Federation(NodeProcesses):
    """A run's nodes as ``faults.node`` processes, each logging to a file; whatever is left is killed at the end."""

    run_limit_s = RUN_LIMIT_S
    log_tail_chars = 2500

    def __init__(
        self,
        tmp: Path,
        run_id: str,
        raw: Mapping[str, Any],
        env: Mapping[str, str],
        *,
        shared_secret: str | None = None,
    ):
        super().__init__(tmp, Path(str(raw["train_args"]["output_dir"]).replace("{run_id}", run_id)))
        self.run_id = run_id
        self.config = tmp / "run.yaml"
        self.config.write_text(yaml.safe_dump(dict(raw)))
        self.clients = int(raw["train_args"]["client_num_in_total"])
        self.keys = {rank: f"key-of-rank-{rank}-{run_id}" for rank in range(1, self.clients + 1)}
        self.env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("UNITEDLLM_RUN_SECRET", None)
        self.shared_secret = shared_secret
        if shared_secret is not None:  # the old way: one key for every rank, no per-rank keys
            self.env["UNITEDLLM_RUN_SECRET"] = shared_secret

    def node(self, rank: int, *extra: str, sleep_s: float = 0.0) -> subprocess.Popen[bytes]:
        keys = {} if self.shared_secret is not None else self.keys if rank == 0 else {rank: self.keys[rank]}
        env = {**self.env, "FAULT_FIT_SLEEP_S": str(sleep_s)}
        env.update({f"UNITEDLLM_RANK_KEY_{r}": key for r, key in keys.items()})
        argv = [sys.executable, "-m", "faults.node", str(self.config), str(rank), self.run_id, *extra]
        return self.spawn(f"rank{rank}", argv, env=env, cwd=TESTS)


def reference_model(tmp: Path, raw: Mapping[str, Any]) -> bytes:
    """The final model of the same run, undisturbed, in one process (LOCAL backend)."""
    from linear_trainer import LinearTrainer

    from unitedllm.config import load_config
    from unitedllm.runner import run_async

    local = {**raw, "comm_args": {"backend": "LOCAL"}}
    local["train_args"] = {**raw["train_args"], "output_dir": str(tmp / "reference" / "{run_id}")}
    cfg = load_config(local, run_id="reference")
    result = asyncio.run(run_async(cfg, run_id="reference", trainer_factory=lambda _c, r: LinearTrainer(r)))
    return (result.final_dir / "model.safetensors").read_bytes()
