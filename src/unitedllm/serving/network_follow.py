"""Follow an MQTT_S3 run: each global model it announces becomes a round folder of a local cache.

``unitedllm serve CONFIG --follow --run-id ID`` reads the run's config (``comm_args.backend:
MQTT_S3``) as ``unitedllm run`` does. It builds the model the way a client does (the Hugging Face
trainer: the same base, tokenizer and adapter layout, from the config), writes the base into
``<cache>/node_0/init``, then for each announcement (:mod:`.announcements`, signed by the
aggregator) fetches the blob from the run's S3 store (the store checks the bytes against the
announced sha256), decodes it and saves it as ``<cache>/node_0/round_<r>_after_agg`` with its
``SHA256SUMS``, by the same atomic write as the aggregator's checkpoints. The cache is then an
ordinary run folder: the :class:`~unitedllm.serving.follow.RunFollower` loads each new round through
the engine with the LOCAL follower's checks (digest, shapes, NaN), and moves ``global`` to it.
A round whose blob is gone, damaged or does not fit the model is refused in one log line.
Broker and S3 credentials come from the environment or the config's files and are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from unitedllm.errors import ConfigError, ConfigProblem, UnitedLLMError
from unitedllm.run_layout import RunLayout
from unitedllm.serving.announcements import GlobalAnnouncement, RunAnnouncements

if TYPE_CHECKING:
    import torch

    from unitedllm.comm.s3 import S3BlobStore
    from unitedllm.config.types import Config

__all__ = ["RunMirror", "default_cache", "load_run_config", "observer_links"]

log = logging.getLogger(__name__)


def default_cache(run_id: str) -> Path:
    """Where a followed run's models are kept: ``$XDG_CACHE_HOME/unitedllm/follow/<run_id>``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "unitedllm" / "follow" / run_id


def load_run_config(path: Path, run_id: str) -> Config:
    """The run's config, which must name the MQTT_S3 backend (a LOCAL run is followed by its folder)."""
    from unitedllm.config import load_config

    cfg = load_config(path, run_id=run_id)
    if cfg.comm_args.backend != "MQTT_S3":
        raise ConfigError(
            ConfigProblem(
                "comm_args.backend",
                f"{path} runs on {cfg.comm_args.backend}: serve --follow takes a config of an MQTT_S3 run; "
                "a LOCAL run is followed through its folder (train_args.output_dir)",
            )
        )
    return cfg


def observer_links(cfg: Config) -> dict[int, bytes]:
    """Client rank -> the key of its link with the aggregator, for every rank whose key this process has.

    Keys are read as the run's processes read them (``UNITEDLLM_RANK_KEY_<r>``, ``comm_args.rank_keys_path``,
    else the run secret); one rank's key is enough to hear the rounds that rank takes part in.
    """
    from unitedllm.comm.keys import resolve_rank_keys

    clients = range(1, cfg.train_args.client_num_in_total + 1)
    try:
        every = resolve_rank_keys(cfg, rank=0)  # all of them, or the run secret for the missing ones
    except ConfigError:
        links: dict[int, bytes] = {}
        for rank in clients:
            try:
                key = resolve_rank_keys(cfg, rank=rank).link(0, rank)
            except ConfigError:
                continue
            if key is not None:
                links[rank] = key
    else:
        links = {rank: key for rank in clients if (key := every.link(0, rank)) is not None}
    if not links:
        raise ConfigError(
            ConfigProblem(
                "comm_args.run_secret",
                "following an MQTT_S3 run needs the key of at least one client rank's link to check the "
                "aggregator's signature: set UNITEDLLM_RANK_KEY_<r>, comm_args.rank_keys_path, or the run "
                "secret UNITEDLLM_RUN_SECRET",
            )
        )
    return links


