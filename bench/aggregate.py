"""Aggregation throughput and memory: UnitedLLM's exact streaming FedAvg against the read floor and Flower.

For each P (parameters per update) and N (clients), on the same update bytes, each
measurement in a fresh subprocess so its peak RSS is its own:

* ``read_floor``: one read-only pass ``x.sum()`` over every update (memory bandwidth bound).
* ``fp32_add``: a fused in-place ``acc.add_(x, alpha=w)`` in float32 (fast, order-dependent).
* ``exact_stream``: ``FedAvg.begin_round`` / ``add`` one update at a time / ``finish``,
  validation included: what the aggregator does as updates arrive.
* ``exact_batch``: ``FedAvg.step`` with all updates at once (one pass over the accumulator).
* ``flower``: ``flwr.server.strategy.aggregate.aggregate`` from its own virtual
  environment (created on first use; flwr's pins clash with ours).

Updates are K = min(N, 4) distinct random tensors reused round-robin, so input memory is
the same for every N and peak RSS shows what the aggregation itself holds. Throughput is
GB/s of update bytes (N x P x 4 bytes / seconds). Prints one JSON document.

    python bench/aggregate.py                       # P = 10M, 100M; N = 8, 32
    python bench/aggregate.py --params 10M --clients 8 --no-flower
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import venv
from pathlib import Path

DISTINCT = 4
SEED = 1234
FLOWER_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitedllm" / "bench" / "flwr-venv"


def _make_updates(params: int, clients: int) -> list:
    """K distinct float32 arrays (numpy, same bytes in every environment), reused round-robin."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    distinct = [rng.standard_normal(params, dtype=np.float32) * np.float32(1e-3) for _ in range(min(clients, DISTINCT))]
    return [distinct[i % len(distinct)] for i in range(clients)]


def _samples(clients: int) -> list[int]:
    return [100 + 37 * i for i in range(clients)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(method: str, params: int, clients: int, repeat: int) -> dict:
    """Run one measurement in this process; returns seconds (best of ``repeat``) and memory."""
    updates_np = _make_updates(params, clients)
    checksum = float(sum(float(u[:4096].astype("float64").sum()) for u in updates_np[:DISTINCT]))
    rss_inputs = _peak_rss_mb()
    samples = _samples(clients)
    if method == "flower":
        from flwr.server.strategy.aggregate import aggregate

        results = [([u], n) for u, n in zip(updates_np, samples, strict=True)]

        def run() -> None:
            aggregate(results)

    else:
        import torch

        updates = [torch.from_numpy(u) for u in updates_np]
        if method == "read_floor":

            def run() -> None:
                for x in updates:
                    x.sum()

        elif method == "fp32_add":

            def run() -> None:
                acc = torch.zeros(params)
                for x, n in zip(updates, samples, strict=True):
                    acc.add_(x, alpha=n)
                acc.div_(sum(samples))

        else:
            from unitedllm.config.types import ServerOptimizerArgs
            from unitedllm.optimizers import ClientUpdate, create

            opt = create("FedAvg", ServerOptimizerArgs())
            weights = {"w": torch.zeros(params)}
            cus = [ClientUpdate(rank=i + 1, delta={"w": x}, num_samples=n) for i, (x, n) in enumerate(zip(updates, samples, strict=True))]
            if method == "exact_stream":

                def run() -> None:
                    acc = opt.begin_round(weights, {})
                    for u in cus:
                        acc.add(u)
                    acc.finish()

            elif method == "exact_batch":

                def run() -> None:
                    opt.step(weights, cus, {})

            else:
                raise SystemExit(f"unknown method {method!r}")
    run()  # warm-up: thread pools, page faults, the kernel's first load
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    info = {
        "seconds": best,
        "gb_per_s": clients * params * 4 / best / 1e9,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "inputs_rss_mb": round(rss_inputs, 1),
        "checksum": checksum,
    }
    if method.startswith("exact"):
        from unitedllm.optimizers.exact_sum import native_enabled

        info["compiled_kernel"] = native_enabled()
    return info


def _ensure_flower(python: Path) -> str | None:
    """Create the Flower venv if needed; an error string when that is impossible."""
    if python.exists():
        return None
    try:
        venv.create(FLOWER_VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "flwr", "numpy"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"could not install flwr into {FLOWER_VENV}: {detail[-500:]}"
    return None


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _needed_mb(method: str, params: int, clients: int) -> float:
    update_mb = params * 4 / 2**20
    inputs = min(clients, DISTINCT) * update_mb
    extra = {"flower": clients + 2, "exact_stream": 5, "exact_batch": 5, "fp32_add": 1, "read_floor": 0}[method]
    return inputs + extra * update_mb + 300


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="10M,100M", help="comma-separated parameter counts (10M, 100M, ...)")
    parser.add_argument("--clients", default="8,32", help="comma-separated client counts")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower baseline")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "P", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, p, n = args.worker
        print(json.dumps(_worker(method, int(p), int(n), args.repeat)))
        return

    methods = ["read_floor", "fp32_add", "exact_stream", "exact_batch"]
    flower_python = FLOWER_VENV / "bin" / "python"
    flower_error = None
    if not args.no_flower:
        flower_error = _ensure_flower(flower_python)
        methods.append("flower")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "notes": "gb_per_s = N*P*4 bytes / best seconds; peak_rss_mb includes the K<=4 distinct input updates (inputs_rss_mb)",
        "runs": [],
    }
    for params in (_parse_size(s) for s in args.params.split(",")):
        for clients in (int(s) for s in args.clients.split(",")):
            row: dict = {"params": params, "clients": clients, "update_mb": round(params * 4 / 2**20, 1)}
            for method in methods:
                if method == "flower" and flower_error:
                    row[method] = {"skipped": flower_error}
                    continue
                need = _needed_mb(method, params, clients)
                if need > 0.8 * _mem_available_mb():
                    row[method] = {"skipped": f"needs ~{need:.0f} MB, {_mem_available_mb():.0f} MB available"}
                    continue
                python = str(flower_python) if method == "flower" else sys.executable
                cmd = [python, str(Path(__file__).resolve()), "--repeat", str(args.repeat), "--worker", method, str(params), str(clients)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    row[method] = {"error": proc.stderr[-1000:]}
                    continue
                row[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            floor = row.get("read_floor", {}).get("gb_per_s")
            flower = row.get("flower", {}).get("gb_per_s")
            for method in ("exact_stream", "exact_batch", "fp32_add"):
                m = row.get(method, {})
                if "gb_per_s" in m and floor:
                    m["vs_floor"] = round(m["gb_per_s"] / floor, 3)
                if "gb_per_s" in m and flower:
                    m["vs_flower"] = round(m["gb_per_s"] / flower, 2)
            sums = {r["checksum"] for r in row.values() if isinstance(r, dict) and "checksum" in r}
            row["same_bytes_everywhere"] = len(sums) == 1
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
