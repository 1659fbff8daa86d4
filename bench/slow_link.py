"""Round time per update codec when every rank reaches the S3 store over its own slow link.

One aggregator (its own process) and a few real :class:`unitedllm.Client` s over real mosquitto and
SeaweedFS on 127.0.0.1, with a model of ``--params`` fp32 values whose update is a fresh random
step each round. Each rank talks to S3 through its own port of a bandwidth-limiting TCP proxy (a
process of its own: a token bucket per direction and port, ``--mbit`` each way), so each rank has
a link of its own, as clients on home or office lines do; MQTT is not limited (control messages are
tiny). Per codec it reports the aggregator's round times and the round's *tail*: from the moment
the last update's message arrives to the round being finished (folded, stepped, safe on disk),
with the aggregator's overlapped fetch/fold (the next update is fetched while the current one
folds) on and off.

    python bench/slow_link.py                                   # 100 Mbit/s, 4 clients, 3 rounds
    python bench/slow_link.py --codecs none,int8 --params 4e6 --out bench/results/slow-link.json

Loopback only: the proxy listens on 127.0.0.1 and forwards to the SeaweedFS it started with.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
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
from unitedllm.comm.s3 import S3BlobStore
from unitedllm.devservices import DevServices, dev_services
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer

CHUNK = 64 * 1024


# -- the slow link -------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` bytes per second with bursts up to ``burst`` bytes; ``take`` waits for its share."""

    def __init__(self, rate: float, burst: int = 2 * CHUNK):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # first come, first served: concurrent transfers share the rate
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            await bucket.take(len(chunk))
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def proxy_main(target: str, mbit: float, links: int) -> None:
    """Serve ``links`` ports, each a link of ``mbit`` Mbit/s each way to ``target``; print the ports."""
    host, port = target.rsplit(":", 1)
    rate = mbit * 1e6 / 8

    def link() -> Any:
        up, down = TokenBucket(rate), TokenBucket(rate)

        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            server_r, server_w = await asyncio.open_connection(host, int(port))
            await asyncio.gather(_pipe(client_r, server_w, up), _pipe(server_r, client_w, down))

        return handle

    servers = [await asyncio.start_server(link(), "127.0.0.1", 0) for _ in range(links)]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# -- the federation ------------------------------------------------------------------------------


class StepTrainer(LocalTrainer):
    """A model of ``params`` fp32 values; each round's update is a fresh random step (nothing repeats)."""

    def __init__(self, rank: int, params: int):
        self.rank, self.params = rank, params

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(self.params)}

    def base_fingerprint(self) -> str:
        return f"slow-link-bench-{self.params}"

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Any = None,
        correction: Any = None,
    ) -> FitResult:
        gen = torch.Generator().manual_seed(1000 * round_idx + self.rank)
        step = 0.01 * torch.randn(self.params, generator=gen)
        return FitResult({"w": weights["w"] + step}, 1, {})

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        return EvalResult({"eval_loss": float(weights["w"].square().mean())}, 1)

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(dict(weights), str(directory / "model.safetensors"))


def config(
    clients: int, rounds: int, codec: str, output_dir: Path, global_codec: str = "none"
) -> dict[str, Any]:
    return {
        "common_args": {"random_seed": 0},
        "model_args": {"model_name_or_path": "slow-link-bench", "peft_type": "none"},
        "train_args": {
            "client_num_in_total": clients,
            "client_num_per_round": clients,
            "comm_round": rounds,
            "local_max_steps": 1,
            "output_dir": str(output_dir),
        },
        "validation_args": {"is_aggregator_test": False, "test_on_clients": "no"},
        "comm_args": {
            "backend": "MQTT_S3",
            "round_timeout_s": 600,
            "join_timeout_s": 120,
            "update_codec": codec,
            "update_codec_topk_fraction": 0.01,
            "global_codec": global_codec,
        },
    }


def aggregator_main(config_file: Path, run_id: str, params: int, overlap: bool) -> None:
    """The aggregator's process: the round loop, with the time each update's message arrived."""
    from unitedllm.round_collection import RoundFold

    RoundFold.overlap = overlap
    arrivals: list[float] = []
    submit = RoundFold.submit

    def noting(self: RoundFold, message: Any) -> None:
        arrivals.append(time.time())
        submit(self, message)

    RoundFold.submit = noting  # type: ignore[method-assign]
    cfg = unitedllm.load_config(json.loads(config_file.read_text()), run_id=run_id)

    async def main() -> None:
        async with unitedllm.Aggregator(cfg, run_id=run_id, trainer=StepTrainer(0, params)) as aggregator:
            await aggregator.run()

    asyncio.run(main())
    print(json.dumps({"arrivals": arrivals}))


