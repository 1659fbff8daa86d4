"""Where a run folder keeps the models serving and export read: the only module that knows its paths.

A run folder is ``train_args.output_dir``: ``node_0/init`` (the base), ``node_0/round_<r>_after_agg``
(global adapter after round r), ``node_0/final``, ``node_<k>/round_<r>_before_agg`` (client k's
local model), ``node_<k>/round_<r>_after_agg`` (the global model as client k received it) and
``metrics.jsonl``. Checkpoint folders appear by an atomic rename, so a listed folder is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder", "adapter_base", "is_adapter_dir", "is_model_dir"]

_ROUND = re.compile(r"^round_(\d+)_(before_agg|after_agg)$")
_NODE = re.compile(r"^node_(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
SERVER_STATE = "server_state.json"


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder."""
    return (path / ADAPTER_CONFIG).is_file()


def is_model_dir(path: Path) -> bool:
    """A full Hugging Face model folder (config and weights, no adapter)."""
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and has_weights and not is_adapter_dir(path)


@dataclass(frozen=True)
class RunFolder:
    """A run's output folder, read-only."""

    root: Path

    @staticmethod
    def looks_like(path: Path) -> bool:
        """True for a folder holding a run's ``node_0``."""
        return (path / "node_0").is_dir()

    @property
    def run_id(self) -> str:
        """The run id the aggregator recorded, else the folder's name."""
        for folder in (self.final, self.node(0) / "last"):
            try:
                recorded = json.loads((folder / SERVER_STATE).read_text(encoding="utf-8")).get("run_id")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(recorded, str) and recorded:
                return recorded
        return self.root.resolve().name

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def node(self, rank: int) -> Path:
        return self.root / f"node_{rank}"

    @property
    def init(self) -> Path:
        return self.node(0) / "init"

    @property
    def final(self) -> Path:
        return self.node(0) / "final"

    def round_dir(self, round_idx: int, *, rank: int = 0, stage: str = "after_agg") -> Path:
        return self.node(rank) / f"round_{round_idx}_{stage}"

    def rounds(self, *, rank: int = 0, stage: str = "after_agg") -> dict[int, Path]:
        """The saved checkpoints of one rank and stage, by round."""
        found: dict[int, Path] = {}
        node = self.node(rank)
        if not node.is_dir():
            return found
        for child in node.iterdir():
            match = _ROUND.match(child.name)
            if match and match.group(2) == stage and is_adapter_dir(child):
                found[int(match.group(1))] = child
        return dict(sorted(found.items()))

    def global_rounds(self) -> dict[int, Path]:
        """The global adapter after each saved round (``node_0/final`` counts as its own round)."""
        found = self.rounds()
        final_round = self.final_round()
        if final_round is not None:
            found.setdefault(final_round, self.final)
        return dict(sorted(found.items()))

    def final_round(self) -> int | None:
        """The round ``node_0/final`` holds, when it exists."""
        state = self.final / SERVER_STATE
        if not is_adapter_dir(self.final) or not state.is_file():
            return None
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["round"])
        except (ValueError, KeyError, TypeError):
            return None

    def client_ranks(self) -> list[int]:
        """Ranks (1..N) with a folder in the run."""
        ranks = [int(m.group(1)) for c in self.root.iterdir() if (m := _NODE.match(c.name))]
        return sorted(r for r in ranks if r > 0)

    def base_dir(self) -> Path:
        """The base model the adapters were trained on: ``node_0/init`` when it holds weights."""
        if is_model_dir(self.init):
            return self.init
        for adapter in [self.final, *self.rounds().values()]:
            base = adapter_base(adapter)
            if base is not None:
                return base
        return self.init


def adapter_base(adapter: Path) -> Path | None:
    """The base model path an adapter folder records, when it is a local folder."""
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    return Path(base) if isinstance(base, str) and Path(base).is_dir() else None
