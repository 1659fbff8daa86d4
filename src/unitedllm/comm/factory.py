"""Builds a run's Transport and BlobStore from its config, so Aggregator and Client never name a backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from unitedllm.comm.base import BlobStore, Transport
from unitedllm.config.types import Config
from unitedllm.errors import CommError, ConfigError, ConfigProblem
from unitedllm.protocol.signing import RankKeys

if TYPE_CHECKING:
    from unitedllm.comm.local import LocalHub

__all__ = ["open_backend", "open_network_backend", "run_ranks"]


def run_ranks(cfg: Config) -> set[int]:
    """Every rank of the run: the aggregator 0 and clients 1..``client_num_in_total``."""
    return set(range(cfg.train_args.client_num_in_total + 1))


def open_backend(
    cfg: Config, *, rank: int, run_id: str, hub: LocalHub | None = None, base_dir: Path | None = None
) -> tuple[Transport, BlobStore]:
    """The transport and blob store for ``rank``: the in-process hub's when given, else the configured backend.

    Nothing is connected yet: enter both (``async with store, transport:``).
    """
    if hub is not None:
        from unitedllm.comm.local import LocalTransport, MemoryBlobStore

        return LocalTransport(hub, rank=rank), MemoryBlobStore(hub)
    if cfg.comm_args.backend == "LOCAL":
        raise ConfigError(
            ConfigProblem(
                "comm_args.backend",
                "LOCAL connects roles inside one process only; use `unitedllm run` for that, "
                "or MQTT_S3 to run the aggregator and clients as separate processes",
            )
        )
    return open_network_backend(cfg, rank=rank, run_id=run_id, base_dir=base_dir)


def open_network_backend(
    cfg: Config, *, rank: int, run_id: str, base_dir: Path | None = None
) -> tuple[Transport, BlobStore]:
    """MQTT transport + S3 store for ``rank`` of ``run_id``, settings resolved from env > files > config.

    Raises :class:`ConfigError` naming any missing broker host, endpoint, bucket, S3 key or rank
    key (``comm.keys``); ``base_dir`` anchors relative ``mqtt_config_path``/``s3_config_path``.
    """
    from unitedllm.comm.keys import resolve_rank_keys
    from unitedllm.comm.mqtt import MqttTransport
    from unitedllm.comm.s3 import S3BlobStore
    from unitedllm.comm.settings import resolve_mqtt, resolve_s3

    ranks = run_ranks(cfg)
    if rank not in ranks:
        raise CommError(f"rank {rank} is not in this run (ranks 0..{max(ranks)}; 0 is the aggregator)")
    problems: list[ConfigProblem] = []
    resolved: dict[str, object] = {}
    for name, resolve in (
        ("mqtt", lambda: resolve_mqtt(cfg, base_dir=base_dir)),
        ("s3", lambda: resolve_s3(cfg, base_dir=base_dir)),
        ("keys", lambda: resolve_rank_keys(cfg, rank=rank, base_dir=base_dir)),
    ):
        try:
            resolved[name] = resolve()
        except ConfigError as exc:  # report every missing setting at once, not one per attempt
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    keys = resolved["keys"]
    assert isinstance(keys, RankKeys)
    # The aggregator hears every client; a client hears only the aggregator.
    peers = ranks - {0} if rank == 0 else {0}
    window = cfg.comm_args.retry_window_s
    transport = MqttTransport(
        resolved["mqtt"],  # type: ignore[arg-type]
        rank=rank,
        run_id=run_id,
        keys=keys,
        peers=peers,
        retry_window_s=window,
    )
    return transport, S3BlobStore(resolved["s3"], run_id=run_id, retry_window_s=window)  # type: ignore[arg-type]
