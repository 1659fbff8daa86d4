"""FedProx and SCAFFOLD in local training: the gradient corrections, the control variates on the wire, resume.

Hugging Face tests use a tiny LoRA GPT-NeoX; the round-loop tests use a plain-PyTorch trainer that
applies the corrections (what a user's own trainer does) and compare with float64 references.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from linear_trainer import CorrectingLinearTrainer, LinearTrainer
from safetensors.torch import load_file, save_file

from unitedllm.checkpoints import node_dir
from unitedllm.config.types import Config
from unitedllm.errors import ConfigError
from unitedllm.optimizers.client_hook import LocalCorrection
from unitedllm.optimizers.fedprox import ProximalCorrection
from unitedllm.optimizers.scaffold import ControlVariates, ScaffoldCorrection
from unitedllm.rounds import sample_clients
from unitedllm.runner import run_async
from unitedllm.training.base import StepEvent
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache

TINY_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-gpt-neox"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_like(weights: Mapping[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(w.shape, generator=gen) * scale for n, w in weights.items()}


# -- the corrections are the gradients of the local objectives' extra terms ------------------------


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's μ/2 Σ‖θ − θ_global‖² (Li et al. 2020), differentiable in ``params``."""
    return sum(((p - global_params[n]).square().sum() for n, p in params.items()), torch.zeros(())) * (mu / 2)


