"""Aggregation throughput and memory: UnitedLLM's exact streaming FedAvg against the read floor and Flower.

For each P (parameters per update) and N (clients), on the same update bytes, each
measurement in a fresh subprocess so its peak RSS is its own:

* ``read_floor``: one read-only pass ``x.sum()`` over every update (memory bandwidth bound),
  the faster of torch's threads and one thread.
* ``fp32_add``: a fused in-place ``acc.add_(x, alpha=w)`` in float32 (fast, order-dependent).
* ``exact_stream``: ``FedAvg.begin_round`` / ``add`` one update at a time / ``finish``,
  validation included: what the aggregator does as updates arrive.
* ``exact_batch``: ``FedAvg.step`` with all updates at once (one pass: each update read once,
  the sum never written to memory), validation included.
* ``flower``: ``flwr.server.strategy.aggregate.aggregate`` from its own virtual
  environment (created on first use; flwr's pins clash with ours).

Updates are N windows of P values over one random buffer, each starting S = min(P, 16M)
values after the previous one: disjoint when P <= 16M, else overlapping, so input memory
stays below (P + 16M·N)·4 bytes while no two updates share bytes that could still be in a
cache when the other reads them (64 MB·N are read in between). Peak RSS minus the inputs
shows what the aggregation itself holds. Throughput is GB/s of update bytes
(N x P x 4 bytes / seconds).

On a shared machine one process's timings swing with its neighbours' load, so every
method runs in ``--trials`` fresh processes, interleaved (the order rotates per trial),
each timing ``--repeat`` runs after a warm-up; the best and the median of all of them are
reported, with ``noise`` = median / best - 1. Then one more process times the floor and
each torch method back to back, trials x repeat times: ``vs_floor_paired`` is the median
(and quartiles) of those ratios, the steadiest comparison when the load keeps changing.
Prints one JSON document (``--out`` also writes it to a file).

    python bench/aggregate.py                       # P = 10M, 100M; N = 8, 32
    python bench/aggregate.py --params 10M --clients 8 --no-flower --out result.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from pathlib import Path

WINDOW_STRIDE = 16 * 2**20  # values between the starts of two updates' windows (64 MB, twice the L3)
SEED = 1234
FLOWER_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitedllm" / "bench" / "flwr-venv"
)
METHODS = ("read_floor", "fp32_add", "exact_stream", "exact_batch", "flower")
OURS = ("exact_stream", "exact_batch", "fp32_add")
TARGET_VS_FLOOR = 0.5
TARGET_VS_FLOWER = 3.0


def _stride(params: int) -> int:
    return min(params, WINDOW_STRIDE)


def _make_updates(params: int, clients: int) -> list:
    """N float32 windows over one random buffer (numpy, same bytes in every environment)."""
    import numpy as np

    stride = _stride(params)
    rng = np.random.default_rng(SEED)
    buffer = rng.standard_normal(params + (clients - 1) * stride, dtype=np.float32)
    buffer *= np.float32(1e-3)
    return [buffer[i * stride : i * stride + params] for i in range(clients)]


def _samples(clients: int) -> list[int]:
    return [100 + 37 * i for i in range(clients)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Pass = Callable[[], None]


def _torch_passes(method: str, updates: list, samples: list[int], weights: dict) -> tuple[Pass, ...]:
    """The ways to run ``method`` once; its time is the fastest of them."""
    import torch

    if method == "read_floor":
        threads = torch.get_num_threads()

        def read() -> None:
            for x in updates:
                x.sum()

        def read_one_thread() -> None:
            torch.set_num_threads(1)
            try:
                read()
            finally:
                torch.set_num_threads(threads)

        # The faster of torch's threads and one thread: when a neighbour takes a core,
        # torch's multi-threaded reductions collapse, and a collapsed floor would flatter
        # everything compared with it.
        return read, read_one_thread
    if method == "fp32_add":

        def fp32_add() -> None:
            acc = torch.zeros(updates[0].numel())
            for x, n in zip(updates, samples, strict=True):
                acc.add_(x, alpha=n)
            acc.div_(sum(samples))

        return (fp32_add,)
    from unitedllm.config.types import ServerOptimizerArgs
    from unitedllm.optimizers import ClientUpdate, create

    opt = create("FedAvg", ServerOptimizerArgs())
    cus = [
        ClientUpdate(rank=i + 1, delta={"w": x}, num_samples=n)
        for i, (x, n) in enumerate(zip(updates, samples, strict=True))
    ]
    if method == "exact_stream":

        def stream() -> None:
            acc = opt.begin_round(weights, {})
            for u in cus:
                acc.add(u)
            acc.finish()

        return (stream,)
    if method == "exact_batch":
        return (lambda: opt.step(weights, cus, {}),)
    raise SystemExit(f"unknown method {method!r}")


def _time(passes: tuple[Pass, ...]) -> float:
    timed = []
    for p in passes:
        start = time.perf_counter()
        p()
        timed.append(time.perf_counter() - start)
    return min(timed)


def _worker(method: str, params: int, clients: int, repeat: int) -> dict:
    """Run one measurement in this process: every timed run's seconds, and memory."""
    updates_np = _make_updates(params, clients)
    checksum = float(sum(float(u[:4096].astype("float64").sum()) for u in updates_np))
    samples = _samples(clients)
    if method == "flower":
        from flwr.server.strategy.aggregate import aggregate

        results = [([u], n) for u, n in zip(updates_np, samples, strict=True)]
        rss_inputs = _peak_rss_mb()
        passes: tuple[Pass, ...] = (lambda: aggregate(results),)
    else:
        import torch

        updates = [torch.from_numpy(u) for u in updates_np]
        weights = {"w": torch.zeros(params)}  # the global model: held by the aggregator anyway
        rss_inputs = _peak_rss_mb()
        passes = _torch_passes(method, updates, samples, weights)
    _time(passes)  # warm-up: thread pools, page faults, the kernel's first load
    seconds = [_time(passes) for _ in range(repeat)]
    info = {
        "seconds": seconds,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "inputs_rss_mb": round(rss_inputs, 1),
        "checksum": checksum,
    }
    if method.startswith("exact"):
        from unitedllm.optimizers.exact_sum import native_enabled

        info["compiled_kernel"] = native_enabled()
    return info


