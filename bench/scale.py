"""Rounds with many clients: one aggregator and N lightweight clients over real mosquitto and SeaweedFS.

Each client is a real :class:`unitedllm.Client` with its own MQTT connection, its own S3 blobs and a
tiny least-squares trainer (a few hundred floats), so what is measured is the federation itself:
connections, presence, topic fan-out, signing, blob traffic and the aggregator's round loop. The
clients share one process (and one S3 connection pool); the aggregator runs in a process of its own,
so its CPU time and memory are its alone. The broker's message count is taken by a monitor that
subscribes to the run's topics.

    python bench/scale.py                          # N = 10, 100, 500; 3 rounds each
    python bench/scale.py --clients 10,50 --rounds 2 --out scale.json

Prints one JSON document on stdout (or to ``--out``): per N, the wall time of each round as the
aggregator recorded it (``metrics.jsonl``), the aggregator's CPU seconds and peak RSS, the client
process's RSS per client, and the messages the broker carried per round: those published on the
run's topics (seen by a monitor subscribed to them) and those the broker delivered to anyone (its
``$SYS/broker/publish/messages/sent`` counter, which mosquitto updates every 10 s, so each N waits for
one update before and one after its run). The machine's load average is recorded beside each row:
on a shared machine the times are an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import unitedllm
from unitedllm.devservices import DevServices, dev_services
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer

DIM = 64


class TinyTrainer(LocalTrainer):
    """One SGD step of least squares on 32 private points: an update of DIM + 1 floats."""

    def __init__(self, rank: int):
        gen = torch.Generator().manual_seed(rank)
        self.x = torch.randn(32, DIM, generator=gen)
        self.y = self.x @ (torch.ones(DIM) + 0.01 * rank)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(DIM), "b": torch.zeros(1)}

    def base_fingerprint(self) -> str:
        return f"scale-bench-{DIM}"

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Any = None,
        correction: Any = None,
    ) -> FitResult:
        w = weights["w"].clone()
        grad = 2 * self.x.T @ (self.x @ w + weights["b"] - self.y) / len(self.y)
        return FitResult({"w": w - 0.01 * grad, "b": weights["b"].clone()}, len(self.y), {})

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        loss = float(((self.x @ weights["w"] + weights["b"] - self.y) ** 2).mean())
        return EvalResult({"eval_loss": loss}, len(self.y))

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(dict(weights), str(directory / "model.safetensors"))


def config(n: int, rounds: int, output_dir: Path) -> dict[str, Any]:
    return {
        "common_args": {"random_seed": 0},
        "model_args": {"model_name_or_path": "scale-bench", "peft_type": "none"},
        "train_args": {
            "client_num_in_total": n,
            "client_num_per_round": n,
            "comm_round": rounds,
            "local_max_steps": 1,
            "output_dir": str(output_dir),
        },
        "validation_args": {"is_aggregator_test": False, "test_on_clients": "no"},
        "comm_args": {"backend": "MQTT_S3", "round_timeout_s": 300, "join_timeout_s": 300},
    }


def rank_keys(n: int) -> dict[str, str]:
    return {f"UNITEDLLM_RANK_KEY_{rank}": secrets.token_hex(32) for rank in range(n + 1)}


async def run_clients(cfg: Any, n: int, run_id: str) -> None:
    async def one(rank: int) -> None:
        async with unitedllm.Client(cfg, rank=rank, run_id=run_id, trainer=TinyTrainer(rank)) as client:
            await client.run()

    async with asyncio.TaskGroup() as group:
        for rank in range(1, n + 1):
            group.create_task(one(rank), name=f"client-{rank}")


async def count_messages(services: DevServices, run_id: str, counter: list[int]) -> None:
    """Count the messages published on the run's topics (one subscriber's view), until cancelled."""
    import aiomqtt

    settings = services.mqtt.settings()
    async with aiomqtt.Client(
        settings.host, settings.port, username=settings.username, password=settings.password
    ) as monitor:
        await monitor.subscribe(f"unitedllm/{run_id}/#", qos=1)
        async for _ in monitor.messages:
            counter[0] += 1


class BrokerCounter:
    """The broker's own count of PUBLISH packets it sent (to every subscriber), as mosquitto reports it."""

    TOPIC = "$SYS/broker/publish/messages/sent"

    def __init__(self, services: DevServices):
        self.services = services
        self.value = -1
        self._updated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BrokerCounter:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        import aiomqtt

        settings = self.services.mqtt.settings()
        async with aiomqtt.Client(
            settings.host, settings.port, username=settings.username, password=settings.password
        ) as monitor:
            await monitor.subscribe(self.TOPIC, qos=0)
            async for message in monitor.messages:
                self.value = int(bytes(message.payload).decode())
                self._updated.set()

    async def fresh(self) -> int:
        """The counter at its next update (mosquitto publishes it every 10 s)."""
        self._updated.clear()
        await asyncio.wait_for(self._updated.wait(), 30)
        return self.value


