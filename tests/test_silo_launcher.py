"""How a client silo starts: the launcher choice, its command line, path lookup and the node's bootstrap."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unitedllm.config import load_config
from unitedllm.config.types import EnvironmentArgs
from unitedllm.errors import ConfigError, MissingDependency
from unitedllm.silo import BootstrapError, choose_launcher, run_bootstrap
from unitedllm.silo.launcher import launcher_command, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests" / "fixtures" / "fedml_config.yaml"  # FedML's own config, unchanged
TINY = ROOT / "examples" / "tiny_processes.yaml"


def env(**kwargs: object) -> EnvironmentArgs:
    return EnvironmentArgs(**kwargs)  # type: ignore[arg-type]


# ---- auto ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "ds_config", "installed", "launcher", "nproc"),
    [
        (0, False, True, "python", 1),  # a laptop
        (0, True, True, "python", 1),  # the seed's deepspeed key on a CPU-only machine: plain python
        (1, False, True, "python", 1),  # one GPU
        (1, True, True, "deepspeed", 1),  # a GPU and a DeepSpeed config
        (4, True, True, "deepspeed", 4),
        (4, False, True, "torch", 4),  # several GPUs: one process each under torchrun
        (4, True, False, "torch", 4),  # DeepSpeed wanted but not installed: torchrun, and it says why
    ],
)
def test_auto_picks_by_devices_and_deepspeed_config(
    gpus: int, ds_config: bool, installed: bool, launcher: str, nproc: int
) -> None:
    plan = choose_launcher(env(), gpus=gpus, deepspeed_config=ds_config, deepspeed_installed=installed)
    assert (plan.launcher, plan.nproc_per_node) == (launcher, nproc)
    assert plan.reason.startswith("auto:")
    if ds_config and gpus == 0:
        assert "train_args.deepspeed is ignored without a GPU" in plan.reason
    if ds_config and not installed:
        assert "pip install 'unitedllm[deepspeed]'" in plan.reason


def test_auto_on_cpu_with_several_processes_uses_torchrun() -> None:
    plan = choose_launcher(env(nproc_per_node=2), gpus=0, deepspeed_config=False, deepspeed_installed=True)
    assert (plan.launcher, plan.nproc_per_node) == ("torch", 2)
    plan = choose_launcher(env(nnodes=2), gpus=0, deepspeed_config=False, deepspeed_installed=True)
    assert plan.launcher == "torch" and "2 processes" in plan.reason


def test_seed_config_on_this_cpu_machine_runs_plain_python_and_says_why() -> None:
    cfg = load_config(SEED)
    assert cfg.train_args.deepspeed == "configs/deepspeed/ds_z3_bf16_config.json"
    plan = choose_launcher(cfg.environment_args, gpus=0, deepspeed_config=True, deepspeed_installed=True)
    assert plan.launcher == "python"
    assert "ignored without a GPU" in plan.reason
    # ...and the file the seed names ships with UnitedLLM, found from the project root (FedML's convention).
    found = resolve_config_path(cfg.train_args.deepspeed, config_dir=SEED.parent, key="train_args.deepspeed")
    assert found == ROOT / "configs" / "deepspeed" / "ds_z3_bf16_config.json"


def test_aggregator_uses_the_launcher_only_when_it_evaluates() -> None:
    from unitedllm.silo.launcher import plan_for

    sets = {"environment_args.launcher": "torch", "environment_args.nproc_per_node": 2}
    quiet = load_config(TINY, overrides={**sets, "validation_args.is_aggregator_test": False})
    plan = plan_for(quiet, rank=0, gpus=0)
    assert (plan.launcher, plan.nproc_per_node) == ("python", 1)
    assert "validation_args.is_aggregator_test is false" in plan.reason  # what the log says
    # The same launcher settings start an evaluating aggregator, and a client either way, under torchrun.
    assert plan_for(load_config(TINY, overrides=sets), rank=0, gpus=0).launcher == "torch"
    assert plan_for(quiet, rank=1, gpus=0).launcher == "torch"


# ---- explicit choices ----------------------------------------------------------------------------------


def test_explicit_launchers_are_honoured_and_checked() -> None:
    plan = choose_launcher(env(launcher="torch"), gpus=0, deepspeed_config=False, deepspeed_installed=False)
    assert (plan.launcher, plan.nproc_per_node) == ("torch", 1)
    plan = choose_launcher(env(launcher="torch"), gpus=2, deepspeed_config=True, deepspeed_installed=True)
    assert plan.launcher == "torch" and "train_args.deepspeed is ignored under torchrun" in plan.reason
    plan = choose_launcher(
        env(launcher="deepspeed", nproc_per_node=2), gpus=0, deepspeed_config=True, deepspeed_installed=True
    )
    assert (plan.launcher, plan.nproc_per_node) == ("deepspeed", 2)
    with pytest.raises(ConfigError, match=r"environment_args.launcher: deepspeed needs train_args.deepspeed"):
        choose_launcher(env(launcher="deepspeed"), gpus=1, deepspeed_config=False, deepspeed_installed=True)
    with pytest.raises(MissingDependency, match=r"pip install 'unitedllm\[deepspeed\]'"):
        choose_launcher(env(launcher="deepspeed"), gpus=1, deepspeed_config=True, deepspeed_installed=False)


def test_torchrun_command_passes_rendezvous_options_through() -> None:
    plan = choose_launcher(env(launcher="torch", nproc_per_node=8), gpus=8, deepspeed_config=False)
    multi = env(
        launcher="torch",
        nproc_per_node=8,
        nnodes=2,
        node_rank=1,
        master_addr="10.0.0.5",
        launcher_args=["--max-restarts=0"],
    )
    cmd = launcher_command(plan, multi, ["CONFIG", "--rank", "1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for flag in (
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.5",
        "--master-port=29500",
        "--max-restarts=0",
    ):
        assert flag in cmd
    assert cmd[-5:] == ["-m", "unitedllm.silo.worker", "CONFIG", "--rank", "1"]
    with pytest.raises(ConfigError, match="environment_args.node_rank: 2 is not below nnodes"):
        launcher_command(plan, env(nnodes=2, node_rank=2), [])


def test_deepspeed_command_and_its_multi_node_hostfile() -> None:
    plan = choose_launcher(env(launcher="deepspeed"), gpus=2, deepspeed_config=True, deepspeed_installed=True)
    cmd = launcher_command(plan, env(launcher="deepspeed"), ["CONFIG"])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert "--num_gpus=2" in cmd and "--no_local_rank" in cmd
    assert cmd[-3:] == ["--module", "unitedllm.silo.worker", "CONFIG"]
    with pytest.raises(ConfigError, match=r"environment_args.launcher_args: .*--hostfile"):
        launcher_command(plan, env(launcher="deepspeed", nnodes=2), [])
    cmd = launcher_command(
        plan,
        env(launcher="deepspeed", nnodes=2, node_rank=1, launcher_args=["--hostfile", "/etc/hosts.ds"]),
        [],
    )
    assert "--no_ssh" in cmd and "--node_rank=1" in cmd and "/etc/hosts.ds" in cmd


# ---- relative paths ------------------------------------------------------------------------------------


def test_relative_paths_look_next_to_the_config_then_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir, cwd = tmp_path / "config", tmp_path / "project"
    (config_dir).mkdir()
    (cwd / "config").mkdir(parents=True)
    (config_dir / "bootstrap.sh").write_text("true\n")
    (cwd / "config" / "bootstrap.sh").write_text("true\n")
    monkeypatch.chdir(cwd)
    key = "environment_args.bootstrap"
    assert resolve_config_path("bootstrap.sh", config_dir=config_dir, key=key) == config_dir / "bootstrap.sh"
    # FedML's package convention: 'config/bootstrap.sh' from the source folder.
    found = resolve_config_path("config/bootstrap.sh", config_dir=config_dir, key=key)
    assert found == cwd / "config" / "bootstrap.sh"
    with pytest.raises(ConfigError) as info:
        resolve_config_path("missing.sh", config_dir=config_dir, key=key)
    message = str(info.value)
    assert "environment_args.bootstrap: 'missing.sh' is not a file" in message
    assert str(config_dir / "missing.sh") in message and str(cwd / "missing.sh") in message


# ---- bootstrap -----------------------------------------------------------------------------------------


def test_bootstrap_output_is_streamed_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "bootstrap.sh"
    script.write_text('echo "installing for rank $UNITEDLLM_RANK"\necho done >&2\n')
    with caplog.at_level(logging.INFO, logger="unitedllm.node_processes"):
        run_bootstrap(script, env={"UNITEDLLM_RANK": "3"})
    lines = [r.getMessage() for r in caplog.records]
    assert "bootstrap: installing for rank 3" in lines and "bootstrap: done" in lines


def test_failing_bootstrap_names_its_exit_code_and_output_tail(tmp_path: Path) -> None:
    script = tmp_path / "bootstrap.sh"
    script.write_text(
        "for i in $(seq 1 30); do echo line-$i; done\necho 'pip: no such package' >&2\nexit 7\n"
    )
    with pytest.raises(BootstrapError) as info:
        run_bootstrap(script)
    err = info.value
    assert err.returncode == 7
    assert "exited with code 7" in str(err) and "pip: no such package" in str(err)
    assert "line-30" in str(err) and "line-5\n" not in str(err)  # the tail, not the whole output


def test_client_with_a_failing_bootstrap_stops_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "bootstrap.sh").write_text("echo 'fetching weights'\necho 'disk full' >&2\nexit 3\n")
    config = tmp_path / "fedml_config.yaml"
    config.write_text(TINY.read_text() + "\nenvironment_args:\n  bootstrap: bootstrap.sh\n")
    proc = subprocess.run(
        [sys.executable, "-m", "unitedllm", "client", str(config), "--rank", "1", "--run-id", "boot-fails"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200", "UNITEDLLM_PACKAGE_DIR": ""},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "exited with code 3" in proc.stderr
    assert "disk full" in proc.stderr and "fetching weights" in proc.stderr
    assert "the client was not started" in proc.stderr


def test_client_command_refuses_the_aggregators_rank() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unitedllm", "client", str(TINY), "--rank", "0", "--run-id", "rank-zero"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "--rank: 0 is the aggregator's rank; start it with 'unitedllm server'" in proc.stderr
