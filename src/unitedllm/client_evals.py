"""The clients' evaluation reports, as the aggregator receives them.

Each report is recorded in ``metrics.jsonl`` as it arrives; at the end of a run the aggregator
waits (bounded) for the test clients' evaluations of the final model, never for a client that
went offline meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Set

from unitedllm.protocol.messages import EvalReport
from unitedllm.tracking.metrics import MetricsLog

__all__ = ["FINAL_EVAL_GRACE_S", "ClientEvals"]

log = logging.getLogger(__name__)
# How long the aggregator waits for clients' evaluations of the final model (at most).
FINAL_EVAL_GRACE_S = 600.0


class ClientEvals:
    """Evaluation reports of the run's clients: recorded on arrival, awaited for the final model."""

    def __init__(self) -> None:
        self.reports: list[EvalReport] = []
        self._arrived = asyncio.Event()

    def record(self, report: EvalReport, metrics: MetricsLog) -> None:
        self.reports.append(report)
        self._arrived.set()
        metrics.log(
            "eval",
            round_idx=report.round,
            rank=report.sender,
            split="test",
            model=report.model,
            loss=report.metrics.get("eval_loss"),
            samples=report.num_samples,
            metrics=report.metrics,
        )

    async def await_final(
        self, expected: Callable[[], Set[int]], *, last_round: int, timeout_s: float
    ) -> None:
        """Wait until every rank in ``expected()`` (asked again each time) reported on the final global model."""
        deadline = time.monotonic() + min(FINAL_EVAL_GRACE_S, timeout_s)
        while True:
            got = {r.sender for r in self.reports if r.round == last_round and r.model == "global"}
            missing = expected() - got
            if not missing:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("final evaluations missing from clients %s", sorted(missing))
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass
