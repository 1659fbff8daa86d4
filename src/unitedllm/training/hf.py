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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from unitedllm.errors import ConfigError, ConfigProblem, TrainingError
from unitedllm.silo.zero import gathered
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent
from unitedllm.training.model_cache import ModelCache, SharedModel

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from unitedllm.config.types import Config
    from unitedllm.optimizers.client_hook import LocalCorrection
    from unitedllm.silo.distributed import SiloContext
    from unitedllm.silo.zero import ZeroRounds

__all__ = ["HFLocalTrainer", "round_seed"]

log = logging.getLogger(__name__)


def round_seed(seed: int, rank: int, round_idx: int) -> int:
    """The RNG seed of ``rank``'s local training in ``round_idx``: the same wherever that rank runs."""
    digest = hashlib.sha256(f"unitedllm:{seed}:{rank}:{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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
        silo: SiloContext | None = None,
    ):
        if rank < 0 or rank > cfg.train_args.client_num_in_total:
            raise ConfigError(
                ConfigProblem(
                    "train_args.client_num_in_total",
                    f"rank {rank} is outside 0..{cfg.train_args.client_num_in_total}",
                )
            )
        self.cfg = cfg
        self.rank = rank
        self._cache = model_cache if model_cache is not None else ModelCache()
        self._setup_lock = threading.Lock()
        self._shared: SharedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train: Dataset | None = None
        self._test: Dataset | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._pending_state: Mapping[str, Any] | None = None
        self._steps_per_round: int | None = None
        # In a silo of several processes (docs/silos.md): this rank's place, and DeepSpeed's optimizer across rounds.
        self._silo = silo
        self._zero: ZeroRounds | None = None
        self._round_args: Any = None
        self._round_steps = 0
        self._scratch = Path(tempfile.mkdtemp(prefix="unitedllm-trainer-"))

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
        per_step = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * self._world_size
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
        with shared.lock:
            model = shared.model
            with gathered(_trainable(model), modify=True):
                load_trainable(model, weights)
            model.zero_grad(set_to_none=True)
            args = self._training_args(steps, round_seed(self.cfg.train_args.seed, self.rank, round_idx))
            if self._silo is None or self._silo.deepspeed_config is None:
                self._ensure_optimizer(model, args, steps)
            else:
                self._round_args, self._round_steps = args, steps
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
            if self._zero is not None:
                self._zero.finish_round(trainer)
            with gathered(_trainable(model)):
                new_weights = trainable_state(model)
        if not math.isfinite(output.training_loss):
            raise TrainingError(
                f"client {self.rank} round {round_idx}: training loss is {output.training_loss}"
            )
        targs = self.cfg.train_args
        seen = (
            steps * targs.per_device_train_batch_size * targs.gradient_accumulation_steps * self._world_size
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
                "learning_rate": self._zero.last_lr()
                if self._zero
                else float(self._scheduler.get_last_lr()[0]),
            },
        )

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        """Token-averaged response loss and perplexity on this rank's test split, also per category."""
        from unitedllm.training.evaluation import response_losses
        from unitedllm.training.weights import load_trainable

        shared = self._ready()
        test = self.test_dataset
        if len(test) == 0:
            who = "the aggregator's global test set" if self.rank == 0 else f"client {self.rank}'s test split"
            raise TrainingError(f"{who} is empty: nothing to evaluate (check data_args.test_dataset_size)")
        with shared.lock:
            self._to_eval_device(shared.model)
            with gathered(_trainable(shared.model), modify=True):
                load_trainable(shared.model, weights)
            kwargs = {
                "batch_size": self.cfg.train_args.per_device_eval_batch_size,
                "pad_token_id": int(self.tokenizer.pad_token_id),
            }
            if self._silo is None:
                sums = response_losses(shared.model, test, **kwargs)
            else:
                from unitedllm.silo.evaluation import silo_response_losses

                sums = silo_response_losses(self._silo, shared.model, test, **kwargs)
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
        with shared.lock, gathered(shared.model.parameters(), modify=True):
            model = shared.model
            load_trainable(model, weights)
            if self._silo is not None and not self._silo.is_leader:
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
                try:
                    model.save_pretrained(str(directory), save_embedding_layers=bool(targets & heads))
                finally:
                    peft_config.base_model_name_or_path = saved_base
                model.get_base_model().config.save_pretrained(str(directory))
            else:
                model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))

    def save_base(self, directory: Path, *, adopt: bool = True) -> None:
        """Write the base model as built (random init or pretrained); later LoRA adapters point at it.

        With ``adopt=False`` adapters point at this copy only when no base was saved before (a client
        sharing its model with the aggregator in one process keeps pointing at ``node_0/init``).
        """
        from unitedllm.training.weights import base_state_dict, load_trainable

        shared = self._ready()
        directory = Path(directory)
        with shared.lock, gathered(shared.model.parameters(), modify=True):
            model = shared.model
            if self._silo is not None and not self._silo.is_leader:
                return  # the silo's other ranks only took part in gathering the weights
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

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and learning-rate schedule state (tensors and plain values; save with ``torch.save``)."""
        if self._zero is not None:
            return self._zero.state_dict()
        if self._optimizer is None:
            return dict(self._pending_state or {})
        return {
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "steps_per_round": self._steps_per_round,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore optimizer and schedule state (applied when the optimizer exists)."""
        if self._silo is not None and self._silo.deepspeed_config is not None:
            self._zero_rounds().load_state_dict(dict(state))
            return
        if self._optimizer is None:
            self._pending_state = dict(state)
            return
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        """Remove this trainer's scratch dir (closing twice is harmless)."""
        if self._zero is not None:
            self._zero.release_engine()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------

    def _training_args(self, steps: int, seed: int) -> TrainingArguments:
        from transformers import TrainingArguments

        targs = self.cfg.train_args
        deepspeed = self._silo.deepspeed_config if self._silo is not None else None
        bf16, fp16 = targs.bf16, targs.fp16
        use_cpu = targs.use_cpu or not self.cfg.device_args.using_gpu
        if fp16 and deepspeed is None and (use_cpu or not _cuda_available()):
            # accelerate would drop it silently: fp16 autocast and loss scaling are GPU features.
            log.warning(
                "train_args.fp16: fp16 mixed precision needs a GPU; training on the CPU in model_dtype "
                "(%s) instead (train_args.bf16 is mixed precision that works on the CPU)",
                targs.model_dtype,
            )
            fp16 = False
        if deepspeed is not None:
            from unitedllm.silo.deepspeed_config import mixed_precision

            bf16, fp16 = mixed_precision(deepspeed, bf16=bf16, fp16=fp16)
        try:
            return TrainingArguments(
                output_dir=str(self._scratch),
                max_steps=steps,
                per_device_train_batch_size=targs.per_device_train_batch_size,
                per_device_eval_batch_size=targs.per_device_eval_batch_size,
                gradient_accumulation_steps=targs.gradient_accumulation_steps,
                learning_rate=targs.learning_rate,
                weight_decay=targs.weight_decay,
                adam_beta1=targs.adam_beta1,
                adam_beta2=targs.adam_beta2,
                adam_epsilon=targs.adam_epsilon,
                max_grad_norm=targs.max_grad_norm,
                optim=targs.client_optimizer,
                lr_scheduler_type=targs.lr_scheduler_type,
                seed=seed,
                data_seed=seed,
                fp16=fp16,
                bf16=bf16,
                deepspeed=deepspeed,
                use_cpu=use_cpu,
                dataloader_num_workers=targs.dataloader_num_workers,
                dataloader_pin_memory=False,
                ddp_find_unused_parameters=targs.ddp_find_unused_parameters,
                # Per-step loss reaches on_step through the log callback; nothing goes to disk.
                logging_strategy="steps",
                logging_steps=1,
                save_strategy="no",
                eval_strategy="no",
                report_to=[],
                disable_tqdm=True,
                remove_unused_columns=False,
                include_num_input_tokens_seen="non_padding",
            )
        except ValueError as exc:
            raise ConfigError(
                ConfigProblem("train_args", f"not valid Hugging Face training arguments: {exc}")
            ) from exc

    def _ensure_optimizer(self, model: Any, args: TrainingArguments, steps: int) -> None:
        if self._optimizer is not None:
            return
        self._optimizer = self._new_optimizer(model, args)
        self._scheduler = self._new_scheduler(self._optimizer, steps)
        self._steps_per_round = steps
        if self._pending_state:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)

    def _new_optimizer(self, model: Any, args: TrainingArguments) -> torch.optim.Optimizer:
        from transformers import Trainer

        targs = self.cfg.train_args
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            # As HF does: no weight decay on biases and normalisation weights.
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": targs.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer: torch.optim.Optimizer = optimizer_cls(
            [g for g in groups if g["params"]], **optimizer_kwargs
        )
        return optimizer

    def _new_scheduler(self, optimizer: Any, steps: int) -> Any:
        """The learning-rate schedule of the whole run: ``steps`` per round times ``comm_round``."""
        from transformers import get_scheduler

        targs = self.cfg.train_args
        total = steps * targs.comm_round
        warmup = targs.warmup_steps or math.ceil(targs.warmup_ratio * total)
        return get_scheduler(
            targs.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )

    def _to_eval_device(self, model: Any) -> None:
        """Put a model still on the CPU on this rank's GPU when the run uses GPUs.

        Training moves a client's model there; the aggregator never trains, so without this it
        would evaluate on the CPU (in every process of its silo).
        """
        if self.cfg.train_args.use_cpu or not self.cfg.device_args.using_gpu or not _cuda_available():
            return
        import torch

        if next(model.parameters()).device.type != "cpu":
            return
        index = self._silo.local_rank if self._silo is not None else torch.cuda.current_device()
        model.to(torch.device("cuda", index))

    @property
    def _world_size(self) -> int:
        return self._silo.world_size if self._silo is not None else 1

    def _zero_rounds(self) -> ZeroRounds:
        """DeepSpeed's optimizer and schedule across rounds (one engine per round; docs/silos.md)."""
        if self._zero is None:
            from unitedllm.silo.zero import ZeroRounds

            self._zero = ZeroRounds(
                make_optimizer=lambda model: self._new_optimizer(model, self._round_args),
                make_scheduler=lambda optimizer: self._new_scheduler(optimizer, self._round_steps),
            )
        return self._zero

    def _hf_trainer(
        self,
        model: Any,
        args: TrainingArguments,
        train: Dataset,
        round_idx: int,
        steps: int,
        on_step: Callable[[StepEvent], None] | None,
    ) -> Any:
        from transformers import Trainer
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
        if self._silo is not None and self._silo.deepspeed_config is not None:
            trainer = self._zero_rounds().trainer(**kwargs)
        else:
            trainer = Trainer(**kwargs, optimizers=(self._optimizer, self._scheduler))
        # logging_steps=1 feeds on_step; the console belongs to the caller, so no printing here.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer
