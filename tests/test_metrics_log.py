"""metrics.jsonl stays strict JSON whatever the run reports."""

from __future__ import annotations

import json
from pathlib import Path

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
