"""A global eval loss that rises sharply round over round is reported: metrics event, progress line, report.

The end-to-end runs are the real round loop (in-process backend, signed frames) with a small
least-squares trainer whose clients all fit the same target, so plain FedAvg descends every round
while server momentum 0.9 at learning rate 1 (FedAvgM's defaults) overshoots the optimum after a
few rounds and the held-out loss climbs back: the instability the warning is for.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from linear_trainer import DIM, LinearTrainer
from rich.console import Console
from test_federation import events, make_config

from unitedllm.config.types import Config
from unitedllm.errors import ConfigError
from unitedllm.instability import DEFAULT_LOSS_RISE_NATS, loss_rise, overshoot_advice
from unitedllm.launch import tracked
from unitedllm.progress import RunProgress
from unitedllm.report.data import load_run
from unitedllm.report.html import render_html
from unitedllm.report.table import status_line
from unitedllm.runner import run_async


class SharedTarget(LinearTrainer):
    """Every rank (the aggregator's held-out data included) fits the same ``y = 2 x``: IID clients."""

    def __init__(self, rank: int):
        super().__init__(rank, lr=0.02)
        self.y = self.x @ torch.full((DIM,), 2.0)


def overshoot_config(tmp_path: Path, rule: str, **validation: Any) -> Config:
    return make_config(
        tmp_path,
        train_args={"comm_round": 10, "local_max_steps": 2, "server_optimizer": rule},
        validation_args={"is_aggregator_test": True, **validation},
    )


def run_with_progress(cfg: Config) -> tuple[Any, str]:
    """Run as ``unitedllm run`` does (metrics log with the progress display listening); return what it printed."""
    console = Console(width=200, record=True)
    progress = RunProgress(comm_round=cfg.train_args.comm_round, console=console)
    with tracked(cfg, run_id="r1", listeners=[progress.on_metric]) as metrics:
        result = asyncio.run(
            run_async(
                cfg,
                run_id="r1",
                metrics=metrics,
                on_round=progress.on_round,
                trainer_factory=lambda _cfg, rank: SharedTarget(rank),
            )
        )
    console.print(progress.summary_table())
    return result, console.export_text()


# -- the check itself ------------------------------------------------------------------------------


def test_a_rise_above_the_threshold_is_found_with_both_rounds_named() -> None:
    found = loss_rise([(0, 3.0), (1, 2.0), (2, 2.5)], threshold=0.1)
    assert found is not None
    assert (found.round_idx, found.previous_round) == (2, 1)
    assert math.isclose(found.rise, 0.5)
    assert "rose 0.500 nats in round 2" in found.message and "2.0000 after round 1" in found.message


def test_falling_or_slightly_rising_loss_is_not_a_warning() -> None:
    assert loss_rise([(0, 3.0), (1, 2.0)], threshold=0.1) is None
    assert loss_rise([(0, 2.0), (1, 2.05)], threshold=0.1) is None  # noise, under the threshold
    assert loss_rise([(0, 2.0), (1, 2.25)], threshold=0.25) is None  # the threshold itself is allowed


def test_only_the_latest_round_is_judged_so_each_rise_is_reported_once() -> None:
    history = [(0, 3.0), (1, 4.0), (2, 3.5)]
    assert loss_rise(history[:2], threshold=0.1) is not None
    assert loss_rise(history, threshold=0.1) is None


def test_rounds_without_an_evaluation_are_skipped_to_the_last_evaluated_one() -> None:
    found = loss_rise([(0, 2.0), (1, None), (2, 2.5)], threshold=0.1)
    assert found is not None and found.previous_round == 0
    assert loss_rise([(0, 2.0), (1, None)], threshold=0.1) is None
    assert loss_rise([(0, 2.0)], threshold=0.1) is None


def test_a_loss_that_turns_non_finite_is_a_rise() -> None:
    found = loss_rise([(0, 2.0), (1, math.inf)], threshold=0.1)
    assert found is not None and found.rise == math.inf
    assert loss_rise([(0, 2.0), (1, math.nan)], threshold=0.1) is not None


def test_the_advice_names_the_rules_own_setting() -> None:
    from unitedllm.optimizers import create

    def advice(rule: str, **args: object) -> str:
        return overshoot_advice(rule, create(rule, args).params)

    assert "DiLoCo's outer momentum 0.9" in advice("DiLoCo")
    assert advice("DiLoCo", server_momentum=0.5) == advice("FedAvg")  # nothing of its own to blame
    assert "server_learning_rate=1.0" in advice("FedAvg", server_learning_rate=1.4)
    assert "README" in advice("FedAvg") and "README" in advice("Krum")
    rise = loss_rise([(0, 2.0), (1, 2.5)], threshold=0.1, advice=advice("DiLoCo"))
    assert rise is not None and rise.message.endswith(
        "try train_args.server_optimizer_args.server_momentum=0.5"
    )


def test_threshold_none_turns_the_check_off() -> None:
    assert loss_rise([(0, 1.0), (1, 9.0)], threshold=None) is None


# -- configuration -------------------------------------------------------------------------------


def test_default_threshold_is_stated_and_configurable(tmp_path: Path) -> None:
    assert make_config(tmp_path).validation_args.loss_rise_warning == DEFAULT_LOSS_RISE_NATS == 0.1
    cfg = make_config(tmp_path, validation_args={"loss_rise_warning": 0.5})
    assert cfg.validation_args.loss_rise_warning == 0.5


def test_a_negative_threshold_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    import unitedllm

    path = tmp_path / "run.yaml"
    path.write_text("validation_args:\n  loss_rise_warning: -1\n")
    with pytest.raises(ConfigError, match=r"validation_args\.loss_rise_warning"):
        unitedllm.load_config(path)
    with pytest.raises(msgspec.ValidationError):
        make_config(tmp_path, validation_args={"loss_rise_warning": 0})


# -- end to end ------------------------------------------------------------------------------------


def test_overshooting_server_momentum_is_reported_in_metrics_progress_and_report(tmp_path: Path) -> None:
    result, printed = run_with_progress(overshoot_config(tmp_path, "FedAvgM"))
    losses = [s.eval_loss for s in result.rounds]
    rising = [r for r in range(1, len(losses)) if losses[r] - losses[r - 1] > 0.1]  # type: ignore[operator]
    assert rising, losses  # the setting overshoots: otherwise this test shows nothing

    warnings = events(result.output_dir, "warning")
    assert [w["round"] for w in warnings] == rising
    first = warnings[0]
    assert first["kind"] == "loss_rise" and first["threshold"] == 0.1
    assert first["previous_round"] == rising[0] - 1
    assert math.isclose(first["loss"], losses[rising[0]])  # type: ignore[arg-type]

    # It names the rule's own knob: FedAvgM's momentum 0.9 (the setting that overshoots here).
    assert "FedAvgM's outer momentum 0.9" in first["message"]
    assert "try train_args.server_optimizer_args.server_momentum=0.5" in first["message"]

    # The progress display: a warning line under the round's line, and a column in the summary table.
    assert f"warning: round {rising[0]}: global eval loss rose" in printed
    assert "loss_rise" in printed

    run = load_run(result.output_dir)
    assert [r for r, _, _ in run.warnings] == rising
    assert f"{len(rising)} warnings" in status_line(run)
    assert f"warning: round {rising[0]}: global eval loss rose" in render_html(run, [])


def test_a_run_that_descends_every_round_has_no_warning(tmp_path: Path) -> None:
    result, printed = run_with_progress(overshoot_config(tmp_path, "FedAvg"))
    losses = [s.eval_loss for s in result.rounds]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # type: ignore[operator]
    assert events(result.output_dir, "warning") == []
    assert "warning: round" not in printed and "loss_rise" not in printed
    assert load_run(result.output_dir).warnings == []


def test_the_warning_can_be_turned_off(tmp_path: Path) -> None:
    result, printed = run_with_progress(overshoot_config(tmp_path, "FedAvgM", loss_rise_warning=None))
    assert events(result.output_dir, "warning") == []
    assert "global eval loss rose" not in printed