def scaffold_term(
    params: Mapping[str, torch.Tensor],
    c_server: Mapping[str, torch.Tensor],
    c_client: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Σ⟨θ, c − c_i⟩: its gradient turns each g into SCAFFOLD's g − c_i + c (Karimireddy et al. 2020)."""
    return sum(((p * (c_server[n] - c_client[n])).sum() for n, p in params.items()), torch.zeros(()))


def scaffold_control_update(
    c_client: Mapping[str, torch.Tensor],
    c_server: Mapping[str, torch.Tensor],
    global_weights: Mapping[str, torch.Tensor],
    local_weights: Mapping[str, torch.Tensor],
    *,
    num_steps: int,
    learning_rate: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD's option II in the paper's weight form: c_i⁺ = c_i − c + (x − y_i)/(K η_l), Δc_i = c_i⁺ − c_i."""
    scale = 1.0 / (num_steps * learning_rate)
    new_c, delta_c = {}, {}
    for name, x in global_weights.items():
        ci = c_client[name].double()
        updated = ci - c_server[name].double() + (x.double() - local_weights[name].detach().double()) * scale
        new_c[name] = updated.to(c_client[name].dtype)
        delta_c[name] = (updated - ci).to(c_client[name].dtype)
    return new_c, delta_c


def test_corrections_add_the_gradients_of_the_proximal_and_scaffold_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(4, 3, generator=gen, requires_grad=True),
        "b": torch.randn(5, generator=gen, requires_grad=True),
    }
    global_w = random_like(params, 1.0, 1)
    c, ci = random_like(params, 0.1, 2), random_like(params, 0.1, 3)

    def data_loss() -> torch.Tensor:
        return sum((p**3).sum() for p in params.values())  # type: ignore[return-value]

    for correction, term in [
        (ProximalCorrection(global_w, 0.7), lambda: proximal_term(params, global_w, 0.7)),
        (ScaffoldCorrection(c, ci), lambda: scaffold_term(params, c, ci)),
    ]:
        expected = dict(
            zip(params, torch.autograd.grad(data_loss() + term(), list(params.values())), strict=True)
        )
        for p in params.values():
            p.grad = None
        data_loss().backward()
        correction.apply(params, 0.1)
        for name, p in params.items():
            assert p.grad is not None
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-6)
        assert correction.steps == 1 and correction.learning_rate_sum == pytest.approx(0.1)


# -- in the Hugging Face trainer -------------------------------------------------------------------


def tiny_config(tmp_path: Path, **train_args: Any) -> Config:
    return msgspec.convert(
        {
            "data_args": {
                "dataset": "unitedllm-synthetic",
                "dataset_name": None,
                "synthetic_num_examples": 160,
                "test_dataset_size": 16,
                "max_seq_length": 64,
                "cache_dir": str(tmp_path / "cache"),
            },
            "model_args": {
                "model_name_or_path": str(TINY_MODEL),
                "load_pretrained": False,
                "train_tokenizer_vocab_size": 384,
                "peft_type": "lora",
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "lora_target_modules": ["query_key_value", "dense", "lm_head"],
                "model_config_overrides": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                },
            },
            "train_args": {
                "client_num_in_total": 2,
                "client_num_per_round": 2,
                "comm_round": 2,
                "per_device_train_batch_size": 4,
                "learning_rate": 5e-3,
                "warmup_steps": 0,
                "output_dir": str(tmp_path / "{run_id}"),
                **train_args,
            },
        },
        Config,
    )


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCache]:
    """One folder (tokenizer and data caches) and one model cache for the module's HF trainers."""
    return tmp_path_factory.mktemp("hf"), ModelCache()


def hf_fit(
    setup: tuple[Path, ModelCache],
    weights: Mapping[str, torch.Tensor],
    *,
    steps: int,
    correction: LocalCorrection | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    **train_args: Any,
) -> dict[str, torch.Tensor]:
    """One local round of client 1 with a fresh trainer (fresh optimizer state) from ``weights``."""
    folder, cache = setup
    trainer = HFLocalTrainer(tiny_config(folder, **train_args), 1, model_cache=cache)
    return trainer.fit(weights, round_idx=0, max_steps=steps, on_step=on_step, correction=correction).weights


SGD = {"client_optimizer": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0}


def initial(setup: tuple[Path, ModelCache]) -> dict[str, torch.Tensor]:
    folder, cache = setup
    return HFLocalTrainer(tiny_config(folder), 0, model_cache=cache).initial_weights()


def test_hf_scaffold_step_adds_c_minus_ci_once_per_optimizer_step(hf_setup: tuple[Path, ModelCache]) -> None:
    x = initial(hf_setup)
    c, ci = random_like(x, 0.01, 1), random_like(x, 0.01, 2)
    # Two micro-batches per optimizer step: the correction must come once per step, not per micro-batch.
    sgd = {**SGD, "gradient_accumulation_steps": 2}
    plain = hf_fit(hf_setup, x, steps=1, **sgd)
    correction = ScaffoldCorrection(c, ci)
    corrected = hf_fit(hf_setup, x, steps=1, correction=correction, **sgd)
    assert correction.steps == 1 and correction.learning_rate_sum == pytest.approx(0.5)
    for name in x:
        assert not torch.equal(plain[name], x[name]) or name.endswith("lora_A.default.weight")
        torch.testing.assert_close(
            corrected[name] - plain[name], -0.5 * (c[name] - ci[name]), rtol=0, atol=2e-6
        )


def test_hf_fedprox_step_pulls_towards_the_global_weights(hf_setup: tuple[Path, ModelCache]) -> None:
    x = initial(hf_setup)
    offset = random_like(x, 0.05, 3)
    global_w = {n: x[n] + offset[n] for n in x}  # local training starts away from the global model here
    plain = hf_fit(hf_setup, x, steps=1, **SGD)
    corrected = hf_fit(hf_setup, x, steps=1, correction=ProximalCorrection(global_w, 0.4), **SGD)
    for name in x:  # one SGD step: −η μ (x − w_global) = η μ · offset
        torch.testing.assert_close(corrected[name] - plain[name], 0.5 * 0.4 * offset[name], rtol=0, atol=2e-6)


def test_hf_scaffold_control_update_is_option_ii_with_the_steps_and_rates_used(
    hf_setup: tuple[Path, ModelCache],
) -> None:
    x = initial(hf_setup)
    c, ci = random_like(x, 0.01, 4), random_like(x, 0.01, 5)
    rates: list[float] = []
    correction = ScaffoldCorrection(c, ci)
    # A decaying rate: K·η is the sum of the rates used.
    sgd = {**SGD, "lr_scheduler_type": "linear", "learning_rate": 0.3}
    y = hf_fit(
        hf_setup,
        x,
        steps=4,
        correction=correction,
        on_step=lambda e: rates.append(e.learning_rate or 0),
        **sgd,
    )
    assert correction.steps == 4 and len(set(rates)) == 4
    assert correction.learning_rate_sum == pytest.approx(sum(rates), rel=1e-9)
    new_c, delta_c = correction.control_update(x)
    # The paper's weight form, c_i⁺ = c_i − c + (x − y)/(K η), with η the mean rate, is the same under SGD.
    paper_c, paper_delta = scaffold_control_update(
        ci, c, x, y, num_steps=4, learning_rate=correction.learning_rate_sum / 4
    )
    for name in x:
        torch.testing.assert_close(new_c[name], paper_c[name], rtol=0, atol=2e-5)
        torch.testing.assert_close(delta_c[name], paper_delta[name], rtol=0, atol=2e-5)


def test_hf_fedprox_large_mu_stays_closer_to_the_global_weights(hf_setup: tuple[Path, ModelCache]) -> None:
    x = initial(hf_setup)
    free = hf_fit(hf_setup, x, steps=8)
    held = hf_fit(hf_setup, x, steps=8, correction=ProximalCorrection(x, 10.0))

    def distance(w: Mapping[str, torch.Tensor]) -> float:
        return float(sum((w[n].double() - x[n].double()).square().sum() for n in x)) ** 0.5

    assert distance(held) < 0.5 * distance(free), (distance(held), distance(free))


def test_hf_fedprox_with_mu_zero_gives_plain_training_bytes(hf_setup: tuple[Path, ModelCache]) -> None:
    x = initial(hf_setup)
    plain = hf_fit(hf_setup, x, steps=4)
    correction = ProximalCorrection(x, 0.0)
    zero_mu = hf_fit(hf_setup, x, steps=4, correction=correction)
    assert correction.steps == 4  # the hook ran, and changed nothing
    assert all(torch.equal(plain[n], zero_mu[n]) for n in x)


# -- a user's own trainer, over whole runs ---------------------------------------------------------


def linear_config(tmp_path: Path, optimizer: str, **train_args: Any) -> Config:
    return msgspec.convert(
        {
            "train_args": {
                "comm_round": 4,
                "client_num_in_total": 3,
                "client_num_per_round": 2,
                "local_max_steps": 5,
                "server_optimizer": optimizer,
                "output_dir": str(tmp_path / "{run_id}"),
                **train_args,
            },
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )


def run_linear(
    cfg: Config, run_id: str, trainer_cls: type[LinearTrainer] = CorrectingLinearTrainer, **kwargs: Any
) -> Any:
    return asyncio.run(
        run_async(cfg, run_id=run_id, trainer_factory=lambda _c, rank: trainer_cls(rank), **kwargs)
    )


def reference_run(cfg: Config, algorithm: str, mu: float = 0.0) -> dict[str, np.ndarray]:
    """Float64 numpy FedProx/SCAFFOLD (Algorithm 1, option II) over the run's sampled clients."""
    targs = cfg.train_args
    trainers = {r: LinearTrainer(r) for r in range(1, targs.client_num_in_total + 1)}
    data = {r: (t.x.double().numpy(), t.y.double().numpy(), t.n, t.lr) for r, t in trainers.items()}
    x = {k: v.double().numpy() for k, v in LinearTrainer(0).initial_weights().items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    c_i = {r: {k: np.zeros_like(v) for k, v in x.items()} for r in trainers}

    def grad(r: int, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        xs, ys, n, _ = data[r]
        err = xs @ w["linear.weight"] + w["linear.bias"] - ys
        return {"linear.weight": 2.0 / n * xs.T @ err, "linear.bias": np.array([2.0 / n * err.sum()])}

    for round_idx in range(targs.comm_round):
        selected = sample_clients(
            round_idx,
            total=targs.client_num_in_total,
            per_round=targs.client_num_per_round,
            seed=cfg.common_args.random_seed,
        )
        deltas, control_deltas, counts = {}, {}, {}
        for r in selected:
            lr = data[r][3]
            y = {k: v.copy() for k, v in x.items()}
            for _ in range(targs.local_max_steps):
                g = grad(r, y)
                correction = {
                    k: mu * (v - x[k]) if algorithm == "FedProx" else c[k] - c_i[r][k] for k, v in y.items()
                }
                y = {k: v - lr * (g[k] + correction[k]) for k, v in y.items()}
            new_ci = {k: c_i[r][k] - c[k] + (x[k] - y[k]) / (targs.local_max_steps * lr) for k in x}
            deltas[r] = {k: y[k] - x[k] for k in x}
            control_deltas[r] = {k: new_ci[k] - c_i[r][k] for k in x}
            if algorithm == "SCAFFOLD":
                c_i[r] = new_ci
            counts[r] = data[r][2]
        total = sum(counts.values())
        for k, xk in x.items():
            x[k] = xk + sum(counts[r] * deltas[r][k] for r in selected) / total
            if algorithm == "SCAFFOLD":  # c += (1/N) Σ Δc_i: every client once, whatever its samples
                c[k] = c[k] + sum(control_deltas[r][k] for r in selected) / targs.client_num_in_total
    return x


@pytest.mark.parametrize(("algorithm", "mu"), [("SCAFFOLD", None), ("FedProx", 0.5)])
def test_run_matches_the_float64_reference_of_the_algorithm(
    tmp_path: Path, algorithm: str, mu: float | None
) -> None:
    cfg = linear_config(tmp_path, algorithm, server_optimizer_args={"proximal_mu": mu})
    result = run_linear(cfg, "ref")
    expected = reference_run(cfg, algorithm, mu or 0.0)
    plain = run_linear(linear_config(tmp_path, "FedAvg"), "plain")
    for name, value in result.weights.items():
        np.testing.assert_allclose(value.double().numpy(), expected[name], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(value, plain.weights[name], atol=1e-3), "the algorithm changed nothing"


def test_scaffold_control_variates_round_trip_between_clients_and_server(tmp_path: Path) -> None:
    cfg = linear_config(tmp_path, "SCAFFOLD", client_num_per_round=3, comm_round=3)
    result = run_linear(cfg, "trip")
    _, server_state = _server_state(result.output_dir)
    counts = {r: LinearTrainer(r).n for r in (1, 2, 3)}
    assert len(set(counts.values())) > 1  # unequal clients: a sample-weighted mean would differ
    mine = {r: ControlVariates(node_dir(result.output_dir, r) / "scaffold_control").before(3) for r in counts}
    # Everyone took part in every round, so c = (1/N) Σ_rounds Σ Δc_i is the plain mean of the c_i
    # (Karimireddy et al.: each client counts once, whatever its sample count).
    for name in result.weights:
        expected = sum(mine[r][name].double() for r in counts) / len(counts)  # type: ignore[index]
        torch.testing.assert_close(server_state["control/" + name].double(), expected, rtol=0, atol=1e-6)
        assert expected.abs().max() > 1e-3


def _server_state(output_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from unitedllm.checkpoints import read_server_state

    return read_server_state(node_dir(output_dir, 0) / "final")


class Crash(Exception):
    """Stands in for the aggregator dying between rounds."""


def test_scaffold_resumes_exactly_even_when_a_trained_round_is_asked_again(tmp_path: Path) -> None:
    cfg = linear_config(tmp_path, "SCAFFOLD", client_num_per_round=3)
    uninterrupted = run_linear(cfg, "whole")

    def crash_after_round_1(summary: Any) -> None:
        if summary.round_idx == 1:
            raise Crash

    with pytest.raises(Crash):
        run_linear(cfg, "crashed", on_round=crash_after_round_1)
    # As if the clients had trained round 2 before the aggregator died: a c_i after round 2 exists, and the
    # retried round 2 must start from the c_i after round 1, not from that one.
    for rank in (1, 2, 3):
        folder = node_dir(tmp_path / "crashed", rank) / "scaffold_control"
        stale = load_file(str(folder / "after_round_1.safetensors"))
        save_file({n: t + 1.0 for n, t in stale.items()}, str(folder / "after_round_2.safetensors"))
    resumed = run_linear(cfg, "crashed", resume=True)  # new clients: c_i comes from their disk
    assert [r.round_idx for r in resumed.rounds] == [2, 3]
    for name, value in uninterrupted.weights.items():
        assert torch.equal(resumed.weights[name], value), name


def test_control_variate_store_gives_the_one_before_a_round_and_keeps_two(tmp_path: Path) -> None:
    store = ControlVariates(tmp_path / "c")
    assert store.before(0) is None
    for r in (0, 2, 5):
        store.save(r, {"w": torch.full((2,), float(r))})
    assert store.before(3) is not None and store.before(3)["w"].tolist() == [2.0, 2.0]  # type: ignore[index]
    assert store.before(6)["w"].tolist() == [5.0, 5.0]  # type: ignore[index]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "after_round_2.safetensors",
        "after_round_5.safetensors",
    ]


# -- trainers that do not apply a client algorithm -------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "mu", "named"),
    [("SCAFFOLD", None, "SCAFFOLD"), ("FedProx", 0.5, "FedProx (proximal_mu 0.5)")],
)
def test_a_trainer_without_the_algorithm_is_refused_naming_it(
    tmp_path: Path, optimizer: str, mu: float | None, named: str
) -> None:
    cfg = linear_config(tmp_path, optimizer, server_optimizer_args={"proximal_mu": mu})
    with pytest.raises(ConfigError) as caught:
        run_linear(cfg, "refused", trainer_cls=LinearTrainer)
    message = str(caught.value)
    assert f"train_args.server_optimizer: {named}" in message and "LinearTrainer" in message, message


def test_fedprox_with_mu_zero_runs_any_trainer_as_fedavg(tmp_path: Path) -> None:
    fedprox = run_linear(
        linear_config(tmp_path, "FedProx", server_optimizer_args={"proximal_mu": 0.0}),
        "p",
        trainer_cls=LinearTrainer,
    )
    fedavg = run_linear(linear_config(tmp_path, "FedAvg"), "a", trainer_cls=LinearTrainer)
    assert all(torch.equal(fedprox.weights[n], fedavg.weights[n]) for n in fedavg.weights)


# -- over the real MQTT_S3 backend -----------------------------------------------------------------


@pytest.mark.services
@pytest.mark.timeout(300)
def test_scaffold_over_mqtt_s3_gives_the_local_bytes(
    tmp_path: Path, mqtt_settings: Any, s3_settings: Any, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import service_env

    for key, value in service_env(mqtt_settings, s3_settings).items():
        monkeypatch.setenv(key, value)
    local = run_linear(linear_config(tmp_path / "local", "SCAFFOLD", comm_round=3), "local")
    cfg = linear_config(tmp_path / "mqtt", "SCAFFOLD", comm_round=3)
    cfg = msgspec.structs.replace(
        cfg, comm_args=msgspec.structs.replace(cfg.comm_args, backend="MQTT_S3", run_secret="scaffold-test")
    )
    remote = run_linear(cfg, run_id)
    for name, value in local.weights.items():
        assert torch.equal(remote.weights[name], value), name
