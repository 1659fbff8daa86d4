"""A client (silo, rank 1..N): waits for rounds, trains locally, sends its update.

Training and evaluation run in a worker thread, so the event loop keeps the connection
alive (MQTT keepalives, presence) during long local rounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.client_journal import ClientJournal
from unitedllm.comm.base import BlobStore, Presence, Transport
from unitedllm.comm.codecs.global_copy import GLOBAL_DELTA, apply_change, global_codec
from unitedllm.comm.codecs.wire import UpdateEncoding, run_codec
from unitedllm.errors import BlobNotFound, CommError, RoundError, UnitedLLMError
from unitedllm.phases import CLIENT_PHASES, PhaseClock, from_metrics, shared_model_wait, to_metrics
from unitedllm.protocol.messages import Error, EvalReport, Finish, Hello, RoundStart, Update
from unitedllm.protocol.payload import decode_tensors, digest_of, encode_tensors
from unitedllm.ranks import check_rank
from unitedllm.role import SERVER_RANK, Role
from unitedllm.rounds import RoundPlan

if TYPE_CHECKING:
    import torch

    from unitedllm.comm.local import LocalHub
    from unitedllm.config.types import Config
    from unitedllm.optimizers.client_hook import ClientAlgorithm
    from unitedllm.tracking.metrics import MetricsLog
    from unitedllm.training.base import FitResult, LocalTrainer, StepEvent

__all__ = ["Client"]

log = logging.getLogger(__name__)


class Client(Role):
    """One silo of a run. Use as ``async with Client(cfg, rank=1, run_id=...) as c: await c.run()``.

    It keeps its own records under ``<output_dir>/node_<rank>/``: ``metrics.jsonl`` (its training and
    evaluation events, unless ``metrics`` is given) and checkpoints in FedML's layout: ``init``,
    ``round_<r>_before_agg`` (its local model after training), ``round_<r>_after_agg`` (the global model
    it received) on the rounds ``validation_args.save_frequency`` selects, and ``final``.
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
        on_step: Callable[[StepEvent], None] | None = None,
        metrics: MetricsLog | None = None,
    ):
        check_rank(cfg, rank, where="--rank")
        super().__init__(
            cfg, rank=rank, run_id=run_id, trainer=trainer, transport=transport, store=store, hub=hub
        )
        self._on_step = on_step
        self._metrics = metrics
        self.plan = RoundPlan.from_config(cfg)
        self.folder = self.layout.node(rank)  # everything this client keeps: node_<rank>/
        self.journal = ClientJournal(self.folder)
        self.rounds_resent: list[int] = []
        self.rounds_trained: list[int] = []
        self._newest_round = -1
        self.evaluations: list[tuple[int, str, dict[str, float]]] = []
        self._algorithm: ClientAlgorithm | None = None
        self._encoding = UpdateEncoding(run_codec(cfg))
        self._codec = global_codec(cfg)  # how the global model's change travels, if encoded
        self._held: dict[str, torch.Tensor] | None = None  # the global model last received (with a codec)
        self._held_round: int | None = None  # the round it came with: a change applies only to the next one
        self._bytes_in = 0

    async def _start(self) -> None:
        if self._metrics is None:
            from unitedllm.tracking.metrics import MetricsLog

            self._metrics = self._stack.enter_context(MetricsLog(self.layout.metrics(self.rank)))

    @property
    def metrics(self) -> MetricsLog:
        assert self._metrics is not None, self._entered()
        return self._metrics

    async def run(self) -> str:
        """Serve rounds until the aggregator finishes the run; returns the aggregator's reason.

        Raises :class:`RoundError` when the aggregator aborted the run, so this process fails too.
        """
        await self._prepare_algorithm()
        fingerprint = await asyncio.to_thread(self.trainer.base_fingerprint)
        await self._hello(fingerprint)
        server_gone_since: float | None = None
        patience = self.cfg.comm_args.join_timeout_s
        messages = self.transport.incoming()
        while True:
            timeout = (
                None
                if server_gone_since is None
                else max(0.0, server_gone_since + patience - time.monotonic())
            )
            try:
                item = await asyncio.wait_for(anext(messages), timeout=timeout)
            except TimeoutError:
                raise CommError(
                    f"client {self.rank}: the aggregator has been offline for {patience:g}s; giving up "
                    "(comm_args.join_timeout_s)"
                ) from None
            except StopAsyncIteration:
                raise CommError(
                    f"client {self.rank}: the connection closed before the run finished"
                ) from None
            match item:
                case Presence(rank=0, online=False):
                    log.warning("client %d: the aggregator went offline; waiting for it to return", self.rank)
                    server_gone_since = time.monotonic()
                case Presence(rank=0, online=True):
                    if server_gone_since is not None:  # it came back (restarted): say hello again
                        await self._hello(fingerprint)
                    server_gone_since = None
                case Presence():
                    pass
                case RoundStart():
                    await self._train_round(item)
                case Finish():
                    await self._finish(item)
                    if item.reason != "completed":
                        raise RoundError(f"client {self.rank}: the aggregator ended the run: {item.reason}")
                    return item.reason
                case Error(message=text):
                    raise RoundError(f"client {self.rank}: the aggregator refused this client: {text}")
                case _:
                    log.warning("client %d ignored unexpected %s", self.rank, type(item).__name__)

    async def _hello(self, fingerprint: str) -> None:
        await self.transport.send(
            SERVER_RANK,
            Hello(
                run_id=self.run_id,
                round=-1,
                sender=self.rank,
                capabilities=["safetensors"],
                base_fingerprint=fingerprint,
            ),
        )

    async def _fetch_weights(self, ref: Any) -> dict[str, torch.Tensor]:
        return decode_tensors(await self.store.get(ref))

    async def _prepare_algorithm(self) -> None:
        """FedProx/SCAFFOLD: refuse (and tell the aggregator) a trainer that does not apply them."""
        from unitedllm.errors import ConfigError
        from unitedllm.optimizers.client_hook import ClientAlgorithm

        algorithm = await asyncio.to_thread(
            ClientAlgorithm, self.cfg, self.layout.client_algorithm_state(self.rank)
        )
        self._algorithm = algorithm
        try:
            algorithm.check(self.trainer)
        except ConfigError as exc:
            await self.transport.send(
                SERVER_RANK, Error(run_id=self.run_id, round=-1, sender=self.rank, message=str(exc))
            )
            raise

    def _fit(
        self,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
        start: RoundStart,
    ) -> tuple[FitResult, dict[str, dict[str, torch.Tensor]]]:
        """Local training with the run's client algorithm; the result and the tensors to send beside the delta."""
        assert self._algorithm is not None, "run() prepares the client algorithm"
        round_idx = start.round
        correction = self._algorithm.begin_round(round_idx, weights, extras)
        if correction is None:
            result = self.trainer.fit(
                weights, round_idx=round_idx, max_steps=start.spec.local_max_steps, on_step=self._on_step
            )
        else:
            result = self.trainer.fit(
                weights,
                round_idx=round_idx,
                max_steps=start.spec.local_max_steps,
                on_step=self._on_step,
                correction=correction,
            )
        return result, self._algorithm.finish_round(round_idx, correction, weights)

    async def _train_round(self, start: RoundStart) -> None:
        round_idx = start.round
        if round_idx < self._newest_round:
            log.warning(
                "client %d: ignoring the start of round %d; round %d already began",
                self.rank,
                round_idx,
                self._newest_round,
            )
            return
        self._newest_round = round_idx
        # A start this client already answered (the aggregator restarted, or repeats the open round's
        # start on every hello) gets the same update again, which the aggregator takes once.
        if await self._resend(start):
            return
        clock = PhaseClock(CLIENT_PHASES, waited=shared_model_wait(self.trainer))
        extra_refs_in = {k: ref for k, ref in start.extras.items() if k != GLOBAL_DELTA}
        try:
            weights = await self._received_copy(start, clock)
            with clock.phase("fetch"):
                if weights is None:
                    blobs = {"": await self.store.get(start.global_ref)}
                else:
                    blobs = {}
                blobs.update({key: await self.store.get(ref) for key, ref in extra_refs_in.items()})
        except BlobNotFound:
            # A message held while this client was offline can name a round that closed meanwhile.
            log.warning(
                "client %d: round %d already closed (its global weights are gone); "
                "waiting for the next round",
                self.rank,
                round_idx,
            )
            return
        download_seconds = clock.seconds["fetch"]
        with clock.phase("decode"):
            decoded = await asyncio.to_thread(lambda: {key: decode_tensors(b) for key, b in blobs.items()})
        weights = decoded.pop("") if weights is None else weights
        extras = decoded
        if self._codec is not None:
            self._held, self._held_round = weights, round_idx  # the next round's change applies to it
        with clock.phase("checkpoint"):
            await asyncio.to_thread(self._save_received, weights, round_idx)
        if start.spec.evaluate_global and round_idx >= 1:
            with clock.phase("evaluate"):
                await self._evaluate(weights, round_idx - 1, "global")
        with clock.phase("setup"):
            await asyncio.to_thread(self.journal.align, self.trainer, round_idx)
            self.journal.forget_held_state()  # training moves it on; save_state records the result
        fit_started, waited = time.perf_counter(), clock.waited()
        try:
            result, update_extras = await asyncio.to_thread(self._fit, weights, extras, start)
        except UnitedLLMError as exc:
            await self.transport.send(
                SERVER_RANK, Error(run_id=self.run_id, round=round_idx, sender=self.rank, message=str(exc))
            )
            raise
        fit_seconds = time.perf_counter() - fit_started
        wait_seconds = min(clock.waited() - waited, fit_seconds)
        train_seconds = float(result.metrics.get("train_seconds", fit_seconds - wait_seconds))
        clock.add("wait", wait_seconds)
        clock.add("train", min(train_seconds, fit_seconds - wait_seconds))
        clock.add("setup", fit_seconds - wait_seconds - min(train_seconds, fit_seconds - wait_seconds))
        with clock.phase("checkpoint"):
            # The state the next round starts from, on disk before the update leaves (see ClientJournal).
            await asyncio.to_thread(self.journal.save_state, self.trainer, round_idx + 1)
            if self.plan.should_save(round_idx):
                await asyncio.to_thread(
                    self._save, result.weights, self._checkpoint_dir(round_idx, "before_agg")
                )
        if start.spec.evaluate_local:
            with clock.phase("evaluate"):
                await self._evaluate(result.weights, round_idx, "local")
        try:  # fp16 refuses a value beyond its range: the aggregator hears why at once
            with clock.phase("encode"):
                data = await asyncio.to_thread(self._encode_update, result.weights, weights, round_idx)
                encoded_extras = {
                    key: await asyncio.to_thread(encode_tensors, tensors)
                    for key, tensors in update_extras.items()
                }
        except UnitedLLMError as exc:
            await self.transport.send(
                SERVER_RANK, Error(run_id=self.run_id, round=round_idx, sender=self.rank, message=str(exc))
            )
            raise
        with clock.phase("upload"):
            ref = await self.store.put(data, codec=self._encoding.name)
            extra_refs = {key: await self.store.put(blob) for key, blob in encoded_extras.items()}
        metrics = dict(result.metrics)
        metrics.setdefault("train_seconds", train_seconds)
        metrics["download_seconds"] = download_seconds
        metrics["upload_seconds"] = clock.seconds["upload"]
        metrics["bytes_sent"] = float(ref.size + sum(r.size for r in extra_refs.values()))
        metrics["update_bytes"] = float(ref.size)
        metrics["bytes_received"] = float(self._bytes_in + sum(r.size for r in extra_refs_in.values()))
        update = Update(
            run_id=self.run_id,
            round=round_idx,
            sender=self.rank,
            delta_ref=ref,
            num_samples=result.num_samples,
            metrics=metrics,
            extras=extra_refs,
        )
        with clock.phase("checkpoint"):
            await asyncio.to_thread(self.journal.record, start, update)
        # The phases travel with the update (the message itself is the one thing sent after them).
        update.metrics.update(to_metrics(clock.seconds))
        await self.transport.send(SERVER_RANK, update)
        self.rounds_trained.append(round_idx)
        self._log_train(round_idx, result, metrics)

    async def _received_copy(self, start: RoundStart, clock: PhaseClock) -> dict[str, torch.Tensor] | None:
        """The round's global model from the copy held and its encoded change (``comm_args.global_codec``).

        None when the start has no change, this client holds no copy or an older one (it missed the
        last round: the change is not fetched at all), or the result is not the model the start names:
        then the dense copy is fetched.
        """
        change_ref = start.extras.get(GLOBAL_DELTA)
        self._bytes_in = start.global_ref.size
        if change_ref is None or self._held is None or self._codec is None:
            return None
        if self._held_round != start.round - 1:
            return None
        with clock.phase("fetch"):
            data = await self.store.get(change_ref)
        with clock.phase("decode"):
            weights, payload = await asyncio.to_thread(self._apply_change, data)
        if digest_of(payload) != start.global_ref.digest:
            log.info(
                "client %d: round %d: the global model's change does not apply to the copy held; "
                "fetching the whole model",
                self.rank,
                start.round,
            )
            self._bytes_in = change_ref.size + start.global_ref.size
            return None
        self._bytes_in = change_ref.size
        return weights

    def _apply_change(self, data: bytes | bytearray) -> tuple[dict[str, torch.Tensor], bytes]:
        assert self._held is not None and self._codec is not None
        weights = apply_change(self._held, data, self._codec, where="the global model's change: ")
        return weights, encode_tensors(weights)

    def _encode_update(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], round_idx: int
    ) -> bytes:
        """The update blob for ``trained - received``; with error feedback, the residual is on disk before it leaves."""
        delta = _delta(trained, received, wide=self._encoding.codec is not None)
        if not self._encoding.keeps_residual:
            return self._encoding.encode(delta)[0]
        data, residual = self._encoding.encode(delta, self.journal.residual(round_idx))
        self.journal.save_residual(residual, round_idx + 1)
        return data

    def _log_train(self, round_idx: int, result: FitResult, metrics: Mapping[str, float]) -> None:
        phases, rest = from_metrics(metrics)
        self.metrics.log(
            "train",
            round_idx=round_idx,
            rank=self.rank,
            split="train",
            loss=metrics.get("train_loss"),
            samples=result.num_samples,
            seconds=metrics.get("train_seconds"),
            bytes_sent=metrics.get("bytes_sent"),
            bytes_received=metrics.get("bytes_received"),
            update_bytes=metrics.get("update_bytes"),
            phases=phases,
            metrics=rest,
        )

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint_dir(self, round_idx: int, stage: str) -> Path:
        from unitedllm.checkpoints import round_dir

        return round_dir(self.output_dir, self.rank, round_idx, stage)

    def _save(self, weights: Mapping[str, torch.Tensor], target: Path) -> None:
        from unitedllm.checkpoints import atomic_dir

        with atomic_dir(target) as tmp:
            self.trainer.save_model(weights, tmp)
        self.metrics.log("checkpoint", round_idx=None, rank=self.rank, path=str(target))

    def _save_received(self, weights: Mapping[str, torch.Tensor], round_idx: int) -> None:
        """``init`` on the first global model this client sees; ``round_<r-1>_after_agg`` after that."""
        from unitedllm.checkpoints import save_init

        init = self.layout.init(self.rank)
        if round_idx == 0 and not init.exists():
            # With a random base, its own copy: this silo's adapters load without the aggregator's files.
            save_init(
                self.trainer, init, weights, random_base=not self.cfg.model_args.load_pretrained, adopt=False
            )
        if round_idx >= 1 and self.plan.should_save(round_idx - 1):
            target = self._checkpoint_dir(round_idx - 1, "after_agg")
            if not target.exists():
                self._save(weights, target)

    async def _resend(self, start: RoundStart) -> bool:
        """Answer a round start this client already answered (a resumed aggregator asks again) without training."""
        update = await asyncio.to_thread(self.journal.answer, start)
        if update is None:
            return False
        for ref in self.journal.blobs(update).values():
            if not await self.store.exists(ref):
                return False  # the aggregator took it before it died: train the round again
        log.info(
            "client %d: round %d was already trained for this global model; sending the same update again",
            self.rank,
            start.round,
        )
        await self.transport.send(SERVER_RANK, update)
        self.rounds_resent.append(start.round)
        self.metrics.log("resent", round_idx=start.round, rank=self.rank, delta=update.delta_ref.digest)
        return True

    async def _evaluate(self, weights: Mapping[str, torch.Tensor], round_idx: int, model: str) -> None:
        result = await asyncio.to_thread(self.trainer.evaluate, weights)
        self.evaluations.append((round_idx, model, result.metrics))
        self.metrics.log(
            "eval",
            round_idx=round_idx,
            rank=self.rank,
            split="test",
            model=model,
            loss=result.metrics.get("eval_loss"),
            samples=result.num_samples,
            metrics=result.metrics,
        )
        await self.transport.send(
            SERVER_RANK,
            EvalReport(
                run_id=self.run_id,
                round=round_idx,
                sender=self.rank,
                model=model,
                metrics=result.metrics,
                num_samples=result.num_samples,
            ),
        )

    async def _finish(self, finish: Finish) -> None:
        if finish.final_ref is not None:
            try:
                weights = await self._fetch_weights(finish.final_ref)
            except BlobNotFound:
                log.warning("client %d: the final model was gone before this client fetched it", self.rank)
            else:
                await asyncio.to_thread(self._save, weights, self.layout.final(self.rank))
                if finish.evaluate_final:
                    # The final model is the aggregate of the last round, so its evaluation is filed there.
                    await self._evaluate(weights, finish.round - 1, "global")
        self.metrics.log("run_end", round_idx=finish.round - 1, rank=self.rank, reason=finish.reason)
        log.info("client %d: run finished (%s)", self.rank, finish.reason)


def _delta(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], *, wide: bool = False
) -> dict[str, torch.Tensor]:
    """new − old per tensor, computed in float32 or wider and sent in the global model's dtype.

    ``wide`` keeps float32 or wider: an update codec rounds it once, on its own terms.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, w in old.items():
        dtype = torch.promote_types(w.dtype, torch.float32)
        diff = new[name].to(dtype) - w.to(dtype)
        out[name] = diff if wide else diff.to(w.dtype)
    return out
