"""The default :class:`LocalTrainer`: Hugging Face ``Trainer`` rounds on one rank's data, LoRA or full.

Per round the trainer loads the global weights, reseeds every RNG from
``(train_args.seed, rank, round)`` (so results do not depend on process layout), and runs
the HF ``Trainer`` for the round's steps. The optimizer and learning-rate schedule live in
this object across rounds: the schedule spans ``steps_per_round * comm_round`` steps and
each round continues where the previous one ended. Nothing is written to disk and nothing
is reported anywhere during a round (``save_strategy="no"``, ``report_to=[]``).

``FitResult.num_samples`` is the size of this client's training split (FedAvg's ``n_k``);
the examples actually seen this round are ``metrics["train_samples"]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from unitedllm.errors import TrainingError
from unitedllm.ranks import check_rank
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent
from unitedllm.training.execution import Execution
from unitedllm.training.model_cache import ModelCache, SharedModel

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from unitedllm.config.types import Config
    from unitedllm.optimizers.client_hook import LocalCorrection

__all__ = ["HFLocalTrainer", "round_seed"]

log = logging.getLogger(__name__)


def round_seed(seed: int, rank: int, round_idx: int) -> int:
    """The RNG seed of ``rank``'s local training in ``round_idx``: the same wherever that rank runs."""
    digest = hashlib.sha256(f"unitedllm:{seed}:{rank}:{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class HFLocalTrainer(LocalTrainer):
    """Local training and evaluation of rank ``rank`` (0 = aggregator: evaluation only) with Hugging Face."""

    applies_corrections = True

    def __init__(
        self,
        cfg: Config,
        rank: int,
        *,
        model_cache: ModelCache | None = None,
        execution: Execution | None = None,
    ):
        check_rank(cfg, rank, where="train_args.client_num_in_total", aggregator=True)
        self.cfg = cfg
        self.rank = rank
        self._cache = model_cache if model_cache is not None else ModelCache()
        self._setup_lock = threading.Lock()
        self._shared: SharedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train: Dataset | None = None
        self._test: Dataset | None = None
        # One process, or one of a silo's (docs/silos.md): who leads, gathering, the optimizer across rounds.
        self.execution = execution if execution is not None else Execution()
        self._rounds = self.execution.optimizer_rounds(self._new_optimizer, self._new_scheduler)
        self._scratch = Path(tempfile.mkdtemp(prefix="unitedllm-trainer-"))
        self._waited = 0.0
        # The model card PEFT wrote at the first save: later saves start from it (see save_model).
        self._card: str | None = None

    # -- setup (lazy: the constructor may run on an event loop) ---------------------------

    def _ready(self) -> SharedModel:
        with self._setup_lock:
            if self._shared is None:
                self._setup()
            assert self._shared is not None
            return self._shared

    def _setup(self) -> None:
        from unitedllm.training.data import client_data, server_test_data
        from unitedllm.training.model import build_model
        from unitedllm.training.tokenizer import load_tokenizer
        from unitedllm.training.weights import base_fingerprint, trainable_state

        cfg = self.cfg
        margs = msgspec.to_builtins(cfg.model_args)
        dargs = msgspec.to_builtins(cfg.data_args)
        tok_key = _key(
            "tokenizer", margs, dargs, cfg.common_args.random_seed, cfg.train_args.client_num_in_total
        )
        tokenizer = self._cache.get_or_create(tok_key, lambda: load_tokenizer(cfg))
        trained = cfg.model_args.train_tokenizer_vocab_size is not None
        model_key = _key(
            "model",
            margs,
            tok_key,
            cfg.common_args.random_seed,
            cfg.train_args.model_dtype,
            cfg.train_args.gradient_checkpointing,
        )

        def build() -> SharedModel:
            model = build_model(cfg, tokenizer, trained_tokenizer=trained)
            return SharedModel(
                model=model, initial_weights=trainable_state(model), fingerprint=base_fingerprint(model)
            )

        shared = self._cache.get_or_create(model_key, build)
        if self.rank == 0:
            self._train, self._test = None, server_test_data(cfg, tokenizer)
        else:
            self._train, self._test = client_data(cfg, self.rank, tokenizer)
        self._tokenizer = tokenizer
        self._shared = shared

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The run's tokenizer (built on first use)."""
        self._ready()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The (possibly shared) model object; hold :attr:`lock` while using it."""
        return self._ready().model

    @property
    def lock(self) -> threading.RLock:
        """The lock of the shared model."""
        return self._ready().lock

    @property
    def train_dataset(self) -> Dataset | None:
        """This client's tokenized training split (None on the aggregator)."""
        self._ready()
        return self._train

    @property
    def test_dataset(self) -> Dataset:
        """This rank's tokenized test split (the global held-out set on the aggregator)."""
        self._ready()
        assert self._test is not None
        return self._test

    @property
    def wait_seconds(self) -> float:
        """Seconds this trainer has waited, in all, for its turn on a model shared with other ranks."""
        return self._waited

    @contextmanager
    def _turn(self, shared: SharedModel) -> Iterator[None]:
        """Hold the shared model (counting the wait for it in :attr:`wait_seconds`)."""
        waiting = time.perf_counter()
        with shared.lock:
            self._waited += time.perf_counter() - waiting
            yield

    # -- LocalTrainer ----------------------------------------------------------------------

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors as built (identical on every rank)."""
        return {k: v.clone() for k, v in self._ready().initial_weights.items()}

    def base_fingerprint(self) -> str:
        """sha256 of the frozen base weights and model config."""
        return self._ready().fingerprint

    def steps_per_round(self, max_steps: int | None = None) -> int:
        """Optimizer steps in one local round: ``max_steps`` (or ``local_max_steps``) if > 0, else epochs."""
        targs = self.cfg.train_args
        steps = targs.local_max_steps if max_steps is None else max_steps
        if steps > 0:
            return steps
        train = self._require_train()
        per_step = (
            targs.per_device_train_batch_size * targs.gradient_accumulation_steps * self.execution.world_size
        )
        return max(1, math.ceil(math.ceil(len(train) / per_step) * targs.local_num_train_epochs))

    def _require_train(self) -> Dataset:
        self._ready()
        if self._train is None:
            raise TrainingError("the aggregator (rank 0) has no training data; only clients train")
        if len(self._train) == 0:
            raise TrainingError(f"client {self.rank} has no training examples after tokenization")
        return self._train

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: LocalCorrection | None = None,
    ) -> FitResult:
        """Train ``weights`` on this client's data for one round and return the new trainable weights.

        A ``correction`` (FedProx, SCAFFOLD) is added to the gradients before each optimizer step.
        """
        from unitedllm.training.weights import load_trainable, trainable_state

        train = self._require_train()
        shared = self._ready()
        steps = self.steps_per_round(max_steps)
        with self._turn(shared):
            model = shared.model
            with self.execution.gathered(_trainable(model), modify=True):
                load_trainable(model, weights)
            model.zero_grad(set_to_none=True)
            args = self._training_args(steps, round_seed(self.cfg.train_args.seed, self.rank, round_idx))
            self._rounds.begin_round(model, args, steps, round_idx=round_idx)
            if self.cfg.train_args.local_optimizer_state == "reset":
                self._rounds.reset_moments()
            trainer = self._hf_trainer(model, args, train, round_idx, steps, on_step)
            if correction is not None:
                from unitedllm.training.callbacks import CorrectionCallback

                params = {name: p for name, p in model.named_parameters() if p.requires_grad}
                trainer.add_callback(CorrectionCallback(params, correction))
            start = time.perf_counter()
            try:
                output = trainer.train()
            except (RuntimeError, ValueError) as exc:
                raise TrainingError(
                    f"local training of client {self.rank} failed in round {round_idx}: {exc}"
                ) from exc
            seconds = time.perf_counter() - start
            self._rounds.finish_round(trainer)
            with self.execution.gathered(_trainable(model)):
                new_weights = trainable_state(model)
        if not math.isfinite(output.training_loss):
            raise TrainingError(
                f"client {self.rank} round {round_idx}: training loss is {output.training_loss}"
            )
        targs = self.cfg.train_args
        seen = (
            steps
            * targs.per_device_train_batch_size
            * targs.gradient_accumulation_steps
            * self.execution.world_size
        )
        tokens = float(trainer.state.num_input_tokens_seen or 0)
        return FitResult(
            weights=new_weights,
            num_samples=len(train),
            metrics={
                "train_loss": float(output.training_loss),
                "train_seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
                "train_samples": float(seen),
                "learning_rate": self._rounds.last_lr(),
            },
        )

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        """Token-averaged response loss and perplexity on this rank's test split, also per category."""
        from unitedllm.training.weights import load_trainable

        shared = self._ready()
        test = self.test_dataset
        if len(test) == 0:
            who = "the aggregator's global test set" if self.rank == 0 else f"client {self.rank}'s test split"
            raise TrainingError(f"{who} is empty: nothing to evaluate (check data_args.test_dataset_size)")
        with self._turn(shared):
            self._to_eval_device(shared.model)
            with self.execution.gathered(_trainable(shared.model), modify=True):
                load_trainable(shared.model, weights)
            sums = self.execution.response_losses(
                shared.model,
                test,
                batch_size=self.cfg.train_args.per_device_eval_batch_size,
                pad_token_id=int(self.tokenizer.pad_token_id),
            )
        total_loss = sum(s for s, _ in sums.values())
        total_tokens = sum(n for _, n in sums.values())
        loss = total_loss / total_tokens
        per_category = {c: s / n for c, (s, n) in sorted(sums.items()) if c}
        return EvalResult(
            metrics={"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))},
            num_samples=len(test),
            per_category=per_category,
        )

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        """A self-contained model dir: PEFT adapter + base config + tokenizer (LoRA), or a full model."""
        from unitedllm.training.weights import load_trainable

        shared = self._ready()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._turn(shared), self.execution.gathered(shared.model.parameters(), modify=True):
            model = shared.model
            load_trainable(model, weights)
            if not self.execution.is_leader:
                return  # the silo's other ranks only took part in gathering the weights
            if self.cfg.model_args.peft_type == "lora":
                peft_config = model.peft_config["default"]
                saved_base = peft_config.base_model_name_or_path
                base = (
                    shared.base_dir.resolve() if shared.base_dir else self.cfg.model_args.model_name_or_path
                )
                peft_config.base_model_name_or_path = str(base)
                # Adapted embeddings / output head are saved in full so the adapter stands alone.
                targets = set(peft_config.target_modules or ())
                heads = {"lm_head", "embed_out", "embed_in", "embed_tokens", "wte"}
                card = directory / "README.md"
                if self._card is not None and not card.exists():
                    # PEFT updates a card it finds instead of rendering its template again (most of a
                    # small adapter's save); it sets every field it writes, so the bytes are the same.
                    card.write_text(self._card, encoding="utf-8")
                try:
                    model.save_pretrained(str(directory), save_embedding_layers=bool(targets & heads))
                finally:
                    peft_config.base_model_name_or_path = saved_base
                if self._card is None and card.is_file():
                    self._card = card.read_text(encoding="utf-8")
                model.get_base_model().config.save_pretrained(str(directory))
            else:
                model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))

    def save_base(self, directory: Path, *, adopt: bool = True) -> bool:
        """Write the base model as built (random init or pretrained); later LoRA adapters point at it.

        With ``adopt=False`` adapters point at this copy only when no base was saved before (a client
        sharing its model with the aggregator in one process keeps pointing at ``node_0/init``).
        """
        from unitedllm.training.weights import base_state_dict, load_trainable

        shared = self._ready()
        directory = Path(directory)
        with self._turn(shared), self.execution.gathered(shared.model.parameters(), modify=True):
            model = shared.model
            if not self.execution.is_leader:
                return True  # the silo's other ranks only took part in gathering the weights
            directory.mkdir(parents=True, exist_ok=True)
            if self.cfg.model_args.peft_type == "lora":
                base = model.get_base_model()
                base.save_pretrained(str(directory), state_dict=base_state_dict(model))
            else:
                load_trainable(model, shared.initial_weights)
                model.save_pretrained(str(directory))
            if adopt or shared.base_dir is None:
                shared.base_dir = directory
        self.tokenizer.save_pretrained(str(directory))
        return True

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and learning-rate schedule state (tensors and plain values; save with ``torch.save``)."""
        return self._rounds.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore optimizer and schedule state (applied when the optimizer exists)."""
        self._rounds.load_state_dict(state)

    def close(self) -> None:
        """Remove this trainer's scratch dir (closing twice is harmless)."""
        self._rounds.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------

    def _training_args(self, steps: int, seed: int) -> Any:
        from unitedllm.training.arguments import training_arguments

        return training_arguments(self.cfg, self.execution, output_dir=self._scratch, steps=steps, seed=seed)

    def _new_optimizer(self, model: Any, args: Any) -> torch.optim.Optimizer:
        from unitedllm.training.arguments import local_optimizer

        return local_optimizer(self.cfg, model, args)

    def _new_scheduler(self, optimizer: Any, steps: int) -> Any:
        """The learning-rate schedule of the whole run: ``steps`` per round times ``comm_round``."""
        from unitedllm.training.arguments import run_schedule

        return run_schedule(self.cfg, optimizer, steps)

    def _to_eval_device(self, model: Any) -> None:
        """Put a model still on the CPU on this rank's GPU when the run uses GPUs.

        Training moves a client's model there; the aggregator never trains, so without this it
        would evaluate on the CPU (in every process of its silo).
        """
        import torch

        if self.cfg.train_args.use_cpu or not self.cfg.device_args.using_gpu or not torch.cuda.is_available():
            return

        if next(model.parameters()).device.type != "cpu":
            return
        local = self.execution.local_rank
        index = local if local is not None else torch.cuda.current_device()
        model.to(torch.device("cuda", index))

    def _hf_trainer(
        self,
        model: Any,
        args: Any,
        train: Dataset,
        round_idx: int,
        steps: int,
        on_step: Callable[[StepEvent], None] | None,
    ) -> Any:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from unitedllm.training.callbacks import StepReporter
        from unitedllm.training.data import CausalCollator

        callbacks: list[Any] = [StepReporter(self.rank, round_idx, steps, on_step)] if on_step else []
        kwargs: dict[str, Any] = {
            "model": model,
            "args": args,
            "train_dataset": train,
            "data_collator": CausalCollator(int(self.tokenizer.pad_token_id)),
            "callbacks": callbacks,
        }
        trainer = self._rounds.trainer(**kwargs)
        # logging_steps=1 feeds on_step; the console belongs to the caller, so no printing here.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer
