"""bench/learning.py: bad flags and missing data are one-line messages; a tiny run reports a finite loss per method."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from services import require_shared_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "learning.py"


@pytest.fixture
def needs_data() -> None:
    """The shared Dolly file the bench reads by default (skip without it; fail under CI)."""
    require_shared_data("dolly/databricks-dolly-15k.jsonl")


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def test_missing_data_dir_given_by_the_user_is_an_error_naming_the_file(tmp_path: Path) -> None:
    proc = _run("--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--data-dir" in proc.stderr
    assert str(tmp_path / "dolly" / "databricks-dolly-15k.jsonl") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_default_data_skips_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "DEFAULT_DATA_DIR", tmp_path / "nowhere")
    assert bench.main([]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "nowhere" in report["skipped"]
    assert "skipped" in err and "--data-dir" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "train_args.comm_round=9"], "train_args.comm_round is set by the benchmark"),
        (["--optimizers", "FedAvg", "--server-lr", "DiLoCo=0.5"], "--server-lr 'DiLoCo=0.5'"),
        (["--server-lr", "FedAdam=fast"], "'fast' is not a number"),
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ],
)
def test_bad_flags_are_one_line_errors(flags: list[str], message: str) -> None:
    proc = _run(*flags)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("needs_data")
def test_unknown_server_optimizer_is_a_config_error() -> None:
    proc = _run("--optimizers", "FedNope", "--centralized", "none")
    assert proc.returncode == 2
    assert "FedNope" in proc.stderr and "train_args.server_optimizer" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("needs_data")
@pytest.mark.slow
def test_tiny_run_reports_a_finite_loss_below_the_untrained_one_per_method(tmp_path: Path) -> None:
    out = tmp_path / "learning.json"
    proc = _run(
        "--rounds", "1", "--local-steps", "2", "--batch-size", "2", "--max-seq-length", "128",
        "--eval-examples", "12", "--optimizers", "FedAvg,DiLoCo", "--threads", "1", "--out", str(out),
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    methods = {m["name"]: m for m in report["methods"]}
    assert list(methods) == ["FedAvg", "DiLoCo", "centralized"]
    # Equal compute: every method saw the same number of training examples.
    assert {m["examples"] for m in methods.values()} == {8 * 1 * 2 * 2}
    assert methods["centralized"]["optimizer_steps"] == 16 and methods["centralized"]["clients"] == 1
    assert methods["DiLoCo"]["server_optimizer_args"]["server_learning_rate"] == 0.7
    initial = report["initial_eval_loss"]
    for m in methods.values():
        assert math.isfinite(m["final_eval_loss"]), m
        assert m["final_eval_loss"] < initial, (m["name"], m["final_eval_loss"], initial)
    assert report["settings"]["eval_examples_scored"] > 0
    assert "final loss" in proc.stdout  # the table goes to stdout when the JSON goes to --out


def test_table_shows_a_failed_run_and_the_gap_to_centralized() -> None:
    import io

    bench = _bench()
    settings = {"eval_examples_scored": 10, "clients": 8, "rounds": 1, "local_steps": 2, "batch_size": 4,
                "max_seq_length": 64, "learning_rate": 1e-3}  # fmt: skip
    ok_round = [{"round": 0, "train_loss": 9.0, "eval_loss": 8.5, "seconds": 1.0}]
    methods = [
        {"name": "FedAvg", "optimizer_steps": 16, "batch": 4, "rounds": ok_round, "final_eval_loss": 8.5,
         "final_perplexity": 4914.8, "seconds": 3.0},
        {"name": "FedAdam", "optimizer_steps": 16, "batch": 4, "rounds": [], "final_eval_loss": None,
         "final_perplexity": None, "seconds": 2.0, "error": "client 3 round 0: training loss is nan"},
        {"name": "centralized", "optimizer_steps": 16, "batch": 4, "rounds": ok_round, "final_eval_loss": 8.0,
         "final_perplexity": 2981.0, "seconds": 3.0},
    ]  # fmt: skip
    out = io.StringIO()
    bench.print_table({"settings": settings, "initial_eval_loss": 10.8, "methods": methods}, out)
    lines = out.getvalue().splitlines()
    fedavg = next(line for line in lines if line.startswith("FedAvg"))
    assert "+0.500" in fedavg.split()
    assert "FedAdam failed: client 3 round 0: training loss is nan" in lines
