"""The Hugging Face training arguments of a local round, the local optimizer and the run's learning-rate schedule.

What :class:`~unitedllm.training.hf.HFLocalTrainer` hands the ``Trainer``: ``train_args`` mapped onto
``TrainingArguments`` (nothing written to disk, nothing reported, per-step logs for progress), the
optimizer Hugging Face would build (no weight decay on biases and norms), and one schedule spanning
every round of the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from unitedllm.config.types import Config
    from unitedllm.training.execution import Execution

__all__ = ["local_optimizer", "run_schedule", "training_arguments"]

log = logging.getLogger("unitedllm.training.hf")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def training_arguments(
    cfg: Config, execution: Execution, *, output_dir: Path, steps: int, seed: int
) -> TrainingArguments:
    """The ``TrainingArguments`` of one local round of ``steps`` optimizer steps, seeded with ``seed``."""
    from transformers import TrainingArguments

    targs = cfg.train_args
    deepspeed = execution.deepspeed_config
    bf16, fp16 = targs.bf16, targs.fp16
    use_cpu = targs.use_cpu or not cfg.device_args.using_gpu
    if fp16 and deepspeed is None and (use_cpu or not _cuda_available()):
        # accelerate would drop it silently: fp16 autocast and loss scaling are GPU features.
        log.warning(
            "train_args.fp16: fp16 mixed precision needs a GPU; training on the CPU in model_dtype "
            "(%s) instead (train_args.bf16 is mixed precision that works on the CPU)",
            targs.model_dtype,
        )
        fp16 = False
    bf16, fp16 = execution.mixed_precision(bf16=bf16, fp16=fp16)
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
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


def local_optimizer(cfg: Config, model: Any, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer ``args.optim`` names over the trainable parameters, in Hugging Face's two decay groups."""
    from transformers import Trainer

    targs = cfg.train_args
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
    optimizer: torch.optim.Optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
    return optimizer


def run_schedule(cfg: Config, optimizer: Any, steps: int) -> Any:
    """The learning-rate schedule of the whole run: ``steps`` per round times ``comm_round``."""
    from transformers import get_scheduler

    targs = cfg.train_args
    total = steps * targs.comm_round
    warmup = targs.warmup_steps or math.ceil(targs.warmup_ratio * total)
    return get_scheduler(
        targs.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total
    )
