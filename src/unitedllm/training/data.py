"""Turn instruction records into tokenized causal-LM examples whose loss covers the response only.

Each record becomes ``prompt + response + eos`` with the Dolly/Alpaca prompt template
(the context block only when the record has one). ``labels`` are ``-100`` on the prompt
tokens, so training and evaluation measure the response alone. Sequences longer than
``data_args.max_seq_length`` are dropped (``remove_long_seq``) or cut (``truncate_long_seq``),
or, with both false (as FedML allows), kept whole with a warning;
examples left without a single response token are always dropped. Tokenized splits are
cached as Arrow files under the cache dir, keyed by records, tokenizer and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from unitedllm.training.sources import (
    Record,
    cache_root,
    client_records,
    server_test_records,
    training_records,
)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from unitedllm.config.types import Config

__all__ = [
    "IGNORE_INDEX",
    "CausalCollator",
    "client_data",
    "format_prompt",
    "server_test_data",
    "tokenize_records",
    "tokenizer_corpus",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TEMPLATE_VERSION = "dolly-v1"
_HEAD = "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request.\n\n"


def format_prompt(record: Record) -> str:
    """The prompt (everything before the response) for one record."""
    instruction = record["instruction"].strip()
    context = record.get("context", "").strip()
    if context:
        head = _HEAD.format(extra=", paired with an input that provides further context")
        return f"{head}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"{_HEAD.format(extra='')}### Instruction:\n{instruction}\n\n### Response:\n"


def tokenizer_corpus(cfg: Config) -> list[str]:
    """The texts a trained tokenizer learns from: every client's training examples, in a fixed order."""
    return [format_prompt(r) + r["response"] for r in training_records(cfg)]


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    cached = getattr(tokenizer, "_unitedllm_digest", None)
    if isinstance(cached, str):
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(f"{body}\0{tokenizer.eos_token}".encode()).hexdigest()
    tokenizer._unitedllm_digest = digest
    return digest


def _encode_batch(
    batch: dict[str, list[str]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    remove_long: bool,
    truncate_long: bool,
) -> dict[str, list[Any]]:
    records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    prompts = tokenizer([format_prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "category": []}
    eos = tokenizer.eos_token_id
    for record, prompt, response in zip(records, prompts, responses, strict=True):
        ids = list(prompt) + list(response) + [eos]
        labels = [IGNORE_INDEX] * len(prompt) + list(response) + [eos]
        if len(ids) > max_len:
            if remove_long:
                continue
            if truncate_long:
                ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # nothing left to learn or score
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["category"].append(record.get("category", ""))
    return out


def tokenize_records(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, cfg: Config) -> Dataset:
    """A ``datasets.Dataset`` of ``input_ids``/``labels``/``category`` for ``records`` (cached on disk)."""
    from datasets import Dataset

    dargs = cfg.data_args
    settings = (dargs.max_seq_length, dargs.remove_long_seq, dargs.truncate_long_seq, _TEMPLATE_VERSION)
    h = hashlib.sha256(json.dumps([settings, _tokenizer_digest(tokenizer)]).encode())
    h.update(json.dumps(list(records), sort_keys=True).encode())
    digest = h.hexdigest()[:32]
    cache_dir = cache_root(cfg) / "datasets"
    cache_dir.mkdir(parents=True, exist_ok=True)
    columns = {k: [r.get(k, "") for r in records] for k in ("instruction", "context", "response", "category")}
    raw = Dataset.from_dict(columns)
    from datasets.utils import logging as ds_logging

    # Small per-round splits: progress bars would only clutter the run's console.
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return _map(raw, tokenizer, cfg, cache_dir / f"{digest}.arrow", digest)
    finally:
        if bars:
            ds_logging.enable_progress_bar()


def _map(
    raw: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: Config, cache_file: Any, digest: str
) -> Dataset:
    dargs = cfg.data_args
    mapped = raw.map(
        _encode_batch,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_len": dargs.max_seq_length,
            "remove_long": dargs.remove_long_seq,
            "truncate_long": dargs.truncate_long_seq,
        },
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        new_fingerprint=digest,
        desc=None,
    )
    if not dargs.remove_long_seq and not dargs.truncate_long_seq:
        long = sum(len(ids) > dargs.max_seq_length for ids in mapped["input_ids"])
        if long:
            log.warning(
                "%d of %d examples are longer than data_args.max_seq_length (%d) and reach the model uncut "
                "(data_args.remove_long_seq and truncate_long_seq are both false)",
                long,
                len(mapped),
                dargs.max_seq_length,
            )
    return mapped


def client_data(cfg: Config, rank: int, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset]:
    """Tokenized (train, test) splits of client ``rank`` (1..N)."""
    train, test = client_records(cfg, rank)
    return tokenize_records(train, tokenizer, cfg), tokenize_records(test, tokenizer, cfg)


def server_test_data(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The tokenized global held-out test set the aggregator (rank 0) evaluates on."""
    return tokenize_records(server_test_records(cfg), tokenizer, cfg)


class CausalCollator:
    """Pads a list of examples into a batch (right padding; padded labels are ignored by the loss)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