def _paired_worker(params: int, clients: int, rounds: int) -> dict:
    """Every torch method timed right after the floor, ``rounds`` times, in one process.

    A neighbour's load shifts from second to second; a floor and a method timed back to
    back see about the same load, so the median of their ratios is steadier than a ratio
    of two bests taken at different moments.
    """
    import torch

    updates = [torch.from_numpy(u) for u in _make_updates(params, clients)]
    weights = {"w": torch.zeros(params)}
    samples = _samples(clients)
    floor = _torch_passes("read_floor", updates, samples, weights)
    others = {m: _torch_passes(m, updates, samples, weights) for m in OURS}
    for passes in (floor, *others.values()):
        _time(passes)
    ratios: dict[str, list[float]] = {m: [] for m in OURS}
    for _ in range(rounds):
        for method, passes in others.items():
            base = _time(floor)
            ratios[method].append(base / _time(passes))
    out = {}
    for method, rs in ratios.items():
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
        out[method] = {
            "median": round(q[1], 3),
            "quartiles": [round(q[0], 3), round(q[2], 3)],
            "rounds": len(rs),
        }
    return out


def _ensure_flower(python: Path) -> str | None:
    """Create the Flower venv if needed; an error string when that is impossible."""
    if python.exists():
        return None
    try:
        venv.create(FLOWER_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "flwr", "numpy"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"could not install flwr into {FLOWER_VENV}: {detail[-500:]}"
    return None


def _meminfo(key: str) -> float:
    """A /proc/meminfo value in MB (inf where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _needed_mb(method: str, params: int, clients: int) -> float:
    update_mb = params * 4 / 2**20
    inputs = (params + (clients - 1) * _stride(params)) * 4 / 2**20
    extra = {"flower": clients + 2, "exact_stream": 5, "exact_batch": 5, "fp32_add": 2, "read_floor": 1}[
        method
    ]
    return inputs + extra * update_mb + 300


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        import torch

        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    return {
        "cpus": os.cpu_count(),
        "processor": model,
        "memory_mb": round(_meminfo("MemTotal")),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": threads,
        "transparent_hugepages": thp.read_text().strip() if thp.exists() else None,
    }


def _summarise(runs: list[dict], params: int, clients: int) -> dict:
    """Best and median over every timed run of every trial; memory from the worst trial."""
    seconds = sorted(s for r in runs for s in r["seconds"])
    best, median = seconds[0], statistics.median(seconds)
    update_mb = params * 4 / 2**20
    peak = max(r["peak_rss_mb"] for r in runs)
    inputs = max(r["inputs_rss_mb"] for r in runs)
    out = {
        "gb_per_s": round(clients * params * 4 / best / 1e9, 3),
        "gb_per_s_median": round(clients * params * 4 / median / 1e9, 3),
        "seconds_best": round(best, 5),
        "seconds_median": round(median, 5),
        "noise": round(median / best - 1, 3),
        "timed_runs": len(seconds),
        "peak_rss_mb": peak,
        "inputs_rss_mb": inputs,
        "aggregation_rss_mb": round(peak - inputs, 1),
        "aggregation_rss_updates": round((peak - inputs) / update_mb, 2),
        "checksum": runs[0]["checksum"],
    }
    if "compiled_kernel" in runs[0]:
        out["compiled_kernel"] = all(r["compiled_kernel"] for r in runs)
    return out


def _ratios(row: dict) -> None:
    floor, flower = row.get("read_floor", {}), row.get("flower", {})
    for method in OURS:
        m = row.get(method, {})
        if "gb_per_s" not in m:
            continue
        for base, name in ((floor, "floor"), (flower, "flower")):
            if "gb_per_s" in base:
                m[f"vs_{name}"] = round(m["gb_per_s"] / base["gb_per_s"], 3)
                m[f"vs_{name}_median"] = round(m["gb_per_s_median"] / base["gb_per_s_median"], 3)
        steadiest = m.get("vs_floor_paired", {}).get("median", m.get("vs_floor"))
        if method != "fp32_add" and steadiest is not None:
            m["meets_floor_target"] = steadiest >= TARGET_VS_FLOOR
        if method != "fp32_add" and "vs_flower" in m:
            m["meets_flower_target"] = m["vs_flower"] >= TARGET_VS_FLOWER


def _run_paired(args: argparse.Namespace, env: dict[str, str], params: int, clients: int) -> dict:
    """vs_floor from back-to-back timings in one process (see _paired_worker); {} when it cannot run."""
    if _needed_mb("exact_batch", params, clients) > 0.8 * _meminfo("MemAvailable"):
        return {}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--trials",
        str(args.trials),
        "--repeat",
        str(args.repeat),
    ]
    proc = subprocess.run(
        [*cmd, "--worker", "paired", str(params), str(clients)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", default="10M,100M", help="comma-separated parameter counts (10M, 100M, ...)"
    )
    parser.add_argument("--clients", default="8,32", help="comma-separated client counts")
    parser.add_argument("--trials", type=int, default=3, help="fresh processes per method, interleaved")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per process, after a warm-up")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower baseline")
    parser.add_argument("--out", type=Path, help="also write the JSON document to this file")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "P", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, p, n = args.worker
        if method == "paired":
            print(json.dumps(_paired_worker(int(p), int(n), args.trials * args.repeat)))
        else:
            print(json.dumps(_worker(method, int(p), int(n), args.repeat)))
        return

    methods = [m for m in METHODS if m != "flower" or not args.no_flower]
    flower_python = FLOWER_VENV / "bin" / "python"
    flower_error = _ensure_flower(flower_python) if "flower" in methods else None
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "load_average_before": os.getloadavg(),
        "settings": {"trials": args.trials, "repeat": args.repeat, "window_stride": WINDOW_STRIDE},
        "targets": {"vs_floor": TARGET_VS_FLOOR, "vs_flower": TARGET_VS_FLOWER},
        "notes": (
            "gb_per_s = N*P*4 bytes / best seconds (gb_per_s_median: median); vs_* compare best with best "
            "(vs_*_median: medians); vs_floor_paired: median and quartiles of floor/method times measured "
            "back to back in one process (meets_floor_target uses its median); "
            "aggregation_rss = peak RSS minus the inputs (updates + global model)"
        ),
        "runs": [],
    }
    for params in (_parse_size(s) for s in args.params.split(",")):
        for clients in (int(s) for s in args.clients.split(",")):
            row: dict = {"params": params, "clients": clients, "update_mb": round(params * 4 / 2**20, 1)}
            results: dict[str, list[dict]] = {m: [] for m in methods}
            for trial in range(args.trials):
                shift = trial % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    if method in row:  # skipped or failed before
                        continue
                    if method == "flower" and flower_error:
                        row[method] = {"skipped": flower_error}
                        continue
                    need = _needed_mb(method, params, clients)
                    if need > 0.8 * _meminfo("MemAvailable"):
                        row[method] = {
                            "skipped": f"needs ~{need:.0f} MB, {_meminfo('MemAvailable'):.0f} MB available"
                        }
                        continue
                    python = str(flower_python) if method == "flower" else sys.executable
                    cmd = [python, str(Path(__file__).resolve()), "--repeat", str(args.repeat)]
                    proc = subprocess.run(
                        [*cmd, "--worker", method, str(params), str(clients)],
                        capture_output=True, text=True, env=env, check=False,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        row[method] = {"error": proc.stderr[-1000:]}
                        continue
                    results[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for method in methods:
                if method not in row:
                    row[method] = _summarise(results[method], params, clients)
            paired = _run_paired(args, env, params, clients)
            for method, ratio in paired.items():
                row[method]["vs_floor_paired"] = ratio
            _ratios(row)
            sums = {r["checksum"] for r in row.values() if isinstance(r, dict) and "checksum" in r}
            row["same_bytes_everywhere"] = len(sums) == 1
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