async def run_once(
    services: DevServices,
    ports: list[int],
    *,
    codec: str,
    overlap: bool,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    from scale import rank_keys

    run_id = f"slow-{codec}-{'on' if overlap else 'off'}-{os.urandom(3).hex()}"
    output_dir = workdir / run_id
    raw = config(args.clients, args.rounds, codec, output_dir, args.global_codec)
    cfg = unitedllm.load_config(raw, run_id=run_id)
    keys = rank_keys(args.clients)
    s3 = services.s3.settings(bucket=services.bucket)
    proxied = [dataclasses.replace(s3, endpoint_url=f"http://127.0.0.1:{port}") for port in ports]
    os.environ.update({**services.env(), **keys})
    config_file = workdir / f"{run_id}.json"
    config_file.write_text(json.dumps(raw))
    agg_env = {**os.environ, "UNITEDLLM_S3_ENDPOINT_URL": proxied[0].endpoint_url}
    aggregator = subprocess.Popen(
        [sys.executable, __file__, "--role", "aggregator", "--config", str(config_file), "--run-id", run_id]
        + ["--params", str(args.params)]
        + ([] if overlap else ["--no-overlap"]),
        env=agg_env,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def client(rank: int) -> None:
        store = S3BlobStore(proxied[rank], run_id=run_id)
        trainer = StepTrainer(rank, args.params)
        async with unitedllm.Client(cfg, rank=rank, run_id=run_id, trainer=trainer, store=store) as c:
            await c.run()

    async with asyncio.TaskGroup() as group:
        for rank in range(1, args.clients + 1):
            group.create_task(client(rank))
    out, _ = await asyncio.to_thread(aggregator.communicate)
    if aggregator.returncode != 0:
        raise SystemExit(f"the aggregator for codec {codec} exited {aggregator.returncode}")
    arrivals = json.loads(out.strip().splitlines()[-1])["arrivals"]
    events = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e.get("event") == "round"]
    update_bytes = [e["update_bytes"] for e in events if e.get("event") == "train" and "update_bytes" in e]
    per_round = args.clients
    tails = [
        round(r["time"] - max(arrivals[i * per_round : (i + 1) * per_round]), 3) for i, r in enumerate(rounds)
    ]
    return {
        "codec": codec,
        "global_codec": args.global_codec,
        "overlap": overlap,
        "round_s": [round(r["seconds"], 3) for r in rounds],
        "tail_s": tails,
        "update_bytes": statistics.median(update_bytes) if update_bytes else None,
        "global_bytes": [e.get("global_bytes") for e in events if e.get("event") == "round_start"],
        "phases_s": [r.get("phases") for r in rounds],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="unitedllm-slow-link-") as tmp:
        async with dev_services(Path(tmp) / "services", tls=False) as services:
            target = services.s3.settings(bucket=services.bucket).endpoint_url.split("//", 1)[1].rstrip("/")
            proxy = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--role",
                "proxy",
                "--target",
                target,
                "--mbit",
                str(args.mbit),
                "--links",
                str(args.clients + 1),
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert proxy.stdout is not None
                ports = json.loads(await proxy.stdout.readline())
                for codec in args.codecs.split(","):
                    for overlap in args.overlap:
                        row = await run_once(
                            services, ports, codec=codec, overlap=overlap, args=args, workdir=Path(tmp)
                        )
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                proxy.terminate()
                await proxy.wait()
    return {
        "bench": "slow_link",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "link": f"each rank its own {args.mbit:g} Mbit/s each way to S3 (token-bucket proxy on 127.0.0.1); MQTT not limited",
        "clients": args.clients,
        "params": args.params,
        "global_codec": args.global_codec,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "shared": "2 cores shared with other work: see each row's load average; times are upper bounds",
        },
        "rows": rows,
    }


def codec_list(text: str) -> str:
    """``--codecs``: comma-separated names of registered update codecs."""
    from unitedllm.comm.codecs import available

    unknown = [name for name in text.split(",") if name not in available()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown codec(s) {unknown} in {text!r} (known: {available()})")
    return text


def params(text: str) -> int:
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of parameters")
    return value


def global_codec(text: str) -> str:
    from unitedllm.comm.codecs.global_copy import GLOBAL_CODECS

    if text not in ("none", *GLOBAL_CODECS):
        raise argparse.ArgumentTypeError(
            f"unknown global codec {text!r} (known: none, {', '.join(GLOBAL_CODECS)})"
        )
    return text


def overlap_modes(text: str) -> list[bool]:
    modes = {"on": True, "off": False}
    parts = text.split(",")
    if not parts or any(part not in modes for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give on, off or on,off")
    return [modes[part] for part in parts]


def megabits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive link speed in Mbit/s")
    return value


def main() -> None:
    from scale import positive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", type=codec_list, default="none,bf16,int8,topk")
    parser.add_argument("--clients", type=positive, default=4)
    parser.add_argument("--params", type=params, default=4_000_000)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument(
        "--global-codec", type=global_codec, default="none", help="comm_args.global_codec of every run"
    )
    parser.add_argument(
        "--overlap", type=overlap_modes, default=[True, False], help="on, off or on,off (the default)"
    )
    parser.add_argument("--mbit", type=megabits, default=100.0, help="each rank's link to S3, each way")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--role", choices=["bench", "aggregator", "proxy"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--links", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "proxy":
        asyncio.run(proxy_main(args.target, args.mbit, args.links))
        return
    if args.role == "aggregator":
        aggregator_main(args.config, args.run_id, args.params, overlap=not args.no_overlap)
        return
    result = asyncio.run(bench(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
