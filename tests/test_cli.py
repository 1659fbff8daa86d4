"""The `unitedllm` command as a user meets it: fast help, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unitedllm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unitedllm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_help_does_not_import_torch() -> None:
    code = "import sys; from unitedllm.cli import app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
    assert unitedllm("--help").returncode == 0


def test_bad_config_exits_2_with_each_problem_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_args:\n  comm_rounds: 5\nmodel_args:\n  peft_type: lorra\n")
    proc = unitedllm("run", str(bad))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for expected in ("comm_rounds", "did you mean 'comm_round'", "model_args.peft_type", "lorra"):
        assert expected in proc.stderr, (expected, proc.stderr)
    bad.write_text("train_args:\n  client_num_in_total: 2\n  client_num_per_round: 3\n")
    proc = unitedllm("run", str(bad))
    assert proc.returncode == 2
    assert "train_args.client_num_per_round: 3 is more than client_num_in_total (2)" in proc.stderr


def test_bad_override_and_missing_file_exit_2(tmp_path: Path) -> None:
    proc = unitedllm("run", "examples/quickstart.yaml", "--set", "train_args.comm_round=five")
    assert proc.returncode == 2 and "train_args.comm_round" in proc.stderr and "five" in proc.stderr
    proc = unitedllm("run", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_local_backend_cannot_serve_separate_processes(tmp_path: Path) -> None:
    proc = unitedllm("server", "examples/quickstart.yaml", "--run-id", "x")
    assert proc.returncode == 2
    assert "comm_args.backend" in proc.stderr and "Traceback" not in proc.stderr


def test_client_rank_outside_the_run_is_refused() -> None:
    proc = unitedllm("client", "examples/mqtt_s3.yaml", "--rank", "9", "--run-id", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # the same words as validation_args.test_on_client_ranks, the trainer and the data split use
    assert "--rank: rank 9 is not a client rank; clients are ranks 1..2 (0 is the aggregator)" in proc.stderr


def test_resume_without_a_checkpoint_is_refused_and_ignored_keys_are_named_once(tmp_path: Path) -> None:
    proc = unitedllm(
        "run",
        "examples/quickstart.yaml",
        "--run-id",
        "never-ran",
        "--resume",
        "--set",
        f"train_args.output_dir={tmp_path}/{{run_id}}",
        "--set",
        "environment_args.bootstrap=config/bootstrap.sh",
    )
    assert proc.returncode == 2, proc.stderr
    assert "run never-ran has no checkpoint to resume" in proc.stderr
    assert "--fresh-if-missing" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("environment_args.bootstrap is ignored") == 1
    assert not (tmp_path / "never-ran" / "node_0").exists(), "nothing may start"


def test_fresh_if_missing_only_goes_with_resume() -> None:
    proc = unitedllm("run", "examples/quickstart.yaml", "--fresh-if-missing")
    assert proc.returncode == 2 and "--fresh-if-missing: only has a meaning with --resume" in proc.stderr


def test_fresh_if_missing_starts_a_run_that_has_no_checkpoint(tmp_path: Path) -> None:
    # The aggregator of a LOCAL config stops right after the resume decision, so the test stays fast.
    proc = unitedllm(
        "server",
        "examples/quickstart.yaml",
        "--run-id",
        "first-time",
        "--resume",
        "--fresh-if-missing",
        "--set",
        f"train_args.output_dir={tmp_path}/{{run_id}}",
        "--set",
        "environment_args.bootstrap=config/bootstrap.sh",
    )
    assert "run first-time has no checkpoint" in proc.stderr and "starting it from round 0" in proc.stderr
    assert "has no checkpoint to resume" not in proc.stderr  # not refused
    assert proc.stderr.count("environment_args.bootstrap is ignored: the aggregator runs no bootstrap") == 1
    assert proc.returncode == 2 and "comm_args.backend" in proc.stderr  # then LOCAL stops it, as before
