"""A run's logs and metrics on the controller: sequenced batches from the agents (a batch sent
twice is kept once), the rounds read from the aggregator's metrics.jsonl, and the archive to S3."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select

from unitedllm.errors import UnitedLLMError
from unitedllm.platform.controller import Controller
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.models import LogBatch, Run

__all__ = ["STREAMS", "RunLogs"]

log = logging.getLogger(__name__)

STREAMS = ("log", "metrics")


class RunLogs:
    """The batches of every run in the controller's database, and their archive in its S3 store."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self.db = controller.db

    def append_logs(self, device_id: str, *, run_id: str, seq: int, text: str, stream: str = "log") -> None:
        """Store one sequenced batch of a role's output or metrics; the same batch sent again is kept once."""
        if stream not in STREAMS:
            raise PlatformError(f"stream {stream!r}: expected one of {', '.join(STREAMS)}", status=422)
        with self.db.session() as s:
            exists = s.scalar(
                select(LogBatch.id).where(
                    LogBatch.run_id == run_id,
                    LogBatch.device_id == device_id,
                    LogBatch.stream == stream,
                    LogBatch.seq == seq,
                )
            )
            if exists is None:
                s.add(LogBatch(run_id=run_id, device_id=device_id, seq=seq, text=text, stream=stream))

    def logs(
        self, run_id: str, *, device_id: str | None = None, after: int = 0, stream: str = "log"
    ) -> list[dict[str, Any]]:
        with self.db.session() as s:
            query = select(LogBatch).where(
                LogBatch.run_id == run_id, LogBatch.id > after, LogBatch.stream == stream
            )
            if device_id is not None:
                query = query.where(LogBatch.device_id == device_id)
            return [
                {"id": b.id, "device_id": b.device_id, "seq": b.seq, "text": b.text}
                for b in s.scalars(query.order_by(LogBatch.id))
            ]

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """The run's metrics.jsonl events as the aggregator's agent streamed them."""
        events = []
        for batch in self.logs(run_id, stream="metrics"):
            for line in batch["text"].splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
        return events

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """One row per finished round (the last record of a round wins, as after a resume)."""
        rows: dict[int, dict[str, Any]] = {}
        for event in self.metrics(run_id):
            if event.get("event") == "round" and isinstance(event.get("round"), int):
                rows[event["round"]] = {
                    k: event.get(k) for k in ("round", "aggregated", "train_loss", "eval_loss", "seconds")
                }
        return [rows[r] for r in sorted(rows)]

    def archive_logs(self, run_id: str) -> dict[str, Any]:
        """Copy each device's whole log of an ended run to S3 and note where (a failure is logged)."""
        texts: dict[str, str] = {}
        for batch in self.logs(run_id):
            texts[batch["device_id"]] = texts.get(batch["device_id"], "") + batch["text"]
        archive: dict[str, Any] = {}
        try:
            for device_id, text in texts.items():
                data = text.encode()
                digest, url = self.controller.store.archive_sync(run_id, data)
                archive[device_id] = {"digest": digest, "size": len(data), "url": url}
        except UnitedLLMError as exc:
            log.warning("run %s: archiving its logs to S3 failed: %s", run_id, exc)
            return {}
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is not None:
                run.log_archive = archive
        return archive
