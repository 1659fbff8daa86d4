"""``unitedllm serve --follow``: ``global`` moves to each new round; bad rounds are refused; a live run is followed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file
from serving_support import ROOT, Server, child_env, quickstart_args, serving

from unitedllm.checkpoints import write_digests

FOLLOW_DEADLINE_S = 240.0


def global_root(server: Server) -> str | None:
    models = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]
    return next((m["root"] for m in models if m["id"] == "global"), None)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = FOLLOW_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def publish(
    source: Path, target: Path, change: Callable[[Path], None] | None = None, *, recorded: bool = True
) -> None:
    """Write a round folder the way the aggregator does: complete under a hidden name, then one rename.

    ``recorded``: the changed weights are what the aggregator wrote (their digest is recorded);
    otherwise they changed after it wrote them (the record still has the old digest).
    """
    hidden = target.with_name(f".{target.name}.tmp")
    shutil.copytree(source, hidden)
    if change is not None:
        change(hidden / "adapter_model.safetensors")
        if recorded:
            write_digests(hidden)
    os.replace(hidden, target)


def poison(weights: Path) -> None:
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)


def nudge(weights: Path) -> None:
    """A small finite change of one value: same names, shapes and finiteness, other bytes."""
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0, 0] += 0.5
    save_file(tensors, weights)


def reshape(weights: Path) -> None:
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if "lora_A" in n)
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, weights)


def test_follow_moves_global_to_new_rounds_and_refuses_bad_ones(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("round_1_after_agg", "final"))
    round_1 = trained_run / "node_0" / "round_1_after_agg"
    with serving(str(run), "--follow", log_dir=tmp_path) as server:
        assert global_root(server) == "global@0"
        publish(round_1, run / "node_0" / "round_1_after_agg")
        wait_for(lambda: global_root(server) == "global@1", "global moving to round 1")
        publish(round_1, run / "node_0" / "round_2_after_agg", poison)
        publish(round_1, run / "node_0" / "round_3_after_agg", reshape)
        publish(round_1, run / "node_0" / "round_4_after_agg", nudge, recorded=False)
        wait_for(lambda: server.metric("unitedllm_adapters_refused_total") == 3, "three refusals")
        assert global_root(server) == "global@1"
        for name, status in (
            ("global", 200),
            ("global@0", 200),
            ("global@1", 200),
            ("global@2", 404),
            ("global@3", 404),
            ("global@4", 404),
        ):
            body = {"model": name, "prompt": "apple", "max_tokens": 2}
            assert httpx.post(f"{server.base_url}/completions", json=body, timeout=60).status_code == status
        log = server.output()
        assert "round 2 not served" in log and "NaN" in log
        assert "round 3 not served" in log and "shape" in log
        tampered = next(line for line in log.splitlines() if "round 4 not served" in line)
        assert "adapter_model.safetensors has sha256" in tampered and "not the recorded" in tampered


def test_follow_sees_new_rounds_of_a_live_run(tmp_path: Path) -> None:
    out = tmp_path / "live"
    args = quickstart_args(out, rounds=6, run_id="live", extra=("--set", "train_args.local_max_steps=4"))
    with (tmp_path / "run.log").open("w") as sink:
        training = subprocess.Popen(
            [sys.executable, "-m", "unitedllm", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=ROOT,
        )
    try:
        first = out / "node_0" / "round_0_after_agg"
        wait_for(lambda: first.is_dir() or training.poll() is not None, "the run's first round")
        assert training.poll() is None, (tmp_path / "run.log").read_text()
        with serving(str(out), "--follow", log_dir=tmp_path) as server:
            start = global_root(server)
            assert start is not None and start.startswith("global@")
            started_at = int(start.split("@")[1])

            def moved() -> bool:
                root = global_root(server)
                return root is not None and int(root.split("@")[1]) > started_at

            wait_for(moved, "global moving to a later round")
            answer = httpx.post(
                f"{server.base_url}/completions",
                json={"model": "global", "prompt": "x", "max_tokens": 2},
                timeout=60,
            )
            assert answer.status_code == 200
    finally:
        training.terminate()
        training.wait(timeout=60)
