"""``unitedllm export``: one checkpoint of a run as a self-contained Hugging Face model folder.

The folder holds the adapter (``adapter_config.json`` + safetensors, for ``PeftModel.from_pretrained``)
or, with ``merge``, the base with the adapter merged in (``merge_and_unload``; for plain
``AutoModelForCausalLM.from_pretrained``), plus the tokenizer with the training prompt template as its
chat template, a generation config, ``prompt_template.json`` and a model card with the provenance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.serving.card import provenance, write_card
from unitedllm.serving.layout import RunFolder
from unitedllm.serving.template import CHAT_TEMPLATE, TEMPLATE_NAME

__all__ = ["Checkpoint", "export_model", "select_checkpoint"]

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Checkpoint:
    """One adapter folder of a run and what it is."""

    path: Path
    round: int | None
    rank: int
    kind: str  # "global", "local" (a client's own) or "received" (the global model as a client got it)


def _rounds_text(found: dict[int, Path]) -> str:
    return ", ".join(str(r) for r in found) or "none"


def select_checkpoint(
    run: RunFolder, *, round_spec: str = "final", rank: int = 0, received: bool = False
) -> Checkpoint:
    """The checkpoint ``--round``/``--rank``/``--received`` name; a usage error names what exists."""
    if not RunFolder.looks_like(run.root):
        raise ConfigError(ConfigProblem("RUN_DIR", f"{run.root} is not a run folder (it has no node_0/)"))
    if rank < 0 or (rank > 0 and not run.node(rank).is_dir()):
        raise ConfigError(
            ConfigProblem("--rank", f"{rank} has no folder in {run.root} (ranks: {run.client_ranks()})")
        )
    kind = "global" if rank == 0 else ("received" if received else "local")
    found = run.global_rounds() if rank == 0 else run.rounds(rank=rank, stage=_stage(kind))
    if round_spec == "final":
        if rank == 0:
            final_round = run.final_round()
            if final_round is None:
                raise ConfigError(
                    ConfigProblem(
                        "--round",
                        f"final: {run.final} does not exist yet (saved rounds: {_rounds_text(found)})",
                    )
                )
            return Checkpoint(run.final, final_round, 0, kind)
        if not found:
            raise ConfigError(ConfigProblem("--rank", f"{rank} saved no {kind} model in {run.root}"))
        last = max(found)
        return Checkpoint(found[last], last, rank, kind)
    try:
        round_idx = int(round_spec)
    except ValueError:
        raise ConfigError(
            ConfigProblem("--round", f"{round_spec!r} is not a round number or 'final'")
        ) from None
    if round_idx not in found:
        raise ConfigError(
            ConfigProblem(
                "--round", f"{round_idx}: no {kind} model saved (saved rounds: {_rounds_text(found)})"
            )
        )
    return Checkpoint(found[round_idx], round_idx, rank, kind)


def _stage(kind: str) -> str:
    return "after_agg" if kind in ("global", "received") else "before_agg"


def export_model(
    run_dir: Path,
    out: Path,
    *,
    round_spec: str = "final",
    rank: int = 0,
    received: bool = False,
    merge: bool = False,
    config: Path | None = None,
    force: bool = False,
) -> Path:
    """Write the chosen checkpoint of ``run_dir`` to ``out``; returns ``out``."""
    from unitedllm.checkpoints import atomic_dir

    run = RunFolder(run_dir)
    checkpoint = select_checkpoint(run, round_spec=round_spec, rank=rank, received=received)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(
            ConfigProblem("--out", f"{out} exists and is not empty (add --force to replace it)")
        )
    if config is not None and not config.is_file():
        raise ConfigError(ConfigProblem("--config", f"{config} is not a file"))
    base = run.base_model()
    record = provenance(
        run,
        source=checkpoint.path,
        round_idx=checkpoint.round,
        rank=checkpoint.rank,
        kind=checkpoint.kind,
        merged=merge,
        base=base,
        config=config,
    )
    with atomic_dir(out) as tmp:
        tokenizer = _save_tokenizer(checkpoint.path, base, tmp)
        if merge:
            _save_merged(base, checkpoint.path, tmp)
        else:
            _save_adapter(checkpoint.path, base, tmp)
        _save_generation_config(tokenizer, tmp)
        (tmp / "prompt_template.json").write_text(
            json.dumps({"name": TEMPLATE_NAME, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n",
            encoding="utf-8",
        )
        write_card(tmp, record)
    return out


def _save_tokenizer(adapter: Path, base: str, directory: Path) -> Any:
    from transformers import AutoTokenizer

    source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def _save_adapter(adapter: Path, base: str, directory: Path) -> None:
    """The adapter, recording ``base`` (a folder here, or a hub id that loads anywhere), and the base's config."""
    from transformers import AutoConfig

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for weights in adapter.glob("adapter_model.*"):
        shutil.copy2(weights, directory / weights.name)
    if (Path(base) / "config.json").is_file():
        shutil.copy2(Path(base) / "config.json", directory / "config.json")
    else:
        AutoConfig.from_pretrained(base).save_pretrained(str(directory))


def _save_merged(base: str, adapter: Path, directory: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(directory), safe_serialization=True)


def _save_generation_config(tokenizer: Any, directory: Path) -> None:
    from transformers import GenerationConfig

    config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )
    config.save_pretrained(str(directory))
