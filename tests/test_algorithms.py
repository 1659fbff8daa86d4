"""Federated algorithms as registered units: names, own parameters, schema choice, and every rule with its hook.

One suite over every registered algorithm (its server rule with its client hook, or plain local
training): whole runs over the in-process backend with a plain-PyTorch trainer that applies
corrections, so what a hook sends is what its rule needs, and the other way round.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from linear_trainer import CorrectingLinearTrainer, LinearTrainer

from unitedllm.config.schema import config_schema
from unitedllm.config.types import Config, ServerOptimizerArgs
from unitedllm.errors import ConfigError
from unitedllm.optimizers import Algorithm, RuleParams, algorithm, available, create, register_algorithm
from unitedllm.optimizers.algorithms import _REGISTRY
from unitedllm.optimizers.client_hook import ClientHook, LocalCorrection
from unitedllm.optimizers.fedavg import FedAvg
from unitedllm.optimizers.fedprox import ProximalHook
from unitedllm.optimizers.scaffold import ScaffoldHook
from unitedllm.runner import run_async

ROOT = Path(__file__).resolve().parents[1]
ALL = available()


def run_config(tmp_path: Path, name: str, **args: Any) -> Config:
    return msgspec.convert(
        {
            "train_args": {
                "comm_round": 3,
                "client_num_in_total": 4,
                "client_num_per_round": 3,
                "local_max_steps": 3,
                "server_optimizer": name,
                "server_optimizer_args": args,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )


def run(cfg: Config, run_id: str) -> dict[str, torch.Tensor]:
    result = asyncio.run(
        run_async(cfg, run_id=run_id, trainer_factory=lambda _c, rank: CorrectingLinearTrainer(rank))
    )
    return dict(result.weights)


# -- the registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_each_algorithm_has_its_own_parameters_with_defaults(name: str) -> None:
    alg = algorithm(name)
    params = alg.parameters()  # every parameter has its paper's default
    assert isinstance(params, alg.params) and isinstance(params, RuleParams)
    assert "server_learning_rate" in alg.params.__struct_fields__
    assert create(name).params == params


def test_a_parameter_of_another_rule_is_refused_naming_the_rules_own() -> None:
    with pytest.raises(ConfigError) as caught:
        create("Krum", ServerOptimizerArgs(beta1=0.5))
    assert str(caught.value).endswith(
        "train_args.server_optimizer_args.beta1: Krum has no parameter 'beta1'; "
        "its parameters are server_learning_rate, num_byzantine, multi_krum_m"
    )


def test_flat_fedml_keys_load_into_the_rules_own_parameters() -> None:
    opt = create("fedadam", ServerOptimizerArgs(server_learning_rate=0.1, beta2=0.9))
    assert (opt.params.server_learning_rate, opt.params.beta1, opt.params.beta2) == (0.1, 0.9, 0.9)  # type: ignore[attr-defined]


def test_a_name_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Algorithm("fedavg", RuleParams, FedAvg))


def test_checking_a_config_and_its_optimizer_does_not_import_torch(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train_args:\n  server_optimizer: fedyogi\n  server_optimizer_args:\n    beta2: 0.9\n")
    code = (
        "import sys, unitedllm.config as c, unitedllm.optimizers as o\n"
        f"c.load_config({str(config)!r}); o.algorithm('Krum').parameters({{'num_byzantine': 2}})\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_validate_catches_a_fedadam_parameter_given_to_krum(tmp_path: Path) -> None:
    config = tmp_path / "fedml_config.yaml"
    config.write_text("train_args:\n  server_optimizer: Krum\n  server_optimizer_args:\n    beta1: 0.9\n")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "unitedllm-build"), "validate", str(config)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "train_args.server_optimizer_args.beta1: Krum has no parameter 'beta1'" in proc.stderr + proc.stdout
    )


def _schema_errors(data: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(config_schema())
    return [e.message for e in validator.iter_errors(data)]


def test_the_schema_shows_each_rules_own_parameters_chosen_by_its_name() -> None:
    args = {"beta1": 0.9}
    assert (
        _schema_errors({"train_args": {"server_optimizer": "FedAdam", "server_optimizer_args": args}}) == []
    )
    assert (
        _schema_errors({"train_args": {"federated_optimizer": "fedadam", "server_optimizer_args": args}})
        == []
    )
    for train_args in (
        {"server_optimizer": "Krum"},
        {"server_optimizer": None, "federated_optimizer": "krum"},
        {},  # FedML's default, FedAvg
    ):
        errors = _schema_errors({"train_args": {**train_args, "server_optimizer_args": args}})
        assert errors == ["Additional properties are not allowed ('beta1' was unexpected)"], train_args


def test_the_seed_fedml_config_still_loads_unchanged(tmp_path: Path) -> None:
    from unitedllm.config import load_config

    seed = Path("/work/shared/seed/fedml_config.yaml")
    if not seed.exists():
        pytest.skip("no FedML seed config on this machine")
    cfg = load_config(seed)
    assert (
        create(cfg.server_optimizer_name, cfg.train_args.server_optimizer_args).params
        == algorithm("FedAvg").parameters()
    )


# -- every server rule with its client hook, over whole runs ---------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_every_rule_with_its_hook_runs_and_gives_the_same_bytes_again(tmp_path: Path, name: str) -> None:
    args = {"trim_ratio": 0.2} if name == "TrimmedMean" else {}
    first = run(run_config(tmp_path, name, **args), "a")
    again = run(run_config(tmp_path, name, **args), "b")
    start = LinearTrainer(0).initial_weights()
    for n, w in first.items():
        assert torch.isfinite(w).all() and not torch.equal(w, start[n]), n
        assert torch.equal(w, again[n]), f"{name}: {n} differs between two identical runs"


@pytest.mark.parametrize("name", [n for n in ALL if algorithm(n).client_hook is not None])
def test_a_hook_changes_local_training_against_the_same_rule_without_it(tmp_path: Path, name: str) -> None:
    hooked = run(run_config(tmp_path, name, **({"proximal_mu": 0.5} if name == "FedProx" else {})), "h")
    plain = run(run_config(tmp_path, "FedAvg"), "p")
    assert any(not torch.allclose(hooked[n], plain[n], atol=1e-4) for n in plain)


# -- a new algorithm is one file plus its registration ---------------------------------------------


class DampedParams(RuleParams):
    """A toy rule's parameters: a FedAvg step and a damping of each local step's gradient."""

    server_learning_rate: float = 1.0
    sample_weighted: bool = True
    damping: float = 0.5


class DampedCorrection(LocalCorrection):
    def __init__(self, damping: float) -> None:
        super().__init__()
        self.damping = damping

    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        assert param.grad is not None
        return param.grad * -self.damping


class DampedHook(ClientHook):
    params: DampedParams

    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection:
        return DampedCorrection(self.params.damping)


class Damped(FedAvg):
    name = "FedDamped"


@pytest.fixture
def damped() -> Iterator[Algorithm]:
    alg = register_algorithm(Algorithm("FedDamped", DampedParams, Damped, DampedHook))
    yield alg
    del _REGISTRY["feddamped"]


def test_a_registered_algorithm_runs_with_no_other_change(tmp_path: Path, damped: Algorithm) -> None:
    damped_run = run(run_config(tmp_path, "FedDamped"), "d")  # its parameters at their defaults
    # Halving every gradient is FedAvg with half the local learning rate.
    plain = asyncio.run(
        run_async(
            run_config(tmp_path, "FedAvg"),
            run_id="p",
            trainer_factory=lambda _c, rank: CorrectingLinearTrainer(rank, lr=0.025),
        )
    ).weights
    for n, w in plain.items():
        torch.testing.assert_close(damped_run[n], w, rtol=1e-6, atol=1e-6)
    assert json.dumps(sorted(available())).count("FedDamped") == 1


# -- every server rule with every client hook -------------------------------------------------------

HOOKS: dict[str, type[ClientHook] | None] = {
    "plain": None,
    "proximal": ProximalHook,
    "scaffold": ScaffoldHook,
}
TINY = {"w": torch.zeros(3), "b": torch.zeros(1)}


def _groups(rule: Any) -> tuple[set[str], set[str]]:
    """What a rule sends with each round start, and the extras groups it needs back in each update."""
    sends = set(rule.round_start_extras(rule.init_state(TINY)))
    needs = {key.split("/", 1)[0] for key in rule.required_extras(TINY)}
    return sends, needs


def _pairs(compatible: bool) -> list[tuple[str, str]]:
    out = []
    for name in ALL:
        rule = create(name)
        sends, needs = _groups(rule)
        for hook_name, hook in HOOKS.items():
            reads = set(hook.reads_extras) if hook else set()
            gives = set(hook.sends_extras) if hook else set()
            if (sends == reads and needs == gives) == compatible:
                out.append((name, hook_name))
    return out


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[str]:
    """A rule and a hook registered as one algorithm; the hook's parameters added to the rule's."""
    rule_name, hook_name = request.param
    alg = algorithm(rule_name)
    params = alg.params
    if hook_name == "proximal":
        params = msgspec.defstruct(
            f"{alg.params.__name__}WithMu",
            [("proximal_mu", float, 0.05)],
            bases=(alg.params,),
            kw_only=True,
            forbid_unknown_fields=True,
        )
    name = f"{rule_name}+{hook_name}"
    register_algorithm(Algorithm(name, params, alg.rule_class(), HOOKS[hook_name]))
    yield name
    del _REGISTRY[name.lower()]


@pytest.mark.parametrize("pair", _pairs(compatible=True), indirect=True, ids="+".join)
def test_every_rule_runs_with_every_hook_it_can_pair_with(tmp_path: Path, pair: str) -> None:
    args = {"trim_ratio": 0.0} if pair.startswith("TrimmedMean") else {}
    first, again = (run(run_config(tmp_path, pair, **args), rid) for rid in ("a", "b"))
    for n, w in first.items():
        assert torch.isfinite(w).all() and torch.equal(w, again[n]), (pair, n)


@pytest.mark.parametrize("pair", _pairs(compatible=False), indirect=True, ids="+".join)
def test_a_rule_and_a_hook_that_cannot_pair_are_refused_naming_the_extras(tmp_path: Path, pair: str) -> None:
    from unitedllm.errors import ProtocolError, UpdateRejected
    from unitedllm.optimizers import ClientUpdate
    from unitedllm.optimizers.client_hook import ClientAlgorithm

    cfg = run_config(tmp_path, pair)
    rule = create(pair)
    state = rule.init_state(TINY)
    client = ClientAlgorithm(cfg, tmp_path / "state")
    with pytest.raises((ProtocolError, UpdateRejected), match="control"):
        correction = client.begin_round(0, TINY, rule.round_start_extras(state))
        params = {n: t.clone().requires_grad_(True) for n, t in TINY.items()}
        if correction is not None:
            for p in params.values():
                p.grad = torch.ones_like(p)
            correction.apply(params, 0.1)
        sent = client.finish_round(0, correction, TINY)
        extras = {f"{group}/{n}": t for group, tensors in sent.items() for n, t in tensors.items()}
        delta = {n: torch.full_like(t, 0.01) for n, t in TINY.items()}
        rule.begin_round(TINY, state).add(ClientUpdate(rank=1, delta=delta, num_samples=4, extras=extras))
