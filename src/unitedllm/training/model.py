"""Build the causal LM a run trains: from a hub id or local dir, pretrained or random-init, with LoRA.

With ``load_pretrained: false`` the model is built from its ``config.json`` with random
weights drawn from ``common_args.random_seed`` (in a forked RNG), so every rank of a run
builds byte-identical base weights without downloading them. ``peft_type: lora`` wraps
the model so that only adapter tensors train (and travel); ``none`` trains everything.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from unitedllm.config.types import Config

__all__ = ["DEFAULT_LORA_TARGETS", "build_model", "load_model_config", "lora_target_modules", "torch_dtype"]

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def torch_dtype(cfg: Config) -> torch.dtype:
    """The torch dtype named by ``train_args.model_dtype``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train_args.model_dtype]


def _model_source(cfg: Config) -> str:
    source = cfg.model_args.model_name_or_path
    local = Path(source).expanduser()
    return str(local) if local.is_dir() else source


def load_model_config(cfg: Config) -> PretrainedConfig:
    """The model's ``transformers`` config with ``model_args.model_config_overrides`` applied."""
    from transformers import AutoConfig

    margs = cfg.model_args
    config: Any
    try:
        config = AutoConfig.from_pretrained(
            _model_source(cfg), trust_remote_code=margs.trust_remote_code, revision=margs.model_revision
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            ConfigProblem(
                "model_args.model_name_or_path",
                f"cannot load a model config from {margs.model_name_or_path!r}: {exc}",
            )
        ) from exc
    for key, value in margs.model_config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(
                ConfigProblem(
                    f"model_args.model_config_overrides.{key}",
                    f"{type(config).__name__} ({config.model_type}) has no setting {key!r}",
                )
            )
        setattr(config, key, value)
    return config  # type: ignore[no-any-return]


def _attn_implementation(cfg: Config) -> str:
    if not cfg.model_args.use_flash_attention:
        log.info("attention: sdpa (PyTorch scaled dot-product attention)")
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        log.warning(
            "model_args.use_flash_attention is set but flash_attn is not installed; using sdpa attention"
        )
        return "sdpa"
    log.info("attention: flash_attention_2 (model_args.use_flash_attention)")
    return "flash_attention_2"


def lora_target_modules(cfg: Config, model: PreTrainedModel) -> list[str]:
    """Which modules get LoRA adapters: the config's list, all linear layers, or the architecture's default."""
    import torch

    margs = cfg.model_args
    if margs.lora_target_modules:
        return list(margs.lora_target_modules)
    model_type = getattr(model.config, "model_type", "")
    if not margs.lora_on_all_modules and model_type in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[model_type])
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    if head is not None:
        head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
        names -= head_names
    return sorted(names)


def _wrap_lora(cfg: Config, model: PreTrainedModel) -> PreTrainedModel:
    from peft import LoraConfig, TaskType, get_peft_model

    margs = cfg.model_args
    targets = lora_target_modules(cfg, model)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=margs.lora_r,
        lora_alpha=margs.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=margs.lora_dropout,
        target_modules=targets,
    )
    try:
        wrapped: Any = get_peft_model(model, lora)
        return wrapped  # type: ignore[no-any-return]
    except ValueError as exc:
        raise ConfigError(
            ConfigProblem(
                "model_args.lora_target_modules", f"{targets} do not fit {model.config.model_type}: {exc}"
            )
        ) from exc


def build_model(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, *, trained_tokenizer: bool
) -> PreTrainedModel:
    """The model to train, identical on every rank: base (+ LoRA), vocab fitted to ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    margs = cfg.model_args
    config = load_model_config(cfg)
    vocab = len(tokenizer)
    if trained_tokenizer or vocab > getattr(config, "vocab_size", vocab):
        config.vocab_size = vocab
    if trained_tokenizer:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    gradient_checkpointing = cfg.train_args.gradient_checkpointing
    if gradient_checkpointing:
        config.use_cache = False
    model: Any
    kwargs: dict[str, Any] = {
        "attn_implementation": _attn_implementation(cfg),
        "trust_remote_code": margs.trust_remote_code,
    }
    with torch.random.fork_rng(devices=[]):
        # Same seed on every rank: same random base weights and same initial adapters.
        torch.manual_seed(cfg.common_args.random_seed)
        if margs.load_pretrained:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    _model_source(cfg), config=config, revision=margs.model_revision, **kwargs
                )
            except OSError as exc:
                raise ConfigError(
                    ConfigProblem(
                        "model_args.model_name_or_path",
                        f"cannot load pretrained weights from {margs.model_name_or_path!r} "
                        f"(set model_args.load_pretrained: false to build from config): {exc}",
                    )
                ) from exc
            if model.get_input_embeddings().weight.shape[0] != config.vocab_size:
                model.resize_token_embeddings(config.vocab_size)
        else:
            model = AutoModelForCausalLM.from_config(config, **kwargs)  # type: ignore[no-untyped-call]
        model = model.to(torch_dtype(cfg))
        if gradient_checkpointing:
            _enable_activation_checkpointing(model)
        if margs.peft_type == "lora":
            model = _wrap_lora(cfg, model)
    return model  # type: ignore[no-any-return]


def _enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (transformers >= 5.x names it activation checkpointing;
    older releases only have the gradient-checkpointing name, which newer ones deprecate)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
