"""Trackers (TensorBoard, W&B offline, MLflow file store) and system metrics, fed by a real federated run."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from linear_trainer import LinearTrainer

from unitedllm.config.types import Config
from unitedllm.errors import MissingDependency
from unitedllm.run_layout import RunLayout
from unitedllm.runner import run_async
from unitedllm.tracking import MetricsLog, open_trackers, read_metrics, system_metrics
from unitedllm.tracking.scalars import Scalar, scalars_of
from unitedllm.tracking.sink import TrackerSink


def make_config(tmp_path: Path, **tracking: Any) -> Config:
    raw: dict[str, Any] = {
        "train_args": {
            "comm_round": 3,
            "client_num_in_total": 2,
            "client_num_per_round": 2,
            "local_max_steps": 3,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        "validation_args": {
            "is_aggregator_test": True,
            "test_on_clients": "both",
            "test_on_client_ranks": [1],
        },
        "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        "tracking_args": {"log_system_metrics": False, **tracking},
    }
    return msgspec.convert(raw, Config)


def run_tracked(cfg: Config, run_id: str = "track") -> Path:
    """Run a federation with the trackers the config asks for, wired the way the CLI does it."""
    output_dir = Path(cfg.train_args.output_dir.replace("{run_id}", run_id))
    with (
        open_trackers(cfg, rank=0, run_id=run_id, layout=RunLayout(output_dir)) as listeners,
        MetricsLog(RunLayout(output_dir).metrics(), listeners=listeners) as metrics,
    ):
        asyncio.run(
            run_async(
                cfg, run_id=run_id, metrics=metrics, trainer_factory=lambda _cfg, rank: LinearTrainer(rank)
            )
        )
    return output_dir


def logged(output_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_metrics(output_dir / "metrics.jsonl") if e["event"] == event]


def test_tensorboard_has_round_and_client_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard (unitedllm[tracking]) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_tracked(make_config(tmp_path, enable_tensorboard=True))
    server = EventAccumulator(str(out / "tensorboard" / "server"))
    server.Reload()
    tags = set(server.Tags()["scalars"])
    assert {"round/train_loss", "time/round_s", "time/aggregation_s", "eval/loss"} <= tags
    rounds = logged(out, "round")
    assert [e.step for e in server.Scalars("round/train_loss")] == [0, 1, 2]
    assert [e.value for e in server.Scalars("round/train_loss")] == pytest.approx(
        [r["train_loss"] for r in rounds], rel=1e-6
    )

    client = EventAccumulator(str(out / "tensorboard" / "client_1"))
    client.Reload()
    client_tags = set(client.Tags()["scalars"])
    assert {
        "train/loss",
        "time/comm_s",
        "comm/bytes_sent",
        "comm/bytes_received",
        "eval/loss",
        "eval_local/loss",
    } <= client_tags
    sent = [t for t in logged(out, "train") if t["rank"] == 1]
    assert [e.value for e in client.Scalars("comm/bytes_sent")] == [t["bytes_received"] for t in sent]


def test_tensorboard_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # fault injection: the package is not installed
    cfg = make_config(tmp_path, enable_tensorboard=True)
    with (
        pytest.raises(MissingDependency, match=r"unitedllm\[tracking\]") as caught,
        open_trackers(cfg, rank=0, run_id="r", layout=RunLayout(tmp_path)),
    ):
        pass
    assert "tracking_args.enable_tensorboard" in str(caught.value)


def test_wandb_offline_run_is_written_by_the_server_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="wandb (unitedllm[tracking]) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(tmp_path, enable_wandb=True, wandb_project="unitedllm-test")
    out = run_tracked(cfg)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb-core writes the offline file from its own process, a moment after run.finish() returns.
    deadline = time.monotonic() + 20
    while b"client_1/train/loss" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    data = runs[0].read_bytes()
    assert b"round/train_loss" in data and b"client_1/train/loss" in data

    # wandb_only_server (default True): a client process opens no W&B run.
    client_run = RunLayout(tmp_path / "client")
    with open_trackers(cfg, rank=1, run_id="track", layout=client_run) as listeners:
        assert listeners == []
    assert not (client_run.tracker_dir(1) / "wandb").exists()


def test_mlflow_file_store_has_metric_history(tmp_path: Path) -> None:
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow (unitedllm[tracking]) is not installed")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    out = run_tracked(make_config(tmp_path, mlflow_tracking_uri=uri, mlflow_experiment="fed"))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fed")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["unitedllm.run_id"] == "track"
    history = client.get_metric_history(run.info.run_id, "round/train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert sorted(m.value for m in history) == pytest.approx(
        sorted(r["train_loss"] for r in logged(out, "round"))
    )
    assert client.get_metric_history(run.info.run_id, "client_2/train/loss")


class _BrokenSink(TrackerSink):
    name = "broken"

    def write(self, scalars: list[Scalar]) -> None:
        raise OSError("No space left on device")


def test_failing_tracker_does_not_stop_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path)
    out = tmp_path / "broken"
    with (
        caplog.at_level(logging.WARNING),
        _BrokenSink() as sink,
        MetricsLog(out / "metrics.jsonl", listeners=[sink]) as metrics,
    ):
        asyncio.run(
            run_async(
                cfg, run_id="b", metrics=metrics, trainer_factory=lambda _cfg, rank: LinearTrainer(rank)
            )
        )
    assert len(logged(out, "round")) == 3
    warnings = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not once per event


def test_system_sampler_logs_until_closed(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="psutil (unitedllm[tracking]) is not installed")
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as metrics:
        with system_metrics(metrics, rank=0, interval_s=0.05) as sampler:
            assert sampler is not None
            deadline = time.monotonic() + 10
            while sampler.samples < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        count = sampler.samples
        time.sleep(0.2)
    events = [e for e in read_metrics(path) if e["event"] == "system"]
    assert len(events) == count >= 3  # nothing is logged after the block ends
    assert [e["sample"] for e in events] == list(range(count))
    for e in events:
        assert 0.0 <= e["cpu_percent"] <= 100.0
        assert e["ram_used_gb"] > 0 and e["process_rss_gb"] > 0
    tags = {s.tag for s in scalars_of(events[-1])}
    assert {"system/cpu_percent", "system/ram_used_gb", "system/process_rss_gb"} <= tags


def test_system_metrics_disabled_logs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with (
        MetricsLog(path) as metrics,
        system_metrics(metrics, rank=0, enabled=False, interval_s=0.01) as sampler,
    ):
        time.sleep(0.1)
    assert sampler is None
    assert list(read_metrics(path)) == []


def test_system_sample_reports_gpu_memory_when_cuda_is_there() -> None:
    torch = pytest.importorskip("torch")
    psutil = pytest.importorskip("psutil", reason="psutil (unitedllm[tracking]) is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: GPU system metrics cannot be observed")
    from unitedllm.tracking.system import sample_system

    block = torch.empty(
        256 * 1024 * 1024, dtype=torch.uint8, device="cuda"
    )  # 256 MiB held during the reading
    reading = sample_system(psutil, psutil.Process(os.getpid()))
    del block
    assert reading["process_gpu_mem_allocated_gb"] >= 0.25
    if "gpu0_mem_used_gb" in reading:  # NVML (nvidia-ml-py) sees the whole node
        assert sum(v for k, v in reading.items() if k.endswith("_mem_used_gb")) >= 0.25
        assert all(0 <= v <= 100 for k, v in reading.items() if k.endswith("_util_percent"))


def test_gpu_reading_touches_no_cuda_device_of_its_own() -> None:
    # A sampler in a multi-GPU silo must not open CUDA contexts on the other ranks' devices.
    torch = pytest.importorskip("torch")
    psutil = pytest.importorskip("psutil", reason="psutil (unitedllm[tracking]) is not installed")
    from unitedllm.tracking.system import sample_system

    was_initialised = torch.cuda.is_initialized()
    reading = sample_system(psutil, psutil.Process(os.getpid()))
    assert torch.cuda.is_initialized() == was_initialised
    assert "cpu_percent" in reading
