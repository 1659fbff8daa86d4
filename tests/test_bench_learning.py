"""bench/learning.py: bad flags and missing data are one-line messages; a tiny run reports a finite loss per method."""

from __future__ import annotations

import importlib.util
import io
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
        (
            ["--out", "/nonexistent-dir/learning.json"],
            "--out /nonexistent-dir/learning.json: /nonexistent-dir is not a directory",
        ),
        (["--out", "/"], "--out /: is a directory"),
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


def test_rule_variants_carry_their_own_server_arguments() -> None:
    bench = _bench()
    assert bench.variant("DiLoCo") == ("DiLoCo", {})
    assert bench.variant("DiLoCo[momentum_restart=true; max_step_ratio=3]") == (
        "DiLoCo",
        {"momentum_restart": True, "max_step_ratio": 3},
    )
    args = bench.parse_args(["--optimizers", "FedAvg,DiLoCo[momentum_restart=true]", "--seed", "7"])
    methods = {m.name: m for m in bench.methods_of(args, 8)}
    restart = methods["DiLoCo[momentum_restart=true]"].overrides
    assert restart["train_args.server_optimizer"] == "DiLoCo"
    assert restart["train_args.server_optimizer_args.momentum_restart"] is True
    assert "train_args.server_optimizer_args.momentum_restart" not in methods["FedAvg"].overrides


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizers", "DiLoCo[momentum_restart]"], "'momentum_restart' is not key=value"),
        (["--optimizers", "DiLoCo[momentum_restart=true"], "expected NAME[key=value;...]"),
        (["--set", "train_args.seed=7"], "train_args.seed is set by the benchmark"),
    ],
)
def test_bad_variants_are_one_line_errors(flags: list[str], message: str) -> None:
    proc = _run(*flags)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worst_rise_is_the_largest_round_over_round_increase() -> None:
    bench = _bench()
    assert bench.worst_rise([10.14, 8.89, 8.02, 8.67, 8.04, 8.13]) == pytest.approx(0.65)
    assert bench.worst_rise([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert bench.worst_rise([3.0, None]) is None
    assert bench.worst_rise([3.0]) is None


def _grid() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_learning_grid", REPO / "bench" / "learning_grid.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cell(k: int, r: int, seed: int, finals: dict[str, float], rises: dict[str, float]) -> dict[str, object]:
    methods = [
        {"name": name, "kind": "centralized" if name.startswith("centralized") else "federated",
         "final_eval_loss": final, "worst_rise": rises.get(name)}
        for name, final in finals.items()
    ]  # fmt: skip
    return {"settings": {"local_steps": k, "rounds": r, "seed": seed}, "methods": methods}


def test_grid_summary_gives_gap_to_data_parallel_and_the_target_per_rule(tmp_path: Path) -> None:
    grid = _grid()
    cell = _cell(
        10,
        6,
        7,
        {"FedAvg": 8.08, "DiLoCo": 7.80, "centralized 8x batch": 7.84},
        {"DiLoCo": 0.65, "FedAvg": -0.06},
    )
    (tmp_path / "cell-k10-r6-s7.json").write_text(json.dumps(cell))
    (tmp_path / "cell-k4-r4-s1.json").write_text(
        json.dumps(_cell(4, 4, 1, {"FedAvg": 9.0, "centralized 8x batch": 9.0}, {}))
    )
    doc = grid.summarize(tmp_path)
    assert [(r["local_steps"], r["rule"]) for r in doc["rows"]] == [
        (4, "FedAvg"),
        (10, "FedAvg"),
        (10, "DiLoCo"),
    ]
    fedavg, diloco = doc["rows"][1], doc["rows"][2]
    assert fedavg["gap"] == pytest.approx(0.24) and fedavg["gap_percent"] == pytest.approx(3.06, abs=0.01)
    assert not fedavg["meets_target"]  # 3% above data-parallel
    assert not diloco["meets_target"]  # below data-parallel, but it rose 0.65 nats in one round
    assert doc["rows"][0]["meets_target"]
    out = io.StringIO()
    grid.print_summary(doc, out)
    assert "| 10 | 6 | 7 | DiLoCo | 7.800 | 7.840 | -0.040 (-0.5%) | +0.650 | not met |" in out.getvalue()


def test_grid_cells_flag_is_checked(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "learning_grid.py"), "--out-dir", str(tmp_path), "--cells", "4:4"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--cells '4:4': expected K:R:SEED" in proc.stderr and "Traceback" not in proc.stderr


def test_grid_out_dir_that_is_a_file_or_holds_no_cells_is_a_one_line_error(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("", encoding="utf-8")
    grid = [sys.executable, str(REPO / "bench" / "learning_grid.py")]
    cases = [
        ([*grid, "--out-dir", str(a_file), "--cells", "4:4:1"], f"--out-dir {a_file}: File exists"),
        ([*grid, "--out-dir", str(tmp_path / "none"), "--summarize"], "no cell-*.json to summarise"),
    ]
    for argv, message in cases:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def _gpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_learning_gpu", REPO / "bench" / "learning_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("rule", "args"), [("FedAvg", {}), ("DiLoCo", {}), ("DiLoCo", {"momentum_restart": True})]
)
def test_gpu_script_server_rules_match_unitedllm(rule: str, args: dict[str, object]) -> None:
    """bench/learning_gpu.py writes the outer step out (the device image lacks msgspec): it must be ours."""
    import torch

    from unitedllm.optimizers import create
    from unitedllm.optimizers.base import ClientUpdate

    gpu = _gpu()
    gen = torch.Generator().manual_seed(0)
    w0 = {
        "a": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    opt = create(rule, args)
    ours, state = dict(w0), opt.init_state(w0)
    theirs = [t.clone() for t in w0.values()]
    momentum = None if rule == "FedAvg" else [torch.zeros_like(t) for t in theirs]
    for r in range(6):
        sign = -1.0 if r == 4 else 1.0  # one round against the momentum: the restart's case
        delta = {
            n: sign * torch.randn(t.shape, generator=gen, dtype=torch.float64).abs() for n, t in w0.items()
        }
        ours, state = opt.step(ours, [ClientUpdate(1, delta, 1)], state)
        gpu.outer_step(theirs, list(delta.values()), momentum, lr=opt.hparam("server_learning_rate"),
                       mu=0.9, restart=bool(args.get("momentum_restart")))  # fmt: skip
        for name, t in zip(w0, theirs, strict=True):
            assert torch.allclose(ours[name], t, atol=1e-12), (rule, r, name)


@pytest.mark.usefixtures("needs_data")
@pytest.mark.slow
def test_gpu_script_runs_tiny_on_the_cpu_and_counts_bytes(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "learning_gpu.py"), "--tiny", "--rounds", "2", "--local-steps", "1",
         "--batch-size", "1", "--eval-examples", "8", "--methods", "data-parallel,DiLoCo", "--out", str(out)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    dp, diloco = doc["methods"]
    assert dp["examples"] == diloco["examples"] == 2 * 1 * 8 * 1
    assert diloco["bytes_communicated"] == 2 * 8 * 4 * doc["parameters"] * 2
    assert dp["bytes_communicated"] == 2 * 7 * 4 * doc["parameters"] * 2
    assert all(
        math.isfinite(m["final_eval_loss"]) and m["final_eval_loss"] < doc["initial_eval_loss"]
        for m in (dp, diloco)
    )


def test_grid_merges_files_of_one_cell_run_at_different_times(tmp_path: Path) -> None:
    grid = _grid()
    dp = _cell(10, 6, 7, {"centralized 8x batch": 8.0}, {})
    rule = _cell(10, 6, 7, {"DiLoCo[max_step_ratio=2]": 8.04}, {"DiLoCo[max_step_ratio=2]": 0.02})
    (tmp_path / "cell-k10-r6-s7-dp.json").write_text(json.dumps(dp))
    (tmp_path / "cell-k10-r6-s7-clip.json").write_text(json.dumps(rule))
    (row,) = grid.summarize(tmp_path)["rows"]
    assert row["rule"] == "DiLoCo[max_step_ratio=2]" and row["data_parallel"] == 8.0
    assert row["gap_percent"] == pytest.approx(0.5) and row["meets_target"]


def test_grid_names_a_rule_run_with_overrides_after_them(tmp_path: Path) -> None:
    """The same rule with and without ``--set train_args.local_optimizer_state=reset`` are two rows."""
    grid = _grid()
    keep = _cell(25, 4, 1234, {"FedAvg": 7.73, "centralized 8x batch": 7.42}, {})
    reset = _cell(25, 4, 1234, {"FedAvg": 7.50}, {})
    reset["settings"]["overrides"] = ["train_args.local_optimizer_state=reset"]  # type: ignore[index]
    (tmp_path / "cell-k25-r4-s1234.json").write_text(json.dumps(keep))
    (tmp_path / "cell-k25-r4-s1234-reset.json").write_text(json.dumps(reset))
    rows = {row["rule"]: row for row in grid.summarize(tmp_path)["rows"]}
    assert set(rows) == {"FedAvg", "FedAvg + train_args.local_optimizer_state=reset"}
    assert rows["FedAvg + train_args.local_optimizer_state=reset"]["data_parallel"] == 7.42