async def measure(
    services: DevServices, broker: BrokerCounter, n: int, rounds: int, workdir: Path
) -> dict[str, Any]:
    run_id = f"scale-{n}-{secrets.token_hex(4)}"
    output_dir = workdir / run_id
    raw = config(n, rounds, output_dir)
    cfg = unitedllm.load_config(raw, run_id=run_id)
    keys = rank_keys(n)
    env = {**os.environ, **services.env(), **keys}
    client_env = {**services.env(), **keys}
    os.environ.update(client_env)  # this process holds every client rank's key (they are all here)
    config_file = workdir / f"{run_id}.json"
    config_file.write_text(json.dumps(raw))
    counter = [0]
    monitor = asyncio.create_task(count_messages(services, run_id, counter))
    await asyncio.sleep(0.5)  # the monitor's subscription is in place
    delivered_before = await broker.fresh()
    load_before = os.getloadavg()
    cpu_before = time.process_time()
    fds = FdWatch()
    started = time.perf_counter()
    aggregator = subprocess.Popen(
        [sys.executable, __file__, "--role", "aggregator", "--config", str(config_file), "--run-id", run_id],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    rss_before = _rss_mib()
    async with fds:
        await run_clients(cfg, n, run_id)
    clients_cpu = time.process_time() - cpu_before
    rss_after = _rss_mib()
    out, _ = await asyncio.to_thread(aggregator.communicate)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    await asyncio.sleep(1.0)  # the last offline presences reach the monitor
    monitor.cancel()
    await asyncio.gather(monitor, return_exceptions=True)
    delivered = await broker.fresh() - delivered_before
    if aggregator.returncode != 0:
        raise SystemExit(f"aggregator for N={n} exited {aggregator.returncode}")
    usage = json.loads(out.strip().splitlines()[-1])
    round_events = [
        e
        for e in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
        if e.get("event") == "round" and "seconds" in e
    ]
    round_seconds = [e["seconds"] for e in round_events]
    return {
        "clients": n,
        "rounds": rounds,
        "wall_s": round(wall, 2),
        "round_s": [round(s, 3) for s in round_seconds],
        # Where each round's time went, as the aggregator measured it (when it records phases).
        "round_phases_s": [
            {k: round(v, 3) for k, v in e["phases"].items()} for e in round_events if e.get("phases")
        ],
        "aggregator_cpu_s": usage["cpu_s"],
        "aggregator_peak_rss_mib": usage["peak_rss_mib"],
        "aggregator_peak_open_files": usage["peak_open_files"],
        "clients_cpu_s": round(clients_cpu, 2),
        "client_process_rss_mib_per_client": round((rss_after - rss_before) / n, 3),
        "client_process_peak_open_files": fds.peak,
        "run_topic_messages_per_round": round(counter[0] / rounds, 1),
        # Includes a few of the broker's own $SYS updates to the counter's subscriber.
        "broker_deliveries_per_round": round(delivered / rounds, 1),
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }


class FdWatch:
    """The most file descriptors this process held at once while inside (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FdWatch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _open_files())
            await asyncio.sleep(0.05)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def aggregator_main(config_file: Path, run_id: str) -> None:
    cfg = unitedllm.load_config(json.loads(config_file.read_text()), run_id=run_id)

    async def main() -> int:
        async with FdWatch() as fds:
            async with unitedllm.Aggregator(cfg, run_id=run_id, trainer=TinyTrainer(0)) as aggregator:
                await aggregator.run()
        return fds.peak

    peak_open_files = asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "peak_open_files": peak_open_files,
            }
        )
    )


async def bench(clients: list[int], rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="unitedllm-scale-") as tmp:
        async with dev_services(Path(tmp) / "services", tls=False) as services:
            async with BrokerCounter(services) as broker:
                rows = []
                for n in clients:
                    rows.append(await measure(services, broker, n, rounds, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "bench": "scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "shared": "2 cores shared with other work: see each row's load average; times are upper bounds",
        },
        "rows": rows,
    }


def client_counts(text: str) -> list[int]:
    """``--clients``: comma-separated positive counts (argparse turns the error into one usage line)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every client count must be at least 1")
    return counts


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients", type=client_counts, default="10,100,500", help="comma-separated client counts"
    )
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--role", choices=["bench", "aggregator"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "aggregator":
        aggregator_main(args.config, args.run_id)
        return
    result = asyncio.run(bench(args.clients, args.rounds))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
