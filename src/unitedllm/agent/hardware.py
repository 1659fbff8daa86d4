"""What an agent reports about its machine: CPUs, memory and GPUs (NVML) once, load in every heartbeat."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

__all__ = ["hardware_report", "system_metrics"]


def _gpus() -> list[dict[str, Any]]:
    """One entry per GPU from NVML; an empty list where there is no NVIDIA driver or no pynvml."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVML raises its own error types per failure; no GPU either way
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total": int(memory.total),
                    "memory_used": int(memory.used),
                    "utilisation": int(utilisation.gpu),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def hardware_report() -> dict[str, Any]:
    """The machine as enrolled: host, OS, CPUs, memory and GPUs."""
    import psutil

    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count() or 0,
        "memory_total": int(psutil.virtual_memory().total),
        "gpus": [{k: g[k] for k in ("index", "name", "memory_total")} for g in _gpus()],
    }


def system_metrics() -> dict[str, Any]:
    """Load now: CPU %, memory, network bytes and each GPU's utilisation and memory."""
    import psutil

    memory = psutil.virtual_memory()
    net = psutil.net_io_counters()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_used": int(memory.used),
        "memory_percent": float(memory.percent),
        "net_sent": int(net.bytes_sent) if net else 0,
        "net_recv": int(net.bytes_recv) if net else 0,
        "gpus": [{k: g[k] for k in ("index", "utilisation", "memory_used")} for g in _gpus()],
    }
