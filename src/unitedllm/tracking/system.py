"""System metrics: a background thread that logs CPU, RAM and GPU use as ``system`` events."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from unitedllm.tracking.metrics import MetricsLog

__all__ = ["SystemSampler", "sample_system", "system_metrics"]

log = logging.getLogger(__name__)

_GB = 1024**3


_nvml_state: dict[str, Any] = {}


def _nvml() -> Any:
    """The initialised ``pynvml`` module (nvidia-ml-py), or ``None`` without it or without an NVIDIA driver."""
    if "module" not in _nvml_state:
        _nvml_state["module"] = None
        try:
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - not installed, or no driver / library on this machine
            log.debug("NVML unavailable: %s", exc)
        else:
            _nvml_state["module"] = nvml
    return _nvml_state["module"]


def _gpu_stats() -> dict[str, float]:
    """Memory and utilisation of every GPU of this node (NVML's physical indices).

    NVML reads them from the driver without touching CUDA: asking torch about a GPU would open
    a CUDA context on it, taking memory on every other rank's device in a multi-GPU silo. Without
    NVML, only the GPU this process already uses is reported (from torch's allocator).
    """
    out: dict[str, float] = {}
    nvml = _nvml()
    if nvml is not None:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            out[f"gpu{index}_mem_used_gb"] = float(memory.used) / _GB
            out[f"gpu{index}_util_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    # Only look at CUDA if torch is already loaded and using it: the sampler must not pull either in.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        out["process_gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(index) / _GB
        out["process_gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(index) / _GB
    return out


def sample_system(psutil: Any, process: Any) -> dict[str, float]:
    """One reading of this host (CPU, RAM), this process (RSS) and the visible GPUs."""
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "ram_used_gb": (memory.total - memory.available) / _GB,
        "ram_percent": float(memory.percent),
        "process_rss_gb": process.memory_info().rss / _GB,
        "process_cpu_percent": float(process.cpu_percent(interval=None)),
        **_gpu_stats(),
    }


class SystemSampler:
    """Logs a ``system`` event every ``interval_s`` seconds to a :class:`MetricsLog` until closed."""

    def __init__(self, metrics: MetricsLog, *, rank: int, interval_s: float = 10.0):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.metrics = metrics
        self.rank = rank
        self.interval_s = interval_s
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> bool:
        """Start sampling; False (with a warning) when psutil is not installed."""
        try:
            psutil = importlib.import_module("psutil")
        except ImportError:
            log.warning("system metrics need the 'psutil' package: pip install 'unitedllm[tracking]'")
            return False
        process = psutil.Process(os.getpid())
        # The first cpu_percent() call only sets the baseline; prime it so sample 0 is meaningful.
        psutil.cpu_percent(interval=None)
        process.cpu_percent(interval=None)
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._loop, args=(psutil, process), name=f"system-metrics-{self.rank}", daemon=True
        )
        self._thread.start()
        return True

    def _loop(self, psutil: Any, process: Any) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(psutil, process)

    def _sample(self, psutil: Any, process: Any) -> None:
        try:
            reading = sample_system(psutil, process)
        except Exception as exc:  # noqa: BLE001 - a failed reading must not kill the sampler or the run
            log.debug("system metrics reading failed: %s", exc)
            return
        self.metrics.log(
            "system",
            round_idx=None,
            rank=self.rank,
            sample=self.samples,
            elapsed_s=round(time.monotonic() - self._started, 3),
            **reading,
        )
        self.samples += 1

    def close(self) -> None:
        """Stop the thread; closing twice is harmless."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@contextmanager
def system_metrics(
    metrics: MetricsLog, *, rank: int, enabled: bool = True, interval_s: float = 10.0
) -> Iterator[SystemSampler | None]:
    """Sample system metrics into ``metrics`` while the block runs (pass ``tracking_args.log_system_metrics``)."""
    if not enabled:
        yield None
        return
    sampler = SystemSampler(metrics, rank=rank, interval_s=interval_s)
    started = sampler.start()
    try:
        yield sampler if started else None
    finally:
        sampler.close()
