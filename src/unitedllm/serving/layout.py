"""The models of a run folder that serving and export read: its base, global and client adapters.

The paths come from :class:`~unitedllm.run_layout.RunLayout` (``node_0/init`` the base,
``node_0/round_<r>_after_agg`` the global adapter after round r, ``node_0/final``,
``node_<k>/round_<r>_before_agg`` client k's local model); this module adds what a folder holds.
Checkpoint folders appear by an atomic rename, so a listed folder is complete, and the aggregator's
hold the sha256 of each of their files (``SHA256SUMS``, :mod:`unitedllm.checkpoints`), which
:meth:`RunFolder.recorded_digest` checks before a global adapter is served.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from unitedllm.checkpoints import DIGESTS_FILE, file_digest, read_digests
from unitedllm.checkpoints import SERVER_STATE_FILE as SERVER_STATE
from unitedllm.run_layout import AGGREGATOR_RANK, RunLayout, Stage
from unitedllm.serving.errors import AdapterRefused

__all__ = ["RunFolder", "adapter_base", "is_adapter_dir", "is_hub_id", "is_model_dir"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: A model id on the Hugging Face hub, as ``from_pretrained`` takes it: ``name`` or ``owner/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


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
    layout: RunLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", RunLayout(self.root))

    @staticmethod
    def looks_like(path: Path) -> bool:
        """True for a folder holding a run's ``node_0``."""
        return RunLayout(path).is_run()

    @property
    def run_id(self) -> str:
        """The run id the aggregator recorded, else the folder's name."""
        for folder in (self.final, self.layout.resume_point):
            try:
                recorded = json.loads((folder / SERVER_STATE).read_text(encoding="utf-8")).get("run_id")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(recorded, str) and recorded:
                return recorded
        return self.root.resolve().name

    @property
    def metrics(self) -> Path:
        return self.layout.metrics()

    def node(self, rank: int) -> Path:
        return self.layout.node(rank)

    @property
    def init(self) -> Path:
        return self.layout.init()

    @property
    def final(self) -> Path:
        return self.layout.final()

    def round_dir(self, round_idx: int, *, rank: int = AGGREGATOR_RANK, stage: str = "after_agg") -> Path:
        return self.layout.round_dir(round_idx, rank=rank, stage=cast(Stage, stage))

    def rounds(self, *, rank: int = AGGREGATOR_RANK, stage: str = "after_agg") -> dict[int, Path]:
        """The saved adapters of one rank and stage, by round."""
        return {
            r: path
            for r, path in self.layout.rounds(rank=rank, stage=cast(Stage, stage)).items()
            if is_adapter_dir(path)
        }

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

    @staticmethod
    def recorded_digest(adapter: Path, *, required: bool) -> str | None:
        """The sha256 the aggregator recorded for a global adapter's weights, its config checked on the way.

        The weights' own digest is checked when they load (they are read once, for the check and the
        model). A folder without a record gives ``None``, or is refused when ``required`` (a live run's
        new rounds always have one). Raises :class:`AdapterRefused` naming the file that differs.
        """
        recorded = read_digests(adapter)
        if recorded is None:
            if required:
                raise AdapterRefused(
                    str(adapter), f"it has no {DIGESTS_FILE}: the run recorded no digest for it"
                )
            return None
        expected = recorded.get(ADAPTER_WEIGHTS)
        if expected is None:
            raise AdapterRefused(str(adapter), f"its {DIGESTS_FILE} records no digest of {ADAPTER_WEIGHTS}")
        config_expected = recorded.get(ADAPTER_CONFIG)
        try:
            config_found = file_digest(adapter / ADAPTER_CONFIG)
        except OSError as exc:
            raise AdapterRefused(str(adapter), f"cannot read {ADAPTER_CONFIG}: {exc}") from exc
        if config_expected != config_found:
            raise AdapterRefused(
                str(adapter),
                f"{ADAPTER_CONFIG} has sha256 {config_found}, not the {config_expected} its {DIGESTS_FILE} records",
            )
        return expected

    def client_ranks(self) -> list[int]:
        """Ranks (1..N) with a folder in the run."""
        return [r for r in self.layout.ranks() if r != AGGREGATOR_RANK]

    def base_model(self) -> str:
        """The base model the adapters were trained on, as ``from_pretrained`` takes it.

        ``node_0/init`` (absolute) when it holds weights (a randomly initialised base is saved
        there), else what the adapters record: a local folder, or the hub id of a pretrained base.
        """
        if is_model_dir(self.init):
            return str(self.init.resolve())
        for adapter in [self.final, *self.rounds().values()]:
            base = adapter_base(adapter)
            if base is not None:
                return base
        return str(self.init.resolve())


def is_hub_id(base: str) -> bool:
    """Whether ``base`` names a model on the hub (``owner/name``) rather than a folder on this machine."""
    return not Path(base).exists() and ".." not in base and _HUB_ID.fullmatch(base) is not None


def adapter_base(adapter: Path) -> str | None:
    """The base model an adapter folder records: a folder on this machine (absolute), or a hub id.

    None when its config is unreadable or names a path that is not here.
    """
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    if Path(base).is_dir():
        return str(Path(base).resolve())
    return base if is_hub_id(base) else None
