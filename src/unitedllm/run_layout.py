"""The folder of one run (``train_args.output_dir``): every path in it, spelled in one place.

::

    <output_dir>/
      metrics.jsonl                      the aggregator's events (unitedllm.tracking.events)
      report/                            unitedllm report's page and plots
      tensorboard/                       TensorBoard, when enabled (a client's: node_<k>/tensorboard/)
      node_0/init                        the initial model (the random base, when there is one)
      node_0/round_<r>_after_agg         the global model after round r, with the server state and SHA256SUMS
      node_0/final                       the final global model (with SHA256SUMS too)
      node_0/last                        the resume point (global weights and server state)
      node_<k>/metrics.jsonl             client k's own events
      node_<k>/init, final               its copies of the base and of the final global model
      node_<k>/round_<r>_before_agg      its local model after training round r
      node_<k>/round_<r>_after_agg       the global model of round r as it received it
      node_<k>/trainer_state/            its optimizer/schedule state before each round
      node_<k>/sent/                     its last sent update
      node_<k>/scaffold_control/         its SCAFFOLD control variate c_k

Writers and readers (the aggregator, clients, checkpoints, the report, serving, the platform)
ask a :class:`RunLayout` for a path instead of joining names themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unitedllm.ranks import AGGREGATOR_RANK

__all__ = ["AGGREGATOR_RANK", "RunLayout", "Stage"]

Stage = Literal["before_agg", "after_agg"]

_NODE = re.compile(r"^node_(\d+)$")
_ROUND = re.compile(r"^round_(\d+)_(before_agg|after_agg)$")


@dataclass(frozen=True)
class RunLayout:
    """Paths of the run folder ``root`` (nothing is created or read here)."""

    root: Path

    def node(self, rank: int) -> Path:
        """The folder of one rank's records and checkpoints (``node_0`` is the aggregator)."""
        return self.root / f"node_{rank}"

    def is_run(self) -> bool:
        """Whether ``root`` holds a run: its aggregator's ``node_0`` folder exists."""
        return self.node(AGGREGATOR_RANK).is_dir()

    def ranks(self) -> list[int]:
        """The ranks with a ``node_<rank>`` folder in the run, in order."""
        found = [int(m.group(1)) for child in self.root.iterdir() if (m := _NODE.match(child.name))]
        return sorted(found)

    def rounds(self, *, rank: int = AGGREGATOR_RANK, stage: Stage = "after_agg") -> dict[int, Path]:
        """The ``round_<r>_<stage>`` folders one rank has, by round (none when it has no folder)."""
        node = self.node(rank)
        if not node.is_dir():
            return {}
        found: dict[int, Path] = {}
        for child in node.iterdir():
            match = _ROUND.match(child.name)
            if match and match.group(2) == stage:
                found[int(match.group(1))] = child
        return dict(sorted(found.items()))

    def metrics(self, rank: int = AGGREGATOR_RANK) -> Path:
        """A rank's ``metrics.jsonl``: the run's own for the aggregator, ``node_<rank>/`` for a client."""
        return self.root / "metrics.jsonl" if rank == AGGREGATOR_RANK else self.node(rank) / "metrics.jsonl"

    def tracker_dir(self, rank: int = AGGREGATOR_RANK) -> Path:
        """Where a rank's trackers write (the folder holding its ``metrics.jsonl``)."""
        return self.metrics(rank).parent

    def tensorboard(self, rank: int = AGGREGATOR_RANK) -> Path:
        """A rank's TensorBoard event files: ``tensorboard/`` beside its ``metrics.jsonl``."""
        return self.tracker_dir(rank) / "tensorboard"

    def init(self, rank: int = AGGREGATOR_RANK) -> Path:
        return self.node(rank) / "init"

    def final(self, rank: int = AGGREGATOR_RANK) -> Path:
        return self.node(rank) / "final"

    def round_dir(self, round_idx: int, *, rank: int = AGGREGATOR_RANK, stage: Stage = "after_agg") -> Path:
        """``node_<rank>/round_<r>_<stage>``."""
        return self.node(rank) / f"round_{round_idx}_{stage}"

    @property
    def resume_point(self) -> Path:
        """The aggregator's resume point, rewritten after every round."""
        return self.node(AGGREGATOR_RANK) / "last"

    def trainer_state(self, rank: int) -> Path:
        return self.node(rank) / "trainer_state"

    def sent(self, rank: int) -> Path:
        return self.node(rank) / "sent"

    def client_algorithm_state(self, rank: int) -> Path:
        """Where a client keeps its algorithm's own state across rounds (SCAFFOLD's control variate)."""
        return self.node(rank) / "scaffold_control"

    @property
    def report(self) -> Path:
        return self.root / "report"
