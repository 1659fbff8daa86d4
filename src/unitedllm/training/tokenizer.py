"""Get the run's tokenizer: train a small byte-level BPE offline, or load one from a hub id / local dir.

A trained tokenizer is cached on disk under ``<cache_dir>/tokenizers/<digest>`` where the
digest covers the training texts and the vocabulary size, so every rank of a run (and
every re-run) gets byte-identical token ids without retraining.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.training.sources import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from unitedllm.config.types import Config

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "load_tokenizer", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_MIN_VOCAB = 256 + 2  # the byte alphabet plus our two special tokens


def _digest(texts: Sequence[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-v1:{vocab_size}:{len(texts)}".encode())
    for text in texts:
        h.update(len(text).to_bytes(8, "little"))
        h.update(text.encode("utf-8"))
    return h.hexdigest()[:32]


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer of ``vocab_size`` trained on ``texts`` (cached under ``cache_dir``)."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise ConfigError(
            ConfigProblem(
                "model_args.train_tokenizer_vocab_size",
                f"must be at least {_MIN_VOCAB} (256 bytes + 2 special tokens), got {vocab_size}",
            )
        )
    if not texts:
        raise ConfigError(
            ConfigProblem(
                "model_args.train_tokenizer_vocab_size", "no training texts to train a tokenizer on"
            )
        )
    target = cache_dir / "tokenizers" / _digest(texts, vocab_size)
    if (target / "tokenizer.json").is_file():
        cached: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(str(target))
        return cached

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    # Write to a private dir then rename: ranks in one process or on one disk may race here.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trained: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(str(target))
    return trained


def _load_pretrained_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    margs = cfg.model_args
    source = margs.tokenizer_name_or_path or margs.model_name_or_path
    where = (
        "model_args.tokenizer_name_or_path"
        if margs.tokenizer_name_or_path
        else "model_args.model_name_or_path"
    )
    local = Path(source).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(local) if local.is_dir() else source,
            trust_remote_code=margs.trust_remote_code,
            revision=margs.model_revision,
        )
    except (OSError, ValueError, KeyError) as exc:
        # A bare dir with only tokenizer.json (+ special_tokens_map.json) and no model config
        # can confuse AutoTokenizer's model-type lookup; the fast tokenizer reads it directly.
        if local.is_dir() and (local / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(local))
        else:
            hint = (
                " (set model_args.train_tokenizer_vocab_size to train one offline)" if local.is_dir() else ""
            )
            raise ConfigError(
                ConfigProblem(where, f"cannot load a tokenizer from {source!r}: {exc}{hint}")
            ) from exc
    if tokenizer.eos_token is None:
        raise ConfigError(ConfigProblem(where, f"the tokenizer at {source!r} has no eos token"))
    if tokenizer.pad_token is None:
        # Causal LMs usually ship without a pad token; labels mask padding anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: Config, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerBase:
    """The run's tokenizer: trained on ``corpus`` when ``train_tokenizer_vocab_size`` is set, else loaded."""
    size = cfg.model_args.train_tokenizer_vocab_size
    if size is not None:
        if corpus is None:
            from unitedllm.training.data import tokenizer_corpus

            corpus = tokenizer_corpus(cfg)
        return train_tokenizer(corpus, size, cache_root(cfg))
    return _load_pretrained_tokenizer(cfg)
