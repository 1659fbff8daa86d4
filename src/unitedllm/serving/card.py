"""Provenance of an exported model: which run, round and clients made it, and how it scored.

The run folder records the round table in ``metrics.jsonl`` (clients aggregated, eval loss); the run
config is not kept there, so its digest and the server optimizer come from ``--config`` when given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unitedllm.serving.layout import RunFolder
from unitedllm.serving.template import TEMPLATE_NAME

__all__ = ["Provenance", "file_digest", "provenance", "write_card"]

PROVENANCE_FILE = "unitedllm_export.json"


def file_digest(path: Path) -> str:
    """sha256 of a file, in hex."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Provenance:
    """Where an exported model came from (written as ``unitedllm_export.json`` and in the card)."""

    run_id: str
    source: str
    round: int | None
    rank: int
    kind: str
    merged: bool
    base_model: str
    adapter_sha256: str
    prompt_template: str = TEMPLATE_NAME
    config_sha256: str | None = None
    server_optimizer: str | None = None
    clients: list[int] = field(default_factory=list)
    eval_loss: float | None = None
    perplexity: float | None = None
    train_loss: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def provenance(
    run: RunFolder,
    *,
    source: Path,
    round_idx: int | None,
    rank: int,
    kind: str,
    merged: bool,
    base: str,
    config: Path | None,
) -> Provenance:
    """Collect the provenance of one checkpoint of ``run``."""
    from unitedllm.errors import UnitedLLMError

    record = Provenance(
        run_id=run.run_id,
        source=str(source.resolve()),
        round=round_idx,
        rank=rank,
        kind=kind,
        merged=merged,
        base_model=base,
        adapter_sha256=file_digest(source / "adapter_model.safetensors"),
    )
    if config is not None:
        from unitedllm.config import load_config

        record.config_sha256 = file_digest(config)
        record.server_optimizer = load_config(config).server_optimizer_name
    try:
        from unitedllm.report.data import load_run

        data = load_run(run.root)
    except UnitedLLMError:
        return record  # no metrics.jsonl: the card says what is known
    if round_idx is not None and round_idx in data.rounds:
        row = data.rounds[round_idx]
        record.clients = sorted(row.aggregated) if rank == 0 else [rank]
        if rank == 0 or kind == "received":
            record.train_loss = row.train_loss
            record.eval_loss, record.perplexity = data.global_eval(round_idx)
        else:  # a client's own model: its training loss; nobody evaluated it on the held-out set
            own = data.clients.get((round_idx, rank))
            record.train_loss = own.train_loss if own else None
    return record


def _value(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def write_card(directory: Path, record: Provenance) -> None:
    """``README.md`` (a Hugging Face model card) and ``unitedllm_export.json`` in ``directory``."""
    what = "merged model" if record.merged else "LoRA adapter"
    rows = [
        ("run id", record.run_id),
        ("model", f"{record.kind}, rank {record.rank}"),
        ("round", record.round),
        ("clients that contributed", record.clients),
        ("server optimizer", record.server_optimizer),
        ("config sha256", record.config_sha256),
        ("adapter sha256", record.adapter_sha256),
        ("base model", record.base_model),
        ("eval loss (global held-out set)", record.eval_loss),
        ("perplexity", record.perplexity),
        ("train loss", record.train_loss),
        ("prompt template", record.prompt_template),
    ]
    table = "\n".join(f"| {name} | {_value(value)} |" for name, value in rows)
    library = "transformers" if record.merged else "peft"
    text = (
        f"---\nlibrary_name: {library}\npipeline_tag: text-generation\ntags:\n- unitedllm\n- federated\n---\n\n"
        f"# {record.run_id}: {record.kind} model, round {_value(record.round)}\n\n"
        f"A {what} exported by `unitedllm export` from a federated UnitedLLM run.\n\n"
        f"| | |\n| --- | --- |\n{table}\n\n"
        "Prompts use the template the model was trained with (`prompt_template.json`; also the "
        "tokenizer's chat template, so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` "
        "gives the training prompt).\n"
    )
    (directory / "README.md").write_text(text, encoding="utf-8")
    (directory / PROVENANCE_FILE).write_text(record.to_json(), encoding="utf-8")
