"""What the aggregator and a client share: one rank's backend, trainer and async lifecycle."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from unitedllm.ranks import AGGREGATOR_RANK
from unitedllm.run_layout import RunLayout

if TYPE_CHECKING:
    from unitedllm.comm.base import BlobStore, Transport
    from unitedllm.comm.local import LocalHub
    from unitedllm.config.types import Config
    from unitedllm.training.base import LocalTrainer

__all__ = ["SERVER_RANK", "Role", "run_output_dir"]

SERVER_RANK = AGGREGATOR_RANK  # the name the round loop uses; one definition in unitedllm.ranks


def run_output_dir(cfg: Config, run_id: str) -> Path:
    """``train_args.output_dir`` with ``{run_id}`` filled in."""
    return Path(cfg.train_args.output_dir.replace("{run_id}", run_id))


class Role:
    """One rank of a run as an async context manager: entering opens its backend and builds its trainer.

    Transport, store and trainer may be passed in (tests, the embedded run); otherwise the
    backend comes from ``comm_args`` (or the in-process ``hub``) and the trainer is the
    Hugging Face one. Subclasses add their own start-up in :meth:`_start`.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        rank: int,
        run_id: str,
        trainer: LocalTrainer | None = None,
        transport: Transport | None = None,
        store: BlobStore | None = None,
        hub: LocalHub | None = None,
    ):
        self.cfg = cfg
        self.rank = rank
        self.run_id = run_id
        self.output_dir = run_output_dir(cfg, run_id)
        self.layout = RunLayout(self.output_dir)  # every path of the run folder
        self._trainer = trainer
        self._transport = transport
        self._store = store
        self._hub = hub
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        try:
            if self._transport is None or self._store is None:
                from unitedllm.comm.factory import open_backend

                transport, store = open_backend(self.cfg, rank=self.rank, run_id=self.run_id, hub=self._hub)
                self._transport = self._transport or transport
                self._store = self._store or store
            await self._stack.enter_async_context(self._store)
            await self._stack.enter_async_context(self._transport)
            if self._trainer is None:
                from unitedllm.training.hf import HFLocalTrainer

                self._trainer = await asyncio.to_thread(HFLocalTrainer, self.cfg, self.rank)
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        """Role-specific start-up, after the backend is open and the trainer exists."""

    def _entered(self) -> str:
        return f"use the {type(self).__name__} as an async context manager"

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, self._entered()
        return self._transport

    @property
    def store(self) -> BlobStore:
        assert self._store is not None, self._entered()
        return self._store

    @property
    def trainer(self) -> LocalTrainer:
        assert self._trainer is not None, self._entered()
        return self._trainer
