"""Server-momentum safeguards of FedAvgM and DiLoCo: momentum restart and step clipping.

Off by default (the papers' rules unchanged, byte for byte); on, they stop the outer momentum
from carrying the global model past the optimum. The unit tests check the maths on hand-sized
tensors; the end-to-end ones run the real round loop on clients that all fit the same
least-squares target (see tests/test_instability.py), where momentum 0.9 overshoots.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_federation import events
from test_instability import SharedTarget, overshoot_config

import unitedllm
from unitedllm.errors import ConfigError
from unitedllm.optimizers import create
from unitedllm.optimizers.base import ClientUpdate
from unitedllm.runner import run_async

MOMENTUM_RULES = ("FedAvgM", "DiLoCo")


def _round(opt: Any, w: dict[str, torch.Tensor], state: Any, delta: float) -> tuple[Any, Any, float]:
    update = ClientUpdate(1, {"p": torch.full((4,), delta, dtype=torch.float64)}, 10)
    new, state = opt.step(w, [update], state)
    return new, state, float(new["p"][0] - w["p"][0])


def _moves(rule: str, deltas: list[float], **args: Any) -> list[float]:
    """The global model's move per round for these mean deltas (one client, one coordinate shown)."""
    opt = create(rule, args)
    w = {"p": torch.zeros(4, dtype=torch.float64)}
    state = opt.init_state(w)
    moves = []
    for d in deltas:
        w, state, move = _round(opt, w, state, d)
        moves.append(move)
    return moves


@pytest.mark.parametrize("rule", MOMENTUM_RULES)
def test_safeguards_are_off_by_default_and_change_nothing_then(rule: str) -> None:
    deltas = [1.0, 1.0, -1.0, 0.5]
    assert _moves(rule, deltas) == _moves(rule, deltas, momentum_restart=False, max_step_ratio=None)
    assert create(rule).hparam("momentum_restart") is False
    assert create(rule).hparam("max_step_ratio") is None


def test_diloco_step_builds_up_to_seven_times_the_mean_delta() -> None:
    """With a steady mean delta Δ, Nesterov at η 0.7, μ 0.9 moves 1.33Δ, 1.90Δ, 2.41Δ... toward 7Δ."""
    moves = _moves("DiLoCo", [1.0] * 60)
    assert [round(m, 2) for m in moves[:4]] == [1.33, 1.9, 2.41, 2.87]
    assert math.isclose(moves[-1], 7.0, rel_tol=1e-2)
    assert math.isclose(sum(moves[:6]), 15.43, abs_tol=0.01)  # 6 rounds: 2.6x FedAvg's 6Δ


@pytest.mark.parametrize("rule", MOMENTUM_RULES)
def test_restart_drops_the_momentum_when_the_mean_delta_turns_against_it(rule: str) -> None:
    plain = _moves(rule, [1.0, 1.0, 1.0, -1.0])
    restarted = _moves(rule, [1.0, 1.0, 1.0, -1.0], momentum_restart=True)
    assert restarted[:3] == plain[:3]  # same direction: no restart
    assert plain[3] > 0  # without it, the momentum still carries the model forward
    first = _moves(rule, [1.0])[0]
    assert math.isclose(restarted[3], -first)  # with it, the step is a first round's step backward


@pytest.mark.parametrize("rule", MOMENTUM_RULES)
def test_step_clipping_bounds_the_move_relative_to_the_mean_delta(rule: str) -> None:
    clipped = _moves(rule, [1.0] * 8, max_step_ratio=2.0)
    assert all(m <= 2.0 + 1e-9 for m in clipped)
    assert max(clipped) == pytest.approx(2.0)
    assert max(_moves(rule, [1.0] * 8)) > 2.0


@pytest.mark.parametrize("rule", MOMENTUM_RULES)
def test_restarted_state_survives_a_checkpoint_round_trip(rule: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    opt = create(rule, {"momentum_restart": True})
    w = {"p": torch.zeros(4, dtype=torch.float64)}
    w, state, _ = _round(opt, w, opt.init_state(w), 1.0)
    save_file(state, str(tmp_path / "state.safetensors"))
    resumed = load_file(str(tmp_path / "state.safetensors"))
    assert _round(opt, w, resumed, -1.0)[2] == _round(opt, w, state, -1.0)[2]


def test_safeguard_keys_are_refused_for_a_rule_without_momentum(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "train_args:\n  server_optimizer: FedAvg\n  server_optimizer_args:\n    momentum_restart: true\n"
    )
    with pytest.raises(ConfigError, match="FedAvg has no parameter 'momentum_restart'"):
        unitedllm.load_config(path)
    path.write_text(
        "train_args:\n  server_optimizer: DiLoCo\n  server_optimizer_args:\n    max_step_ratio: 0\n"
    )
    with pytest.raises(ConfigError, match=r"server_optimizer_args\.max_step_ratio"):
        unitedllm.load_config(path)


@pytest.mark.parametrize("rule", MOMENTUM_RULES)
def test_restart_keeps_an_overshooting_run_from_climbing_back(rule: str, tmp_path: Path) -> None:
    def run(args: dict[str, Any], name: str) -> tuple[list[float], int]:
        cfg = overshoot_config(tmp_path / name, rule)
        cfg.train_args.server_optimizer_args = type(cfg.train_args.server_optimizer_args)(**args)
        result = asyncio.run(run_async(cfg, run_id="r", trainer_factory=lambda _c, r: SharedTarget(r)))
        return [s.eval_loss for s in result.rounds], len(events(result.output_dir, "warning"))  # type: ignore[misc]

    plain, plain_warnings = run({}, "plain")
    safe, safe_warnings = run({"momentum_restart": True}, "restart")
    assert plain_warnings > 0  # the rule as published overshoots here
    assert safe_warnings == 0
    assert safe[-1] < min(plain)  # and ends below anything the plain rule reached
