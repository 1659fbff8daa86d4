"""Packages end to end in the default run: ``unitedllm-build init``, the project's own build script,
then one ``unitedllm package run`` process per package over the session's mosquitto + SeaweedFS.

The longer two-round version is ``test_package_run.py``'s slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import service_env

pytestmark = pytest.mark.services

LIMIT_S = 600  # only a hung run takes this long
VENV_BIN = Path(sys.executable).parent


def test_server_and_client_packages_built_by_the_init_project_finish_a_run(
    request: pytest.FixtureRequest, tmp_path: Path, run_id: str
) -> None:
    mqtt = request.getfixturevalue("mqtt_settings")
    s3 = request.getfixturevalue("s3_settings")
    env = {
        **os.environ,
        **service_env(mqtt, s3),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "UNITEDLLM_RUN_SECRET": "package-e2e-secret",
        "UNITEDLLM_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    project = tmp_path / "proj"
    init = subprocess.run(
        [str(VENV_BIN / "unitedllm-build"), "init", str(project)], env=env, capture_output=True, check=False
    )
    assert init.returncode == 0, init.stderr.decode(errors="replace")
    build = subprocess.run(
        ["bash", "scripts/build.sh"], cwd=project, env=env, capture_output=True, check=False
    )
    assert build.returncode == 0, build.stderr.decode(errors="replace")
    dist = project / "build" / "dist-packages"
    out = tmp_path / "out"

    def start(package: str, rank: int) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"node{rank}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "unitedllm.packaging", "run", str(dist / package),
                "--rank", str(rank), "--run-id", run_id, "--workdir", str(tmp_path / f"node{rank}"),
                "--allow-unauthenticated",  # the template's build script signs nothing
                "--", "--set", "train_args.comm_round=1", "--set", f"train_args.output_dir={out}/{{run_id}}",
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        return proc

    nodes = [start("server-package.zip", 0), start("client-package.zip", 1), start("client-package.zip", 2)]
    try:
        codes = [node.wait(timeout=LIMIT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=30)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("*.log"))
    assert codes == [0, 0, 0], logs
    run_dir = out / run_id
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["round"], e["aggregated"]) for e in events if e["event"] == "round"] == [(0, [1, 2])]
    assert any(e["event"] == "run_end" for e in events)
    final = run_dir / "node_0" / "final" / "adapter_model.safetensors"
    assert final.is_file(), "the aggregator saves the final global model"
    for rank in (1, 2):  # each client holds the same final model
        assert (run_dir / f"node_{rank}" / "final" / final.name).read_bytes() == final.read_bytes()