class RunMirror:
    """Mirrors an MQTT_S3 run's global models into ``cache`` (a run folder); an async context manager.

    Entering builds the model and writes the base (``cache`` is servable from then on) and starts
    listening; :meth:`run` takes in announcements until cancelled.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        run_id: str,
        cache: Path,
        on_refused: Callable[[str, str], None] | None = None,
        trainer: Any = None,
    ):
        self.cfg = cfg
        self.run_id = run_id
        self.cache = cache
        self.layout = RunLayout(cache)
        self.on_refused = on_refused
        self._trainer = trainer
        self._store: S3BlobStore | None = None
        self._announcements: RunAnnouncements | None = None

    async def __aenter__(self) -> Self:
        from unitedllm.comm.s3 import S3BlobStore
        from unitedllm.comm.settings import resolve_mqtt, resolve_s3

        problems: list[ConfigProblem] = []
        resolved: dict[str, Any] = {}
        for name, resolve in (
            ("mqtt", lambda: resolve_mqtt(self.cfg)),
            ("s3", lambda: resolve_s3(self.cfg)),
            ("links", lambda: observer_links(self.cfg)),
        ):
            try:
                resolved[name] = resolve()
            except ConfigError as exc:  # every missing setting at once
                problems += exc.problems
        if problems:
            raise ConfigError(problems)
        if self._trainer is None:
            from unitedllm.training.hf import HFLocalTrainer

            self._trainer = await asyncio.to_thread(HFLocalTrainer, self.cfg, 0)
        await asyncio.to_thread(self._save_base)
        self._store = S3BlobStore(
            resolved["s3"], run_id=self.run_id, retry_window_s=self.cfg.comm_args.retry_window_s
        )
        await self._store.open()
        announcements = RunAnnouncements(resolved["mqtt"], run_id=self.run_id, links=resolved["links"])
        try:
            self._announcements = await announcements.__aenter__()
        except BaseException:
            await self._store.close()
            raise
        log.info(
            "following run %s on %s (client ranks %s); its models go to %s",
            self.run_id,
            resolved["mqtt"].address,
            announcements.ranks,
            self.cache,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._announcements is not None:
            await self._announcements.__aexit__(exc_type, exc, tb)
            self._announcements = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def run(self) -> None:
        """Take in each announced global model until cancelled."""
        assert self._announcements is not None, "enter the RunMirror first"
        async for announced in self._announcements.announcements():
            await self.take(announced)

    async def take(self, announced: GlobalAnnouncement) -> None:
        """Fetch, check, decode and write one announced global model (refused in one log line)."""
        from unitedllm.protocol.payload import CODEC, decode_tensors

        assert self._store is not None, "enter the RunMirror first"
        target = self.layout.round_dir(announced.round)
        if target.exists():
            return
        where = f"run {self.run_id}'s global model of round {announced.round} ({announced.ref.digest[:12]})"
        try:
            if announced.ref.codec != CODEC:
                raise UnitedLLMError(f"its codec {announced.ref.codec!r} is not {CODEC!r}")
            data = await self._store.get(announced.ref)  # checked against the announced sha256
            weights = await asyncio.to_thread(decode_tensors, data)
            await asyncio.to_thread(self._save_round, weights, target)
        except UnitedLLMError as exc:
            self._refuse(announced.round, f"{where} refused: {exc}")
            return
        log.info(
            "round %d fetched from the run's store (sha256 %s)", announced.round, announced.ref.digest[:12]
        )

    def _refuse(self, round_idx: int, reason: str) -> None:
        log.warning("round %d not served: %s", round_idx, reason)
        if self.on_refused is not None:
            self.on_refused(f"global@{round_idx}", reason)

    def _save_base(self) -> None:
        from unitedllm.checkpoints import save_init

        trainer = self._trainer
        save_init(
            trainer,
            self.layout.init(),
            trainer.initial_weights(),
            random_base=not self.cfg.model_args.load_pretrained,
        )

    def _save_round(self, weights: dict[str, torch.Tensor], target: Path) -> None:
        from unitedllm.checkpoints import atomic_dir, write_digests

        expected = self._trainer.initial_weights()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            name = (missing or extra)[0]
            raise UnitedLLMError(
                f"its tensors differ from the model's ({'no' if missing else 'an unknown'} tensor {name})"
            )
        wrong = [n for n, t in weights.items() if tuple(t.shape) != tuple(expected[n].shape)]
        if wrong:
            raise UnitedLLMError(
                f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
            )
        with atomic_dir(target) as tmp:
            self._trainer.save_model(weights, tmp)
            write_digests(tmp)
