"""metrics.jsonl stays strict JSON whatever the run reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unitedllm.tracking.metrics import MetricsLog, read_metrics


def _strict(line: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_null_at_any_depth(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.log(
            "eval",
            round_idx=0,
            rank=1,
            loss=float("nan"),
            metrics={"eval_loss": float("inf"), "perplexity": 3.0},
            per_category={"a": [float("-inf"), 1.0]},
        )
    record = _strict(path.read_text().strip())
    assert record["loss"] is None  # type: ignore[index]
    assert record["metrics"] == {"eval_loss": None, "perplexity": 3.0}  # type: ignore[index]
    assert record["per_category"] == {"a": [None, 1.0]}  # type: ignore[index]
    assert list(read_metrics(path))[0]["metrics"]["perplexity"] == 3.0


# -- the typed events: one union for the writer and every reader ----------------------------------


def test_the_committed_metrics_event_schema_is_current() -> None:
    from unitedllm.schemas import committed_dir, render
    from unitedllm.tracking.events import events_schema

    committed = committed_dir() / "metrics-event.schema.json"
    assert committed.read_text(encoding="utf-8") == render(events_schema()), (
        "schemas/metrics-event.schema.json is stale; run: python -m unitedllm.schemas"
    )


def test_every_event_a_federated_run_writes_is_declared(tmp_path: Path, caplog: Any) -> None:
    import asyncio

    import msgspec
    from linear_trainer import LinearTrainer

    from unitedllm.config.types import Config
    from unitedllm.runner import run_async
    from unitedllm.tracking.events import decode_event

    cfg = msgspec.convert(
        {
            "train_args": {
                "comm_round": 2,
                "client_num_in_total": 2,
                "client_num_per_round": 2,
                "local_max_steps": 2,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "validation_args": {"test_on_clients": "both", "is_aggregator_test": True, "save_frequency": 1},
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )
    caplog.set_level("WARNING", logger="unitedllm.tracking.metrics")
    result = asyncio.run(run_async(cfg, run_id="typed", trainer_factory=lambda _c, rank: LinearTrainer(rank)))
    files = [result.output_dir / "metrics.jsonl", *result.output_dir.glob("node_*/metrics.jsonl")]
    seen = set()
    for path in files:
        for line in path.read_bytes().splitlines():
            event = decode_event(line)
            assert event is not None, line
            seen.add(json.loads(line)["event"])
    assert {"round_start", "round", "train", "eval", "run_end", "client_joined"} <= seen
    assert "does not match" not in caplog.text


def test_an_old_file_still_reads_and_unknown_lines_are_left_out(tmp_path: Path) -> None:
    from unitedllm.report.data import load_run

    lines = [
        {"event": "round_start", "round": 0, "rank": 0, "time": 1.0, "selected": [1, 2], "old_field": 1},
        {"event": "train", "round": 0, "rank": 1, "time": 2.0, "loss": 0.5, "samples": 10, "seconds": 1.5},
        {"event": "something_from_a_newer_version", "round": 0, "rank": 0},
        {
            "event": "round",
            "round": 0,
            "rank": 0,
            "selected": [1, 2],
            "aggregated": [1],
            "rejected": {"2": "nan"},
        },
        {"event": "run_end", "round": 0, "rank": 0, "output_dir": "x"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"event": "train", "rou'
    (tmp_path / "metrics.jsonl").write_text(text)
    run = load_run(tmp_path)
    assert run.finished and run.skipped_lines == 1
    assert run.rounds[0].aggregated == [1] and run.rounds[0].rejected == {"2": "nan"}
    assert run.clients[(0, 1)].train_loss == 0.5 and run.clients[(0, 1)].train_seconds == 1.5


def test_the_report_does_not_put_one_field_in_place_of_another(tmp_path: Path) -> None:
    from unitedllm.report.data import load_run

    # The aggregator's view of an update (its size as received) is not the client's own upload count,
    # and a loss the trainer only put in its metrics is not the event's loss.
    line = {
        "event": "train",
        "round": 0,
        "rank": 1,
        "bytes_received": 1234,
        "metrics": {"train_loss": 0.7, "train_seconds": 9.0},
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    client = load_run(tmp_path).clients[(0, 1)]
    assert client.bytes_sent is None and client.train_loss is None and client.train_seconds is None
