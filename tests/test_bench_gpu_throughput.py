"""bench/gpu_throughput.py: the shapes it times are Pythia's, the card's peak is found by name, and a
tiny CPU run reports both sides with a finite ratio (the GPU figures themselves come from a device run)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_throughput.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _param_count(shape: dict[str, object]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "params"),
    # The Pythia model cards' parameter counts (shared/data/pythia/README.md for 410m).
    [("pythia-410m", 405_334_016), ("pythia-1.4b", 1_414_647_808)],
)
def test_model_shapes_have_pythias_parameter_counts(name: str, params: int) -> None:
    bench = _bench()
    shape, _ = bench.model_shape(name)
    assert _param_count(shape) == params
    # The hard-coded fallback is the same model as the shared config file, where that is present.
    assert _param_count({**bench.PYTHIA_COMMON, **bench.PUBLISHED[name]}) == params


@pytest.mark.parametrize(
    ("device", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_peak_flops_by_card_name(device: str, tflops: float | None) -> None:
    peak, source = _bench().peak_flops(device, None)
    assert peak == (tflops * 1e12 if tflops else None)
    assert ("--peak-tflops" in source) == (tflops is None)


def test_bad_size_is_a_one_line_error() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "pythia-7b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --sizes: pythia-7b not among pythia-410m, pythia-1.4b"


def test_tiny_cpu_run_reports_both_sides_and_a_finite_ratio(tmp_path: Path) -> None:
    out = tmp_path / "gpu_throughput.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["peak_bf16_flops"] is None
    (result,) = doc["results"]
    assert result["model"] == "tiny" and result["trainable_params"] < result["params"]
    settings = doc["settings"]
    assert result["tokens_per_round"] == settings["steps"] * settings["batch"] * settings["seq"]
    for side in ("unitedllm", "hf"):
        numbers = result[side]
        assert len(numbers["seconds"]) == settings["trials"]
        assert 0 < numbers["tokens_per_s"] <= numbers["tokens_per_s_best"]
        # Both trained the same random-word data from a random init: the loss sits near ln(words).
        assert math.isfinite(numbers["last_loss"]) and 0 < numbers["last_loss"] < 2 * math.log(2048)
        assert numbers["mfu"] is None
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert f"ratio {result['ratio']:.3f}" in done.stdout  # the printed table
