"""TensorBoard tracker: one event-file directory per rank under ``<output_dir>/tensorboard/``.

Every rank uses the same tags (``train/loss``, ``eval/loss``...), so TensorBoard draws the
aggregator and each client as separate runs on one chart per metric.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from unitedllm.errors import MissingDependency
from unitedllm.tracking.scalars import Scalar, rank_prefix
from unitedllm.tracking.sink import TrackerSink

__all__ = ["TensorBoardSink"]


class TensorBoardSink(TrackerSink):
    """Writes scalars with ``torch.utils.tensorboard.SummaryWriter``; step = round (sample for system)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, *, params: dict[str, Any] | None = None, rank: int = 0):
        super().__init__()
        try:
            # Check the package itself: torch.utils.tensorboard's own error would not name our extra.
            importlib.import_module("tensorboard")
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise MissingDependency("tensorboard", "tracking", "tracking_args.enable_tensorboard") from exc

        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self._writers: dict[int, Any] = {}
        if params:
            # The (already redacted) config as a Markdown table under TEXT, like the other trackers' params.
            rows = "\n".join(f"| {key} | {str(value)[:200]} |" for key, value in sorted(params.items()))
            self._writer(rank).add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def _writer(self, rank: int) -> Any:
        if rank not in self._writers:
            self._writers[rank] = self._writer_class(log_dir=str(self.log_dir / rank_prefix(rank)))
        return self._writers[rank]

    def write(self, scalars: list[Scalar]) -> None:
        for s in scalars:
            self._writer(s.rank).add_scalar(s.tag, s.value, global_step=s.step, walltime=s.wall_time)

    def finish(self, *, failed: bool) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
