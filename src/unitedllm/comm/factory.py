"""Builds a run's Transport and BlobStore from its config, so Aggregator and Client never name a backend."""

from __future__ import annotations

from pathlib import Path

from unitedllm.comm.base import BlobStore, Transport
from unitedllm.comm.local import LocalHub, LocalTransport, MemoryBlobStore
from unitedllm.config.types import Config
from unitedllm.errors import CommError

__all__ = ["open_backend", "run_ranks"]


def run_ranks(cfg: Config) -> set[int]:
    """Every rank of the run: the aggregator 0 and clients 1..``client_num_in_total``."""
    return set(range(cfg.train_args.client_num_in_total + 1))


def open_backend(
    cfg: Config, *, rank: int, run_id: str, hub: LocalHub | None = None, base_dir: Path | None = None
) -> tuple[Transport, BlobStore]:
    """The transport and blob store for ``rank`` of run ``run_id``, per ``comm_args.backend``.

    Nothing is connected yet: enter both (``async with transport, store:``). LOCAL needs the
    run's in-process ``hub``; MQTT_S3 resolves broker, bucket and run secret from env, the
    FedML-style files and the config (``base_dir`` anchors relative file paths), and raises
    :class:`ConfigError` naming whatever is missing.
    """
    ranks = run_ranks(cfg)
    if rank not in ranks:
        raise CommError(f"rank {rank} is not in this run (ranks 0..{max(ranks)}; 0 is the aggregator)")
    backend = cfg.comm_args.backend
    if backend == "LOCAL":
        if hub is None:
            raise CommError("the LOCAL backend runs in one process: pass the run's LocalHub as hub=")
        return LocalTransport(hub, rank=rank), MemoryBlobStore(hub)
    if backend == "MQTT_S3":
        from unitedllm.comm.mqtt import MqttTransport
        from unitedllm.comm.s3 import S3BlobStore
        from unitedllm.comm.settings import resolve_mqtt, resolve_run_secret, resolve_s3

        mqtt = resolve_mqtt(cfg, base_dir=base_dir)
        s3 = resolve_s3(cfg, base_dir=base_dir)
        secret = resolve_run_secret(cfg, required=True)
        assert secret is not None
        # The aggregator hears every client; a client hears only the aggregator.
        peers = ranks - {0} if rank == 0 else {0}
        transport = MqttTransport(mqtt, rank=rank, run_id=run_id, secret=secret, peers=peers)
        return transport, S3BlobStore(s3, run_id=run_id)
    raise CommError(f"unknown comm_args.backend {backend!r} (expected LOCAL or MQTT_S3)")
