"""`unitedllm platform demo --until-finished`: the quickstart through the whole platform, as processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from platform_helpers import assert_loads_over_its_base
from services import missing_service_binaries

pytestmark = pytest.mark.services

ADAPTER = Path("node_0") / "final" / "adapter_model.safetensors"


def test_demo_runs_the_quickstart_to_finished_with_the_same_model_as_unitedllm_run(tmp_path: Path) -> None:
    reason = missing_service_binaries()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"real services are needed under CI: {reason}")
        pytest.skip(reason)
    workdir = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    demo = subprocess.run(
        [sys.executable, "-m", "unitedllm", "platform", "demo", "--until-finished", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    lines = demo.stdout.splitlines()
    assert any("pushed and signed" in line for line in lines)
    final = re.fullmatch(r"(run-\w+) FINISHED; final model: .*", lines[-1])
    assert final is not None, demo.stdout
    run_id = final.group(1)
    assert re.findall(rf"^{run_id}  round (\d+): aggregated \[1, 2\]", demo.stdout, re.MULTILINE) == [
        "0",
        "1",
    ]
    # Each role logged in to the broker as its own device, under the ACLs the controller wrote.
    broker_log = (workdir / "services" / "mosquitto" / "mosquitto.log").read_text()
    assert len(set(re.findall(r"as unitedllm-\S+ \(.*u'(device-\w+)'\)", broker_log))) == 3
    for rank in (0, 1, 2):
        states = re.findall(rf"^{run_id}\s+rank {rank} \(\S+\)\s+(\w+)", demo.stdout, re.MULTILINE)
        assert states == ["INITIALIZING", "RUNNING", "FINISHED"], demo.stdout

    # The same project config, one process, no platform: the same final adapter bytes.
    project = workdir / "project"
    local = subprocess.run(
        [sys.executable, "-m", "unitedllm", "run", "config/fedml_config.yaml", "--quiet", "--run-id", run_id,
         "--set", "comm_args.backend=LOCAL", "--set", f"train_args.output_dir={tmp_path}/local/{{run_id}}"],
        cwd=project, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    ours, theirs = workdir / "out" / run_id / ADAPTER, tmp_path / "local" / run_id / ADAPTER
    assert ours.read_bytes() == theirs.read_bytes()

    # The exported final model, downloaded from the platform, is that adapter and loads over the base.
    zip_path = workdir / f"{run_id}-model.zip"
    serve = f"unzip {zip_path.name} && unitedllm serve {run_id}-model"
    assert f"{run_id}  exported model: {zip_path}; serve it with: {serve}" in demo.stdout
    exported = assert_loads_over_its_base(zip_path, tmp_path / "unzipped")
    assert (exported / "adapter_model.safetensors").read_bytes() == ours.read_bytes()

    # Everything the demo started has stopped: no process still runs from its folder.
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
