"""The Kubernetes and Slurm launchers (neither kubectl nor Slurm is installed here): the Job manifest
and the sbatch script they render (parsed: the role's command, rank, environment, and no secret in
them), the one-line error when their tool is missing, and their choice by ``unitedllm agent --launcher``."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unitedllm.agent.cli import make_launcher
from unitedllm.agent.kubernetes import KubernetesLauncher
from unitedllm.agent.launcher import LocalProcessLauncher, RoleSpec
from unitedllm.agent.role import package_run_command
from unitedllm.agent.slurm import SlurmLauncher, exit_code
from unitedllm.platform.errors import PlatformError

RANK_KEY = "rk-2-0123456789abcdef0123456789abcdef"
RUN_SECRET = "rs-0123456789abcdef0123456789abcdef"
BROKER_PASSWORD = "bp-0123456789abcdef0123456789abcdef"
S3_SECRET = "s3-0123456789abcdef0123456789abcdef"
SECRETS = (RANK_KEY, RUN_SECRET, BROKER_PASSWORD, S3_SECRET)


def _spec(tmp_path: Path) -> RoleSpec:
    run_dir = tmp_path / "agent" / "runs" / "run-Abc_123"
    command = package_run_command(
        run_dir / "package.zip", rank=2, run_id="run-Abc_123", workdir=run_dir / "package",
        overrides=["train_args.comm_round=3"],
    )  # fmt: skip
    env = {
        "UNITEDLLM_RANK_KEY_2": RANK_KEY,
        "UNITEDLLM_RUN_SECRET": RUN_SECRET,
        "UNITEDLLM_MQTT_USERNAME": "device-d2",
        "UNITEDLLM_MQTT_PASSWORD": BROKER_PASSWORD,
    }
    return RoleSpec("run-Abc_123", 2, command, run_dir, run_dir / "role.log", env)


AGENT_ENV = {
    "UNITEDLLM_MQTT_HOST": "broker.internal",
    "UNITEDLLM_MQTT_PASSWORD": "operator-password-not-for-roles",
    "UNITEDLLM_S3_SECRET_ACCESS_KEY": S3_SECRET,
    "HOME": "/home/agent",
}


def test_the_kubernetes_job_runs_the_role_with_its_environment_by_secret_reference(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    launcher = KubernetesLauncher(
        image="registry.local/unitedllm:1",
        namespace="fl",
        volume_claim="agent-runs",
        gpus=1,
        check_tool=False,
    )
    text = launcher.render(spec)
    for secret in (*SECRETS, "operator-password-not-for-roles"):
        assert secret not in text
    job = yaml.safe_load(text)
    assert job["kind"] == "Job" and job["metadata"] == {
        "name": "unitedllm-run-abc-123-rank-2",
        "namespace": "fl",
        "labels": {"app.kubernetes.io/name": "unitedllm", "unitedllm/rank": "2"},
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    (container,) = pod["containers"]
    assert container["image"] == "registry.local/unitedllm:1"
    shell, flag, script, name, *command = container["command"]
    assert (shell, flag, name) == ("sh", "-c", "unitedllm-role")
    assert command == [
        "unitedllm", "package", "run", str(spec.workdir / "package.zip"), "--rank", "2", "--run-id", "run-Abc_123",
        "--workdir", str(spec.workdir / "package"), *command[10:],
    ]  # fmt: skip
    assert command[-3:] == ["--", "--set", "train_args.comm_round=3"]
    # The role's output goes to its log, which the agent streams to the platform.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["UNITEDLLM_ROLE_LOG"] == str(spec.log_path) and "$UNITEDLLM_ROLE_LOG" in script
    assert container["envFrom"] == [{"secretRef": {"name": "unitedllm-run-abc-123-rank-2-env"}}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert container["workingDir"] == str(spec.workdir)
    assert container["volumeMounts"] == [{"name": "agent-state", "mountPath": str(spec.workdir.parent)}]
    assert pod["volumes"] == [{"name": "agent-state", "persistentVolumeClaim": {"claimName": "agent-runs"}}]

    # The Secret it references holds the role's keys and broker login (the role's, not the operator's).
    secret = launcher.secret_manifest(spec, AGENT_ENV)
    assert secret["metadata"]["name"] == "unitedllm-run-abc-123-rank-2-env"
    assert secret["stringData"] == {
        "UNITEDLLM_MQTT_HOST": "broker.internal",
        "UNITEDLLM_MQTT_PASSWORD": BROKER_PASSWORD,
        "UNITEDLLM_MQTT_USERNAME": "device-d2",
        "UNITEDLLM_RANK_KEY_2": RANK_KEY,
        "UNITEDLLM_RUN_SECRET": RUN_SECRET,
        "UNITEDLLM_S3_SECRET_ACCESS_KEY": S3_SECRET,
    }


def test_the_sbatch_script_runs_the_role_and_holds_no_secret(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    launcher = SlurmLauncher(
        partition="gpu", time_limit="04:00:00", options=["--gres=gpu:1"], check_tool=False
    )
    script = launcher.script(spec)
    for secret in SECRETS:
        assert secret not in script
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    options = dict(
        line.removeprefix("#SBATCH ").partition("=")[::2] for line in lines if line.startswith("#SBATCH")
    )
    assert options == {
        "--job-name": "unitedllm-run-abc-123-rank-2",
        "--nodes": "1",
        "--ntasks": "1",
        "--chdir": str(spec.workdir),
        "--output": str(spec.log_path),
        "--open-mode": "append",
        "--export": "ALL",
        "--partition": "gpu",
        "--time": "04:00:00",
        "--gres": "gpu:1",
    }
    (run_line,) = [line for line in lines if line.startswith("exec ")]
    assert shlex.split(run_line)[1:] == spec.command
    assert spec.command[:4] == [sys.executable, "-m", "unitedllm.packaging", "run"]
    assert spec.command[spec.command.index("--rank") + 1] == "2"
    # bash reads it: the script is valid shell.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_exit_codes_follow_sacct() -> None:
    assert exit_code("COMPLETED", "0:0") == 0
    assert exit_code("FAILED", "3:0") == 3
    assert exit_code("FAILED", "0:9") == -9
    assert exit_code("CANCELLED by 1000", "0:15") == -9
    assert exit_code("TIMEOUT", "0:0") == 1


def test_a_missing_kubectl_or_sbatch_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither tool here (nor anywhere on this machine)
    with pytest.raises(PlatformError) as kubernetes:
        make_launcher("kubernetes", k8s_image="registry.local/unitedllm:1")
    assert str(kubernetes.value) == "--launcher kubernetes: kubectl is not installed (not found on PATH)"
    with pytest.raises(PlatformError) as slurm:
        make_launcher("slurm")
    assert str(slurm.value) == "--launcher slurm: sbatch is not installed (not found on PATH)"
    with pytest.raises(PlatformError, match="needs --k8s-image"):
        make_launcher("kubernetes")
    with pytest.raises(PlatformError, match=r"--launcher 'docker': expected one of local, kubernetes, slurm"):
        make_launcher("docker")
    assert isinstance(make_launcher("local"), LocalProcessLauncher)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--launcher", "kubernetes", "--k8s-image", "img"],
            "error: --launcher kubernetes: kubectl is not installed",
        ),
        (["--launcher", "slurm"], "error: --launcher slurm: sbatch is not installed"),
        (["--launcher", "kubernetes"], "error: --launcher kubernetes needs --k8s-image"),
        (["--launcher", "pbs"], "error: --launcher 'pbs': expected one of local, kubernetes, slurm"),
        (["--launcher", "local"], "is not enrolled: give --platform URL"),
    ],
)
def test_the_agent_chooses_its_launcher_by_flag(tmp_path: Path, flags: list[str], message: str) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no kubectl, no sbatch
    agent = subprocess.run(
        [sys.executable, "-m", "unitedllm", "agent", "--state-dir", str(tmp_path / "state"), *flags],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert agent.returncode == 2
    assert message in agent.stderr and len(agent.stderr.strip().splitlines()) == 1, agent.stderr
    assert "Traceback" not in agent.stderr
