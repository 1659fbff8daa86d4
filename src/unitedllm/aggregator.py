"""The aggregator (rank 0): runs the rounds of a federated run.

Each round it samples clients, publishes the global weights and collects updates until all
selected clients answered or the deadline passed (:mod:`unitedllm.round_collection`). A selected
client that restarts while its round is open is sent the round's start again when it says hello,
so it rejoins the round it lost instead of the round waiting out its deadline. Each update is fetched,
checked and folded into the server optimizer's round as soon as it arrives, while the other clients
still train (the next arrived ones are fetched meanwhile: two updates in memory at most, more
of a small model's); once
collecting ends and the quorum is met, the round is finished, evaluated and checkpointed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.attendance import Attendance
from unitedllm.client_evals import ClientEvals
from unitedllm.comm.base import BlobStore, Presence, Transport
from unitedllm.comm.codecs.global_copy import GLOBAL_DELTA, ClientsCopy, change_codec, round_payload
from unitedllm.comm.codecs.wire import DENSE, decode_update, run_codec
from unitedllm.errors import RoundError, UnitedLLMError
from unitedllm.instability import overshoot_advice, report_loss_rise
from unitedllm.phases import AGGREGATOR_PHASES, PhaseClock, from_metrics, shared_model_wait
from unitedllm.protocol.messages import (
    BlobRef,
    Error,
    EvalReport,
    Finish,
    Hello,
    RoundStart,
    TrainSpec,
    Update,
)
from unitedllm.protocol.payload import decode_tensors, encode_tensors
from unitedllm.role import SERVER_RANK, Role
from unitedllm.round_collection import OpenRound, RoundFold, collect_updates
from unitedllm.rounds import RoundPlan, RoundSummary, RunResult, sample_clients, weighted_mean
from unitedllm.tracking.metrics import MetricsLog

if TYPE_CHECKING:
    import torch

    from unitedllm.comm.local import LocalHub
    from unitedllm.config.types import Config
    from unitedllm.optimizers.base import ClientUpdate
    from unitedllm.training.base import LocalTrainer

__all__ = ["Aggregator", "RoundSummary", "RunResult"]

log = logging.getLogger(__name__)


class Aggregator(Role):
    """Rank 0 of a run. Use as ``async with Aggregator(cfg, run_id=...) as agg: await agg.run()``."""

    def __init__(
        self,
        cfg: Config,
        *,
        run_id: str,
        trainer: LocalTrainer | None = None,
        transport: Transport | None = None,
        store: BlobStore | None = None,
        hub: LocalHub | None = None,
        metrics: MetricsLog | None = None,
        on_round: Callable[[RoundSummary], None] | None = None,
        resume: bool = False,
    ):
        super().__init__(
            cfg, rank=SERVER_RANK, run_id=run_id, trainer=trainer, transport=transport, store=store, hub=hub
        )
        self.resume = resume
        self.plan = RoundPlan.from_config(cfg)
        self._metrics = metrics
        self._on_round = on_round
        self._inbox: asyncio.Queue[Update] = asyncio.Queue()
        self.evals = ClientEvals()
        self.attendance = Attendance()
        self.fingerprint: str | None = None
        self._open: OpenRound | None = None  # the round being collected, for clients that rejoin it
        self._taken: dict[int, Update] = {}  # the last collected round's updates, to know their repeats
        self._phases = PhaseClock(AGGREGATOR_PHASES)  # the current round's

    # -- lifecycle -----------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._metrics is None:
            self._metrics = self._stack.enter_context(MetricsLog(self.layout.metrics(SERVER_RANK)))
        self.fingerprint = await asyncio.to_thread(self.trainer.base_fingerprint)
        pump = asyncio.create_task(self._pump(), name="aggregator-inbox")
        self._stack.push_async_callback(_cancel, pump)

    @property
    def metrics(self) -> MetricsLog:
        assert self._metrics is not None, self._entered()
        return self._metrics

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        """Run every round, save the final model, finish the clients; return the result."""
        from unitedllm.optimizers import create

        cfg = self.cfg
        optimizer = create(
            cfg.server_optimizer_name,
            cfg.train_args.server_optimizer_args,
            num_clients=cfg.train_args.client_num_in_total,
        )
        rise_warning = cfg.validation_args.loss_rise_warning
        advice = overshoot_advice(cfg.server_optimizer_name, optimizer.params)
        first_round, weights, state = await self._starting_point(optimizer)
        copy = ClientsCopy.for_run(cfg, state)  # resumed: the clients' copy as the last round left it
        # The global weights are encoded once per round: the same bytes go to S3 and to the resume point.
        encoded = await asyncio.to_thread(encode_tensors, weights)
        sent = await asyncio.to_thread(round_payload, copy, weights, encoded)
        summaries: list[RoundSummary] = []
        try:
            await self.attendance.wait_for(
                cfg.train_args.client_num_per_round, timeout_s=cfg.comm_args.join_timeout_s
            )
            for round_idx in range(first_round, self.plan.comm_round):
                self._phases = PhaseClock(AGGREGATOR_PHASES, waited=shared_model_wait(self.trainer))
                weights, state, summary = await self._run_round(round_idx, weights, sent, state, optimizer)
                with self._phases.phase("checkpoint"):
                    encoded = await asyncio.to_thread(encode_tensors, weights)
                    sent = await asyncio.to_thread(round_payload, copy, weights, encoded)
                    saved = state if copy is None else {**state, **copy.state()}
                    await asyncio.to_thread(self._save_resume_point, encoded, saved, round_idx)
                summary.seconds = self._phases.wall()  # the round is over once it is safe on disk
                summary.phases = dict(self._phases.seconds)
                # Logged once the round is safe on disk: a run killed after this line resumes after it.
                self.metrics.log(
                    "round",
                    round_idx=round_idx,
                    rank=SERVER_RANK,
                    selected=summary.selected,
                    aggregated=summary.aggregated,
                    rejected=summary.rejected,
                    train_loss=summary.train_loss,
                    eval_loss=summary.eval_loss,
                    seconds=summary.seconds,
                    aggregation_seconds=summary.aggregation_seconds,
                    phases=summary.phases,
                )
                summaries.append(summary)
                report_loss_rise(self.metrics, summaries, threshold=rise_warning, advice=advice)
                if self._on_round is not None:
                    self._on_round(summary)
        except BaseException as exc:
            await self._finish_clients(
                None, reason=f"aborted: {exc}" if isinstance(exc, Exception) else "aborted"
            )
            raise
        final_dir = self.layout.final(SERVER_RANK)
        await asyncio.to_thread(self._save_checkpoint, weights, final_dir, state, self.plan.comm_round - 1)
        final_ref = await self.store.put(encoded)
        evaluate_final = self.plan.clients_evaluate_global(self.plan.comm_round)
        await self._finish_clients(final_ref, reason="completed", evaluate_final=evaluate_final)
        if evaluate_final:
            testing = self.plan.test_ranks & self.attendance.online
            await self.evals.await_final(
                lambda: testing & self.attendance.online,  # not a client that went offline meanwhile
                last_round=self.plan.comm_round - 1,
                timeout_s=self.cfg.comm_args.round_timeout_s,
            )
        self.metrics.log(
            "run_end", round_idx=self.plan.comm_round - 1, rank=SERVER_RANK, output_dir=str(self.output_dir)
        )
        return RunResult(self.run_id, self.output_dir, weights, summaries)

    async def _starting_point(
        self, optimizer: Any
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Round 0 from the initial weights, or (``resume``) the round after the last complete one."""
        from unitedllm.checkpoints import load_resume_point

        if self.resume:
            saved = await asyncio.to_thread(load_resume_point, self.output_dir)
            if saved is not None:
                last_round, weights, state, _ = saved
                await asyncio.to_thread(self._save_init, weights)
                log.info(
                    "resuming run %s after round %d of %d", self.run_id, last_round, self.plan.comm_round
                )
                self.metrics.log("resume", round_idx=last_round, rank=SERVER_RANK)
                return last_round + 1, weights, state
            log.warning("nothing to resume in %s; starting run %s from round 0", self.output_dir, self.run_id)
        weights = await asyncio.to_thread(self.trainer.initial_weights)
        state = optimizer.init_state(weights)
        await asyncio.to_thread(self._save_init, weights)
        return 0, weights, state

    def _save_resume_point(self, encoded: bytes, state: Mapping[str, torch.Tensor], round_idx: int) -> None:
        from unitedllm.checkpoints import save_resume_point

        save_resume_point(
            self.output_dir,
            round_idx=round_idx,
            encoded_weights=encoded,
            optimizer_state=state,
            extra={"run_id": self.run_id},
        )

    async def _run_round(
        self,
        round_idx: int,
        weights: dict[str, torch.Tensor],
        sent: tuple[bytes | None, bytes],
        state: dict[str, torch.Tensor],
        optimizer: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RoundSummary]:
        """One round from ``weights``; ``sent`` is what the clients get: (the change of their copy, or None;
        the copy's payload), the copy being the exact ``weights`` without a global codec."""
        cfg = self.cfg
        phases = self._phases
        selected = sample_clients(
            round_idx,
            total=cfg.train_args.client_num_in_total,
            per_round=cfg.train_args.client_num_per_round,
            seed=cfg.common_args.random_seed,
        )
        change, payload = sent
        with phases.phase("broadcast"):
            global_ref = await self.store.put(payload)
            change_ref = None if change is None else await self.store.put(change, codec=change_codec(cfg))
        # The global model's size as sent to a client that follows the run (its copy's change, if encoded).
        size = global_ref.size if change_ref is None else change_ref.size
        self.metrics.log(
            "round_start", round_idx=round_idx, rank=SERVER_RANK, selected=selected, global_bytes=size
        )
        with phases.phase("broadcast"):
            extra_refs = await self._put_round_extras(optimizer, state)
            if change_ref is not None:
                extra_refs[GLOBAL_DELTA] = change_ref
        starts = {
            rank: RoundStart(
                run_id=self.run_id,
                round=round_idx,
                sender=SERVER_RANK,
                global_ref=global_ref,
                spec=TrainSpec(
                    local_max_steps=cfg.train_args.local_max_steps,
                    local_num_train_epochs=cfg.train_args.local_num_train_epochs,
                    evaluate_global=self.plan.clients_evaluate_global(round_idx, rank),
                    evaluate_local=self.plan.clients_evaluate_local(round_idx, rank),
                ),
                extras=extra_refs,
            )
            for rank in selected
        }
        self._open = OpenRound(round_idx, starts, previous=self._taken)
        with phases.phase("broadcast"):
            for rank, start in starts.items():
                await self.transport.send(rank, start)
        accumulator = optimizer.begin_round(weights, dict(state), round_idx=round_idx)
        fold = RoundFold(
            weights, accumulator, functools.partial(self._fold_update, round_idx), self._fetch_update
        )
        try:
            arrived = await fold.alongside(
                collect_updates(
                    self._open,
                    inbox=self._inbox,
                    presence_changed=self.attendance.changed,
                    online=self.attendance.online,
                    quorum=self.plan.quorum(len(selected)),
                    timeout_s=cfg.comm_args.round_timeout_s,
                    on_arrival=fold.submit,
                    reject=self._reject,
                )
            )
        finally:
            self._taken, self._open = self._open.received, None
        agg_started = time.perf_counter()
        accepted, rejected, (new_weights, new_state) = await self._aggregate(
            round_idx, fold, arrived, quorum=self.plan.quorum(len(selected)), selected=selected
        )
        agg_seconds = time.perf_counter() - agg_started
        summary = RoundSummary(
            round_idx, selected, accepted, rejected=rejected, aggregation_seconds=agg_seconds
        )
        losses = [
            (m.metrics.get("train_loss"), m.num_samples) for m in arrived if m.sender in summary.aggregated
        ]
        summary.train_loss = weighted_mean([(loss, n) for loss, n in losses if loss is not None])
        if cfg.validation_args.is_aggregator_test and self.plan.is_test_round(round_idx):
            with phases.phase("evaluate"):
                result = await asyncio.to_thread(self.trainer.evaluate, new_weights)
            summary.eval_loss = result.metrics.get("eval_loss")
            self.metrics.log(
                "eval",
                round_idx=round_idx,
                rank=SERVER_RANK,
                split="test",
                model="global",
                loss=summary.eval_loss,
                samples=result.num_samples,
                metrics=result.metrics,
                per_category=result.per_category,
            )
        if self.plan.should_save(round_idx):
            target = self.layout.round_dir(round_idx, rank=SERVER_RANK, stage="after_agg")
            with phases.phase("checkpoint"):
                await asyncio.to_thread(self._save_checkpoint, new_weights, target, new_state, round_idx)
        for ref in (global_ref, *extra_refs.values()):
            await self.store.delete(ref)
        return new_weights, new_state, summary

    # -- collecting updates ------------------------------------------------------------------------

    async def _aggregate(
        self,
        round_idx: int,
        fold: RoundFold,
        arrived: list[Update],
        *,
        quorum: int,
        selected: list[int],
    ) -> tuple[list[int], dict[int, str], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Once collecting is over: wait for the last folds, check the quorum, finish the round."""
        await fold.drained()
        accepted, rejected = sorted(fold.accepted), dict(sorted(fold.rejected.items()))  # not arrival order
        if len(accepted) < quorum:
            raise RoundError(
                f"round {round_idx}: only {len(accepted)} valid update(s) of the {quorum} needed "
                f"(selected {selected}; rejected {rejected or 'none'}); "
                f"raise comm_args.round_timeout_s or lower comm_args.min_updates_per_round"
            )
        # Blobs are content-addressed: two clients with equal updates share one, so they go only now.
        used = {ref.digest: ref for m in arrived for ref in (m.delta_ref, *m.extras.values())}
        await self.store.delete_many(used.values())
        with self._phases.phase("finish"):
            return accepted, rejected, await asyncio.to_thread(fold.accumulator.finish)

    async def _fold_update(self, round_idx: int, fold: RoundFold, message: Update) -> None:
        """Check and fold one arrived update (fetched by :meth:`_fetch_update`) or reject it, with the reason."""
        try:  # the round's check_update checks everything, the sample count included
            update = await fold.fetched(message)
            with self._phases.phase("fold"):
                await asyncio.to_thread(fold.accumulator.add, update)
        except UnitedLLMError as exc:
            fold.rejected[message.sender] = str(exc)
            self._reject(message.sender, round_idx, str(exc))
            return
        fold.accepted.append(message.sender)
        client_phases, rest = from_metrics(message.metrics)
        self.metrics.log(
            "train",
            round_idx=round_idx,
            rank=message.sender,
            split="train",
            loss=message.metrics.get("train_loss"),
            samples=message.num_samples,
            seconds=message.metrics.get("train_seconds"),
            bytes_received=message.delta_ref.size,
            update_bytes=message.delta_ref.size,
            phases=client_phases or None,
            metrics=rest,
        )

    async def _put_round_extras(
        self, optimizer: Any, state: Mapping[str, torch.Tensor]
    ) -> dict[str, BlobRef]:
        """Tensors the clients need besides the global weights (SCAFFOLD's c), one blob per group."""
        groups = optimizer.round_start_extras(state)
        return {
            key: await self.store.put(await asyncio.to_thread(encode_tensors, tensors))
            for key, tensors in groups.items()
        }

    async def _fetch_update(self, fold: RoundFold, message: Update) -> ClientUpdate:
        """An update's delta (decoded by the run's codec) and its extras as ``"<group>/<name>"`` (when used)."""
        from unitedllm.optimizers.base import ClientUpdate

        phases, ref = self._phases, message.delta_ref
        with phases.phase("fetch"):
            data = await self.store.get(ref)
        codec = run_codec(self.cfg) if ref.codec != DENSE else None
        with phases.phase("decode"):
            delta = await asyncio.to_thread(
                decode_update, ref.codec, data, fold.weights, codec, where=f"client {message.sender}: "
            )
        extras: dict[str, torch.Tensor] = {}
        if message.extras and fold.accumulator.optimizer.required_extras(fold.weights):
            for key, extra in sorted(message.extras.items()):
                with phases.phase("fetch"):
                    blob = await self.store.get(extra)
                with phases.phase("decode"):
                    tensors = await asyncio.to_thread(decode_tensors, blob)
                extras.update({f"{key}/{name}": t for name, t in tensors.items()})
        return ClientUpdate(rank=message.sender, delta=delta, num_samples=message.num_samples, extras=extras)

    def _reject(self, rank: int, round_idx: int, reason: str) -> None:
        log.warning("round %d: update from client %d refused: %s", round_idx, rank, reason)
        self.metrics.log("rejected", round_idx=round_idx, rank=rank, reason=reason)

    # -- inbox ------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Sort incoming traffic: updates to the round loop, presence and evals to their records."""
        async for item in self.transport.incoming():
            match item:
                case Presence(rank=rank, online=online):
                    self.attendance.presence(rank, online)
                    if not online and self._open is not None:
                        self._open.resent.discard(rank)  # a restarted process has lost the start again
                case Hello(sender=rank, base_fingerprint=fp):
                    await self._greet(rank, fp)
                case Update():
                    await self._inbox.put(item)
                case EvalReport():
                    self.evals.record(item, self.metrics)
                case Error(sender=rank, message=text):
                    log.error("client %d reported an error: %s", rank, text)
                    self.metrics.log("client_error", round_idx=item.round, rank=rank, message=text)
                case _:
                    log.warning("ignored unexpected %s from rank %d", type(item).__name__, item.sender)

    async def _greet(self, rank: int, fingerprint: str | None) -> None:
        if fingerprint is not None and self.fingerprint is not None and fingerprint != self.fingerprint:
            reason = (
                f"client {rank} trains a different base model (fingerprint {fingerprint[:12]}, aggregator "
                f"{self.fingerprint[:12]}): check model_args and common_args.random_seed on both sides"
            )
            log.error(reason)
            self.attendance.block(rank)
            await self.transport.send(
                rank, Error(run_id=self.run_id, round=-1, sender=SERVER_RANK, message=reason)
            )
            return
        if self.attendance.admit(rank):  # its first hello: any start sent is already on its way
            self.metrics.log("client_joined", round_idx=None, rank=rank)
            return
        start = self._open.to_resend(rank) if self._open is not None else None
        if start is not None:  # it said hello again: restarted, and lost the start it was sent
            log.info("round %d: client %d is back; sending it the round's start again", start.round, rank)
            self.metrics.log("round_start_resent", round_idx=start.round, rank=rank)
            await self.transport.send(rank, start)

    async def _finish_clients(
        self, final_ref: BlobRef | None, *, reason: str, evaluate_final: bool = False
    ) -> None:
        if self._transport is None:
            return
        for rank in range(1, self.cfg.train_args.client_num_in_total + 1):
            try:
                await self.transport.send(
                    rank,
                    Finish(
                        run_id=self.run_id,
                        round=self.plan.comm_round,
                        sender=SERVER_RANK,
                        final_ref=final_ref,
                        reason=reason,
                        evaluate_final=evaluate_final
                        and self.plan.clients_evaluate_global(self.plan.comm_round, rank),
                    ),
                )
            except UnitedLLMError as exc:  # a dead link must not stop the others from being told
                log.warning("could not tell client %d the run is over: %s", rank, exc)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_init(self, weights: Mapping[str, torch.Tensor]) -> None:
        """``node_0/init``: a randomly initialised base is saved there once, and every adapter points at it."""
        from unitedllm.checkpoints import save_init

        save_init(
            self.trainer,
            self.layout.init(SERVER_RANK),
            weights,
            random_base=not self.cfg.model_args.load_pretrained,
        )

    def _save_checkpoint(
        self,
        weights: Mapping[str, torch.Tensor],
        target: Path,
        state: Mapping[str, torch.Tensor],
        round_idx: int,
    ) -> None:
        from unitedllm.checkpoints import save_server_checkpoint

        save_server_checkpoint(self.trainer, weights, target, state, round_idx=round_idx, run_id=self.run_id)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # the pump's own error was already logged
        pass
