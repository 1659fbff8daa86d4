"""Benchmark: where a quickstart round's time goes, against the target "slowest client's fetch + train +
upload, plus the aggregator's fold and finish".

    python bench/round_phases.py [--backend LOCAL,MQTT_S3,PROCESSES] [--runs 2] [--src DIR] [--label NAME]
                                 [--set KEY=VALUE ...] [--out FILE]

Runs ``examples/quickstart.yaml`` (4 rounds, 3 clients) ``--runs`` times per backend with the
UnitedLLM sources in ``--src`` (default: this checkout's ``src``; give an unpacked older revision's
``src`` to measure "before"), and prints JSON. ``LOCAL`` and ``MQTT_S3`` run every rank in one
process (``unitedllm run``: the ranks take turns on one shared model); ``PROCESSES`` runs
``unitedllm server`` and one ``unitedllm client`` process per rank (each its own model, one torch
thread each) over MQTT_S3. MQTT_S3 and PROCESSES start their own mosquitto + SeaweedFS on 127.0.0.1. Per round (rounds 1..3; round 0 builds the model and data):

- ``period_s``: time between this round's ``round`` event and the previous one's (comparable across
  revisions: it always covers the whole round, resume point included);
- ``target_basis_s``: the slowest client's download + train + upload seconds plus the aggregator's
  fold + finish (its ``aggregation_seconds`` where phases were not recorded); ``ratio`` = period / basis,
  the target being <= 1.1;
- ``train_sum_s``: all clients' train seconds added up (in one process they take turns on one model);
- ``phases``: the aggregator's and each client's seconds per phase, where recorded.

Per run also the global model's bytes per round as sent (``global_bytes``) and the aggregator's
eval loss after the last round; ``--set`` passes config overrides to every rank (for example
``comm_args.global_codec=int8``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


OVERRIDES: list[str] = []  # --set KEY=VALUE, passed to every rank


def run_quickstart(src: Path, backend: str, out: Path, env_extra: dict[str, str]) -> Path:
    """One quickstart run with the sources in ``src``; returns its output directory."""
    run_id = f"bench-{backend.lower()}-{int(time.time() * 1000)}"
    env = {**os.environ, **env_extra, "PYTHONPATH": str(src)}
    command = [
        sys.executable,
        "-m",
        "unitedllm",
        "run",
        str(QUICKSTART),
        "--quiet",
        "--run-id",
        run_id,
        "--set",
        f"train_args.output_dir={out}/{{run_id}}",
        "--set",
        f"comm_args.backend={backend}",
        *(x for o in OVERRIDES for x in ("--set", o)),
    ]
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    return out / run_id


def run_processes(src: Path, out: Path, env_extra: dict[str, str], clients: int = 3) -> Path:
    """One quickstart run as a server process and one process per client; returns its output directory."""
    run_id = f"bench-processes-{int(time.time() * 1000)}"
    env = {**os.environ, **env_extra, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    common = [str(QUICKSTART), "--run-id", run_id, "--set", f"train_args.output_dir={out}/{{run_id}}"]
    common += ["--set", "comm_args.backend=MQTT_S3", *(x for o in OVERRIDES for x in ("--set", o))]
    roles = [["server"], *(["client", "--rank", str(rank)] for rank in range(1, clients + 1))]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "unitedllm", *role, *common],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for role in roles
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{proc.args[3]} exited {proc.returncode}: {err.decode()[-2000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out / run_id


def summarise(run_dir: Path) -> dict[str, Any]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = {e["round"]: e for e in events if e["event"] == "round"}
    trained: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] == "train":
            trained.setdefault(e["round"], []).append(e)
    rows = []
    for r in sorted(rounds)[1:]:
        row, clients = rounds[r], trained.get(r, [])

        def critical(e: dict[str, Any]) -> float:
            m = e["metrics"]
            return float(
                m.get("download_seconds", 0) + m.get("train_seconds", 0) + m.get("upload_seconds", 0)
            )

        slowest = max(clients, key=critical)
        phases = row.get("phases")
        aggregator = (
            phases.get("fold", 0.0) + phases.get("finish", 0.0)
            if phases
            else row.get("aggregation_seconds") or 0.0
        )
        period = row["time"] - rounds[r - 1]["time"]
        basis = critical(slowest) + aggregator
        rows.append(
            {
                "round": r,
                "period_s": round(period, 3),
                "recorded_seconds": round(row["seconds"], 3),
                "target_basis_s": round(basis, 3),
                "ratio": round(period / basis, 3),
                "train_sum_s": round(sum(float(e["metrics"].get("train_seconds", 0)) for e in clients), 3),
                "phases": {
                    "aggregator": phases,
                    **{
                        f"client_{e['rank']}": e.get("phases")
                        for e in sorted(clients, key=lambda e: e["rank"])
                    },
                },
            }
        )
    evals = [e for e in events if e["event"] == "eval" and e["rank"] == 0 and e["loss"] is not None]
    return {
        "rounds": rows,
        "median_period_s": statistics.median(r["period_s"] for r in rows),
        "global_bytes": [e["global_bytes"] for e in events if e["event"] == "round_start"],
        "final_eval_loss": evals[-1]["loss"] if evals else None,
    }


async def with_services(backend: str, runs: int, src: Path, out: Path) -> list[dict[str, Any]]:
    from unitedllm.devservices import dev_services

    async with dev_services(tls=False) as services:
        env = services.env(run_secret="round-phases-bench")
        if backend == "PROCESSES":
            return [summarise(await asyncio.to_thread(run_processes, src, out, env)) for _ in range(runs)]
        return [
            summarise(await asyncio.to_thread(run_quickstart, src, "MQTT_S3", out, env)) for _ in range(runs)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="LOCAL", help="comma-separated: LOCAL, MQTT_S3")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    parser.add_argument("--label", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    OVERRIDES.extend(args.set)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for backend in backends:
        if backend not in ("LOCAL", "MQTT_S3", "PROCESSES"):
            parser.error(f"--backend: unknown backend {backend!r}; choose LOCAL, MQTT_S3 or PROCESSES")
    result: dict[str, Any] = {
        "bench": "round_phases",
        "label": args.label,
        "overrides": args.set,
        "src": str(args.src),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "load_average_before": os.getloadavg(),
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="unitedllm-round-phases-") as tmp:
        out = Path(tmp)
        for backend in backends:
            print(f"{backend}: {args.runs} run(s)", file=sys.stderr)
            if backend == "LOCAL":
                runs = [summarise(run_quickstart(args.src, "LOCAL", out, {})) for _ in range(args.runs)]
            else:
                runs = asyncio.run(with_services(backend, args.runs, args.src, out))
            result["backends"][backend] = {
                "runs": runs,
                "median_period_s": statistics.median(r["median_period_s"] for r in runs),
                "median_ratio": statistics.median(row["ratio"] for r in runs for row in r["rounds"]),
            }
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
