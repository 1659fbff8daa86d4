"""Server optimizers against float64 numpy references of their papers' update rules.

One parametrised suite over every optimizer: several rounds with unequal sample counts
match the reference; state survives a safetensors checkpoint and the resumed run is
byte-identical; results do not depend on update arrival order. Then robustness, update
validation, the exact streaming sum, and the client-side FedProx/SCAFFOLD maths.
"""

from __future__ import annotations

import gc
import math
import weakref
from fractions import Fraction
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from services import require

from unitedllm.config.types import ServerOptimizerArgs
from unitedllm.errors import ConfigError, RoundError, UpdateRejected
from unitedllm.optimizers import ClientUpdate, _native, available, create
from unitedllm.optimizers.exact_sum import ExactSum
from unitedllm.optimizers.mean import apply_step
from unitedllm.optimizers.scaffold import control_extras
from unitedllm.optimizers.validation import validate_update

SHAPES = {"layer.weight": (16, 32), "layer.bias": (64,)}
SAMPLES = [3, 10, 1, 7, 4]  # unequal on purpose
RANKS = [1, 2, 3, 4, 5]
NUM_CLIENTS_TOTAL = 8  # for SCAFFOLD's |S|/N
ROUNDS = 3

Arrays = dict[str, np.ndarray]


def initial_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def round_updates(round_idx: int, *, with_control: bool = False) -> list[ClientUpdate]:
    """Deltas whose magnitudes vary over many orders, so naive float sums depend on order."""
    rng = np.random.default_rng(100 + round_idx)
    updates = []
    for rank, n in zip(RANKS, SAMPLES, strict=True):
        delta = {
            name: torch.from_numpy(
                (rng.normal(size=s) * 10.0 ** rng.integers(-14, 0, size=s)).astype(np.float32)
            )
            for name, s in SHAPES.items()
        }
        extras = {}
        if with_control:
            extras = control_extras(
                {
                    name: torch.from_numpy(rng.normal(size=s).astype(np.float32) * 0.1)
                    for name, s in SHAPES.items()
                }
            )
        updates.append(ClientUpdate(rank=rank, delta=delta, num_samples=n, extras=extras))
    return updates


def typed_updates(round_idx: int, opt_name: str, dtype: torch.dtype) -> list[ClientUpdate]:
    """The round's updates (with SCAFFOLD's control deltas where needed) in ``dtype``."""
    return [
        ClientUpdate(
            rank=u.rank,
            delta={n: t.to(dtype) for n, t in u.delta.items()},
            num_samples=u.num_samples,
            extras={n: t.to(dtype) for n, t in u.extras.items()},
        )
        for u in round_updates(round_idx, with_control=opt_name == "SCAFFOLD")
    ]


# -- float64 numpy references, one per paper -------------------------------------------------------


def _mean(updates: list[ClientUpdate], name: str, key: str = "delta") -> np.ndarray:
    total = sum(u.num_samples for u in updates)
    src = (lambda u: u.delta[name]) if key == "delta" else (lambda u: u.extras[name])
    return sum(u.num_samples * src(u).double().numpy() for u in updates) / total


def _stack(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([u.delta[name].double().numpy() for u in updates])


class Reference:
    """Paper update rules in float64 numpy; the model itself is float32, as in the runs."""

    def __init__(self, kind: str, args: Any):
        self.kind = kind
        self.args = args
        self.state: Arrays = {}

    def step(self, w: Arrays, updates: list[ClientUpdate]) -> Arrays:
        a = self.args
        out: Arrays = {}
        for name in w:
            step = getattr(self, self.kind)(name, updates, a)
            out[name] = (w[name] + step).astype(np.float32).astype(np.float64)
        return out

    def fedavg(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        return _mean(updates, name)  # McMahan et al.: η = 1

    fedprox = fedavg

    def fedavgm(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        # Hsu et al. 2019: v = βv + Δ, w += ηv
        v = self.state.get("v" + name, 0.0) * a.server_momentum + _mean(updates, name)
        self.state["v" + name] = v
        return 1.0 * v

    def diloco(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        # Douillard et al.: Nesterov SGD, lr 0.7, on g = -Δ: v = μv + g, θ -= lr (g + μv)
        g = -_mean(updates, name)
        v = self.state.get("v" + name, 0.0) * a.server_momentum + g
        self.state["v" + name] = v
        return -0.7 * (g + a.server_momentum * v)

    def _adaptive(self, name: str, updates: list[ClientUpdate], a: Any, rule: str) -> np.ndarray:
        # Reddi et al. 2021, Algorithm 2, m_{-1} = 0, v_{-1} = τ², η = 1e-2
        d = _mean(updates, name)
        m = self.state.get("m" + name, 0.0) * a.beta1 + (1 - a.beta1) * d
        v = self.state.get("v" + name, a.tau**2)
        if rule == "adam":
            v = a.beta2 * v + (1 - a.beta2) * d * d
        elif rule == "yogi":
            v = v - (1 - a.beta2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        self.state["m" + name], self.state["v" + name] = m, v
        return 1e-2 * m / (np.sqrt(v) + a.tau)

    def fedadam(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        return self._adaptive(name, updates, a, "adam")

    def fedyogi(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        return self._adaptive(name, updates, a, "yogi")

    def fedadagrad(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        return self._adaptive(name, updates, a, "adagrad")

    def fedmedian(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        return np.median(_stack(updates, name), axis=0)  # Yin et al. 2018

    def trimmedmean(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        k = int(a.trim_ratio * len(updates))
        s = np.sort(_stack(updates, name), axis=0)
        return s[k : len(updates) - k].mean(axis=0)

    def _krum_choice(self, updates: list[ClientUpdate], m: int, f: int) -> list[int]:
        # Blanchard et al. 2017: score = sum of squared distances to n - f - 2 nearest
        flat = [np.concatenate([u.delta[n].double().numpy().ravel() for n in SHAPES]) for u in updates]
        n = len(flat)
        scores = []
        for i in range(n):
            d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
            scores.append(sum(d[: max(1, n - f - 2)]))
        return sorted(range(n), key=lambda i: (scores[i], i))[:m]

    def krum(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        chosen = self._krum_choice(updates, a.multi_krum_m or 1, a.num_byzantine)
        return np.mean([updates[i].delta[name].double().numpy() for i in chosen], axis=0)

    def multikrum(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        m = a.multi_krum_m or len(updates) - a.num_byzantine
        chosen = self._krum_choice(updates, m, a.num_byzantine)
        return np.mean([updates[i].delta[name].double().numpy() for i in chosen], axis=0)

    def scaffold(self, name: str, updates: list[ClientUpdate], a: Any) -> np.ndarray:
        # Karimireddy et al. 2020: x += η_g Δx̄, c += (1/N) Σ Δc_i (each client once: c = mean of all c_i)
        key = "control/" + name
        c = (
            self.state.get(key, 0.0)
            + sum(u.extras[key].double().numpy() for u in updates) / NUM_CLIENTS_TOTAL
        )
        self.state[key] = c
        return _mean(updates, name)


ALL = sorted(available())


def args_for(opt_name: str) -> ServerOptimizerArgs:
    """The flat config section the suite runs each rule with (FedML's form; each rule takes only its own keys)."""
    return ServerOptimizerArgs(trim_ratio=0.2) if opt_name == "TrimmedMean" else ServerOptimizerArgs()


def run_rounds(
    opt_name: str, rounds: range, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
):
    opt = create(opt_name, args_for(opt_name), num_clients=NUM_CLIENTS_TOTAL)
    for r in rounds:
        weights, state = opt.step(
            weights, round_updates(r, with_control=opt_name == "SCAFFOLD"), state, round_idx=r
        )
    return weights, state


def test_every_issue_optimizer_is_registered() -> None:
    wanted = {
        "FedAvg",
        "FedAvgM",
        "FedAdam",
        "FedYogi",
        "FedAdagrad",
        "DiLoCo",
        "FedMedian",
        "TrimmedMean",
        "Krum",
        "MultiKrum",
        "SCAFFOLD",
        "FedProx",
    }
    assert wanted <= set(ALL)


@pytest.mark.parametrize("opt_name", ALL)
def test_matches_float64_reference_over_rounds(opt_name: str) -> None:
    w0 = initial_weights()
    opt = create(opt_name, args_for(opt_name), num_clients=NUM_CLIENTS_TOTAL)
    weights, _ = run_rounds(opt_name, range(ROUNDS), w0, opt.init_state(w0))
    ref = Reference(opt_name.lower(), opt.params)
    expect = {n: t.double().numpy() for n, t in w0.items()}
    for r in range(ROUNDS):
        expect = ref.step(expect, round_updates(r, with_control=opt_name == "SCAFFOLD"))
    for name in SHAPES:
        assert weights[name].dtype == torch.float32
        np.testing.assert_allclose(weights[name].double().numpy(), expect[name], rtol=2e-6, atol=1e-7)
        assert not np.allclose(expect[name], w0[name].double().numpy()), "the reference must move the model"


@pytest.mark.parametrize("opt_name", ALL)
def test_state_survives_checkpoint_and_resume_is_exact(opt_name: str, tmp_path: Path) -> None:
    w0 = initial_weights()
    opt = create(opt_name, args_for(opt_name), num_clients=NUM_CLIENTS_TOTAL)
    straight_w, straight_s = run_rounds(opt_name, range(ROUNDS), w0, opt.init_state(w0))

    w, s = run_rounds(opt_name, range(ROUNDS - 1), w0, opt.init_state(w0))
    save_file(w, str(tmp_path / "model.safetensors"))
    if s:
        save_file(s, str(tmp_path / "optimizer.safetensors"))
    w = load_file(str(tmp_path / "model.safetensors"))
    s = load_file(str(tmp_path / "optimizer.safetensors")) if s else {}
    resumed_w, resumed_s = run_rounds(opt_name, range(ROUNDS - 1, ROUNDS), w, s)

    assert resumed_w.keys() == straight_w.keys() and resumed_s.keys() == straight_s.keys()
    for n in straight_w:
        assert torch.equal(resumed_w[n], straight_w[n]), n
    for n in straight_s:
        assert torch.equal(resumed_s[n], straight_s[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt_name", ALL)
def test_result_bytes_do_not_depend_on_arrival_order(opt_name: str, dtype: torch.dtype) -> None:
    """float64 models expose any order dependence that float32 rounding would hide."""
    w0 = {n: t.to(dtype) for n, t in initial_weights().items()}
    opt = create(opt_name, args_for(opt_name), num_clients=NUM_CLIENTS_TOTAL)
    state = opt.init_state(w0)
    updates = typed_updates(0, opt_name, dtype)
    results = []
    for order in list(permutations(range(len(updates))))[::17]:  # 8 different arrival orders
        acc = opt.begin_round(w0, state, round_idx=0)
        for i in order:
            acc.add(updates[i])
        results.append(acc.finish())
    for w, s in results[1:]:
        assert all(torch.equal(w[n], results[0][0][n]) for n in w)
        assert all(torch.equal(s[n], results[0][1][n]) for n in s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt_name", ALL)
def test_step_leaves_its_inputs_untouched(opt_name: str, dtype: torch.dtype) -> None:
    w0 = {n: t.to(dtype) for n, t in initial_weights().items()}
    opt = create(opt_name, args_for(opt_name), num_clients=NUM_CLIENTS_TOTAL)
    state = opt.step(w0, typed_updates(0, opt_name, dtype), opt.init_state(w0))[1]
    w_copy = {n: t.clone() for n, t in w0.items()}
    s_copy = {n: t.clone() for n, t in state.items()}
    opt.step(w0, typed_updates(1, opt_name, dtype), state)
    assert all(torch.equal(w0[n], w_copy[n]) for n in w0)
    assert all(torch.equal(state[n], s_copy[n]) for n in state)


def test_test_data_makes_naive_summation_order_dependent() -> None:
    """Guards the arrival-order test: with this data a plain float64 running sum changes with order."""
    updates = round_updates(0)
    sums = set()
    for order in list(permutations(range(len(updates))))[::17]:
        total = torch.zeros(SHAPES["layer.weight"], dtype=torch.float64)
        for i in order:
            total += updates[i].num_samples * updates[i].delta["layer.weight"].double()
        sums.add(total.numpy().tobytes())
    assert len(sums) > 1


# -- robustness --------------------------------------------------------------------------------------


def _attacked_round() -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    g = torch.Generator().manual_seed(7)
    w0 = {n: torch.zeros(s) for n, s in SHAPES.items()}
    updates = [
        ClientUpdate(
            rank=r, delta={n: torch.randn(s, generator=g) * 0.01 for n, s in SHAPES.items()}, num_samples=10
        )
        for r in range(1, 5)
    ]
    attacker = {n: torch.randn(s, generator=g) * 1e6 for n, s in SHAPES.items()}
    updates.append(ClientUpdate(rank=5, delta=attacker, num_samples=10))
    return w0, updates


@pytest.mark.parametrize("opt_name", ["FedMedian", "TrimmedMean", "Krum", "MultiKrum"])
def test_robust_rules_stay_within_the_honest_clients_range(opt_name: str) -> None:
    """1 of 5 clients sends 1e6-scaled values: each coordinate stays within the honest min..max."""
    w0, updates = _attacked_round()
    new, _ = create(opt_name, args_for(opt_name)).step(w0, updates, {})
    for n in SHAPES:
        honest = torch.stack([u.delta[n] for u in updates[:4]])
        assert (new[n] >= honest.min(0).values - 1e-7).all() and (new[n] <= honest.max(0).values + 1e-7).all()
        assert new[n].abs().max() < 0.1  # the stated bound: 10x the honest scale, vs 1e6 for the attacker


def test_fedavg_is_not_robust_to_the_same_attack() -> None:
    w0, updates = _attacked_round()
    new, _ = create("FedAvg").step(w0, updates, {})
    assert max(new[n].abs().max().item() for n in SHAPES) > 1e4


def test_trimmed_mean_default_ratio_trims_nobody_with_five_clients() -> None:
    """trim_ratio 0.1 x 5 clients trims ⌊0.5⌋ = 0 per side: the plain mean, not robust (documented)."""
    w0, updates = _attacked_round()
    new, _ = create("TrimmedMean", ServerOptimizerArgs()).step(w0, updates, {})
    assert max(new[n].abs().max().item() for n in SHAPES) > 1e4


# -- validation ----------------------------------------------------------------------------------------


def _good(rank: int = 1, **over: torch.Tensor) -> dict[str, torch.Tensor]:
    d = {n: torch.full(s, 0.5) for n, s in SHAPES.items()}
    d.update(over)
    return d


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"layer.weight": torch.zeros(3, 4)}, "missing tensors 'layer.bias'"),
        (_good(**{"other": torch.zeros(1)}), "unexpected tensors 'other'"),
        (_good(**{"layer.bias": torch.zeros(6)}), "'layer.bias' has shape (6,), the global model has (64,)"),
        (_good(**{"layer.bias": torch.zeros(64, dtype=torch.int64)}), "updates must be floating point"),
        (
            _good(**{"layer.bias": torch.zeros(64, dtype=torch.float64)}),
            "dtype torch.float64, the global model",
        ),
        (
            _good(**{"layer.bias": torch.zeros(64).index_fill(0, torch.tensor([3, 9]), float("nan"))}),
            "2 non-finite values",
        ),
    ],
)
def test_bad_updates_are_refused_with_the_reason(delta: dict[str, torch.Tensor], reason: str) -> None:
    with pytest.raises(UpdateRejected, match="client 3 in round 2 rejected") as info:
        validate_update(initial_weights(), delta, rank=3, round_idx=2)
    assert reason in str(info.value)


def test_nonfinite_bfloat16_update_is_refused() -> None:
    w = {"x": torch.zeros(1000, dtype=torch.bfloat16)}
    bad = torch.zeros(1000, dtype=torch.bfloat16)
    bad[777] = float("inf")
    with pytest.raises(UpdateRejected, match="1 non-finite"):
        validate_update(w, {"x": bad})


@pytest.mark.parametrize("opt_name", ["FedAvg", "FedAdam", "FedMedian"])
def test_a_bad_update_does_not_poison_the_round(opt_name: str, caplog: pytest.LogCaptureFixture) -> None:
    w0 = initial_weights()
    good = round_updates(0)
    bad = ClientUpdate(
        rank=9, delta=_good(**{"layer.bias": torch.full((64,), float("nan"))}), num_samples=1000
    )
    opt = create(opt_name, args_for(opt_name))
    with_bad, _ = opt.step(w0, [*good, bad], opt.init_state(w0))
    without, _ = opt.step(w0, good, opt.init_state(w0))
    assert all(torch.equal(with_bad[n], without[n]) for n in SHAPES)
    assert "update from client 9 rejected" in caplog.text and "non-finite" in caplog.text

    acc = opt.begin_round(w0, opt.init_state(w0))
    acc.add(good[0])
    with pytest.raises(UpdateRejected, match="same rank"):
        acc.add(good[0])
    with pytest.raises(UpdateRejected, match="num_samples"):
        acc.add(ClientUpdate(rank=4, delta=good[1].delta, num_samples=0))


def test_a_round_without_valid_updates_is_an_error() -> None:
    opt = create("FedAvg")
    with pytest.raises(RoundError, match="no valid client update"):
        opt.step(initial_weights(), [ClientUpdate(rank=1, delta={}, num_samples=1)], {})


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown server optimizer 'FedFoo'.*FedAdam"):
        create("FedFoo")


def test_unset_hyperparameters_take_the_papers_defaults() -> None:
    args = ServerOptimizerArgs()
    assert create("fedadam", args).hparam("server_learning_rate") == 1e-2
    assert create("DiLoCo", args).hparam("server_learning_rate") == 0.7
    assert create("DiLoCo", args).hparam("nesterov") is True
    assert create("FedAvgM", args).hparam("nesterov") is False
    assert (
        create("FedAvgM", ServerOptimizerArgs(server_learning_rate=0.5)).hparam("server_learning_rate") == 0.5
    )


# -- low-precision updates and the exact sum ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_updates_are_aggregated_in_wide_precision(dtype: torch.dtype) -> None:
    w0 = {"x": torch.zeros(4096, dtype=dtype)}
    g = torch.Generator().manual_seed(3)
    updates = [
        ClientUpdate(rank=r, delta={"x": torch.randn(4096, generator=g).to(dtype)}, num_samples=r * 3)
        for r in range(1, 9)
    ]
    new, _ = create("FedAvg").step(w0, updates, {})
    exact = sum(u.num_samples * u.delta["x"].double() for u in updates) / sum(u.num_samples for u in updates)
    assert new["x"].dtype == dtype
    assert torch.equal(new["x"], exact.to(dtype))
    # Summing in the update dtype instead loses visibly more.
    low = sum((u.delta["x"] * u.num_samples for u in updates), torch.zeros(4096, dtype=dtype)) / 84
    assert (low.double() - exact).abs().max() > (new["x"].double() - exact).abs().max()


def _extreme_values(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mant = torch.randn(5000, generator=g)
        exps = torch.randint(-120, 120, (5000,), generator=g).float()
        out.append((mant * torch.pow(2.0, exps)).float())
    return out


def test_exact_sum_is_exact_even_for_extreme_magnitudes() -> None:
    xs = _extreme_values(6, 1) + [torch.randn(5000).bfloat16(), torch.randn(5000, dtype=torch.float64)]
    ws = [3, 1, 2**29, 7, 1000, 1, 5, 11]
    acc = ExactSum((5000,))
    acc.add(xs, ws)
    assert len(acc.levels) > 2  # this data needs the deep levels
    got = acc.result()
    assert torch.equal(acc.result(consume=True), got)
    for i in range(0, 5000, 97):
        exact = sum(Fraction(float(x[i].double())) * w for x, w in zip(xs, ws, strict=True))
        assert got[i].item() == float(exact), i  # correctly rounded exact sum


@pytest.mark.parametrize("native", [True, False])
def test_exact_sum_compiled_and_torch_paths_give_identical_bytes(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native:
        _require_kernel()  # else both sides would be the torch path, and the test would prove nothing
    xs = _extreme_values(5, 2)
    reference = ExactSum((5000,))
    monkeypatch.setenv("UNITEDLLM_NO_NATIVE", "1")
    for x, w in zip(xs, [1, 2, 3, 4, 5], strict=True):
        reference.add([x], [w])
    if native:
        monkeypatch.delenv("UNITEDLLM_NO_NATIVE")
    other = ExactSum((5000,))
    other.add(list(reversed(xs)), [5, 4, 3, 2, 1])
    assert torch.equal(reference.result(), other.result())


@pytest.mark.parametrize(
    ("machine", "flags", "level"),
    [
        ("x86_64", "fpu sse2 ssse3 sse4_1 sse4_2 popcnt cx16 lahf_lm", "x86-64-v2"),
        (
            "x86_64",
            "ssse3 sse4_1 sse4_2 popcnt cx16 lahf_lm avx avx2 bmi1 bmi2 f16c fma abm movbe xsave",
            "x86-64-v3",
        ),
        ("x86_64", "avx512f avx512bw avx512cd avx512dq avx512vl", "x86-64"),  # v4 needs the lower levels too
        ("x86_64", "", "x86-64"),
        ("aarch64", "fp asimd", None),
    ],
)
def test_the_kernel_is_built_for_a_named_level_never_for_this_exact_cpu(
    machine: str, flags: str, level: str | None
) -> None:
    assert _native.isa_level(machine, flags.split()) == level
    built = _native.build_flags(level)
    assert not any("native" in f for f in built)
    assert (f"-march={level}" in built) if level else not any(f.startswith("-march") for f in built)


def test_the_kernel_source_is_a_c_file_shipped_with_the_package() -> None:
    from importlib import resources

    text = resources.files("unitedllm.optimizers").joinpath("exact_sum.c").read_text()
    assert "ul_exact_add" in text and "#define BLOCK 512" in text


def test_a_baseline_build_and_the_torch_path_give_the_bytes_of_this_cpus_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library built for the baseline (what any CPU of the architecture may load) sums the same bytes."""
    _require_kernel()
    xs = _wide_updates(9, 3 * _native.CHUNK + 17, seed=5)
    ws = list(range(1, 10))

    def summed() -> bytes:
        acc = ExactSum(xs[0].shape)
        acc.add(xs, ws)
        return acc.result(divide_by=sum(ws)).numpy().tobytes()

    this_cpu = summed()
    baseline = _native._build(None, cache=tmp_path)
    assert baseline is not None and list(tmp_path.glob("exact_sum-baseline-*.so"))
    monkeypatch.setattr(_native, "_loaded", baseline)
    assert summed() == this_cpu
    monkeypatch.setenv("UNITEDLLM_NO_NATIVE", "1")
    assert summed() == this_cpu


def test_streaming_round_does_not_keep_updates() -> None:
    """Mean-based rounds hold an accumulator, not the updates: memory does not grow with clients."""
    w0 = {"x": torch.zeros(10_000)}
    opt = create("FedAdam")
    acc = opt.begin_round(w0, opt.init_state(w0))
    refs = []
    for r in range(1, 33):
        delta = torch.randn(10_000)
        refs.append(weakref.ref(delta))
        acc.add(ClientUpdate(rank=r, delta={"x": delta}, num_samples=r))
        del delta
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert sum(lv.numel() for s in acc._sums.values() for lv in s.levels) <= 2 * 10_000
    acc.finish()


# Large enough for the compiled kernel to split the work over threads (several chunks).
BIG = 5 * _native.CHUNK + 123


def _require_kernel() -> None:
    """The compiled kernel, or a loud skip (a failure under CI): never a torch-only pass."""
    require(None if _native.kernels() is not None else "no C compiler: the compiled kernel is not available")


def _paths(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if native:
        _require_kernel()
    if not native:
        monkeypatch.setenv("UNITEDLLM_NO_NATIVE", "1")


def _wide_updates(n: int, numel: int, seed: int) -> list[torch.Tensor]:
    """Values over many orders of magnitude, so sums need the second and deeper levels somewhere."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.randint(-60, 60, (n, numel), generator=g).float()
    return list((torch.randn(n, numel, generator=g) * torch.pow(2.0, exps)).float())


def test_folding_many_updates_per_pass_gives_the_bytes_of_one_at_a_time() -> None:
    """70 inputs: more than one kernel call's worth, in one add() and one by one, in another order."""
    xs = _wide_updates(70, 3000, 5)
    ws = [1 + 7 * i for i in range(70)]
    folded = ExactSum((3000,))
    assert folded.add(xs, ws) == []
    one_by_one = ExactSum((3000,))
    for i in reversed(range(70)):
        one_by_one.add([xs[i]], [ws[i]])
    assert torch.equal(folded.result(), one_by_one.result())
    exact = [sum(Fraction(float(x[j])) * w for x, w in zip(xs, ws, strict=True)) for j in range(0, 3000, 101)]
    assert folded.result()[::101].tolist() == [float(e) for e in exact]


@pytest.mark.parametrize("native", [True, False])
def test_sum_over_threads_does_not_depend_on_the_thread_count(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paths(native, monkeypatch)
    xs = _wide_updates(3, BIG, 6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            acc = ExactSum((BIG,))
            acc.add(xs, [3, 5, 7])
            results.append(acc.result(divide_by=15))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    reference = ExactSum((BIG,))
    for x, w in zip(xs, [3, 5, 7], strict=True):
        reference.add([x], [w])
    assert torch.equal(reference.result() / 15, results[0])


def test_many_wide_updates_over_threads_give_the_bytes_of_one_at_a_time() -> None:
    """20 inputs in one pass over several chunks on two threads, with deep levels in many blocks."""
    _require_kernel()
    xs = _wide_updates(20, BIG, 12)
    ws = [3 + 5 * i for i in range(20)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        folded = ExactSum((BIG,))
        folded.add(xs, ws)
    finally:
        torch.set_num_threads(before)
    assert len(folded.levels) > 2  # the passes stopped for overflows and went on
    one_by_one = ExactSum((BIG,))
    for i in reversed(range(20)):
        one_by_one.add([xs[i]], [ws[i]])
    assert torch.equal(folded.result(), one_by_one.result())


@pytest.mark.parametrize("lr", [1.0, 0.7])
@pytest.mark.parametrize("native", [True, False])
def test_fedavg_adds_the_mean_in_one_pass_with_the_bytes_of_apply(
    native: bool, lr: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg's fused finish (sum rounded, divided, scaled and added to w at once) changes no byte."""
    _paths(native, monkeypatch)
    g = torch.Generator().manual_seed(13)
    w0 = {"x": torch.randn(BIG, generator=g), "b": torch.randn(7, 3, generator=g).bfloat16()}
    deltas = _wide_updates(5, BIG, 14)
    counts = [1, 2, 4, 8, 16]  # powers of two: the planted values below stay exact when divided
    for i in (5, _native.CHUNK + 7, BIG - 1):  # sums of 1 that only the third level holds
        for d, v, n in zip(deltas, [2.0**120, 2.0**60, 1.0, -(2.0**120), -(2.0**60)], counts, strict=True):
            d[i] = v / n
    updates = [
        ClientUpdate(
            rank=r + 1, delta={"x": d, "b": torch.randn(7, 3, generator=g).bfloat16()}, num_samples=n
        )
        for r, (d, n) in enumerate(zip(deltas, counts, strict=True))
    ]
    opt = create("FedAvg", ServerOptimizerArgs(server_learning_rate=lr))
    got, _ = opt.step(w0, updates, {})
    total = sum(u.num_samples for u in updates)
    expect = {}
    for name, w in w0.items():
        acc = ExactSum(w.shape)
        acc.add([u.delta[name] for u in updates], [u.num_samples for u in updates])
        assert (len(acc.levels) > 2) == (name == "x")  # deep levels: fixed up outside the kernel
        mean = acc.result(divide_by=total)
        expect.update(apply_step({name: w}, {name: mean * lr if lr != 1.0 else mean}))
    assert got.keys() == expect.keys()
    for name in got:
        assert got[name].dtype == w0[name].dtype and torch.equal(got[name], expect[name]), name
    assert got["x"][5] == torch.tensor(w0["x"][5].item() + lr / 31, dtype=torch.float32)


@pytest.mark.parametrize("clients", [20, 70])  # 70: more than one kernel call takes
def test_fedavg_step_in_one_pass_gives_the_bytes_of_streaming(clients: int) -> None:
    """step() never writes the sum to memory; begin_round/add/finish does: the same bytes either way."""
    g = torch.Generator().manual_seed(21)
    w0 = {"x": torch.randn(BIG, generator=g), "b": torch.randn(5, 4, generator=g).bfloat16()}
    deltas = _wide_updates(clients, BIG, 22)
    planted = [2.0**120, 2.0**60, 1.0, -(2.0**120), -(2.0**60)]
    for i, d in enumerate(deltas):  # a sum only the third level holds: that chunk is finished from memory
        d[_native.CHUNK + 3] = planted[i] if i < len(planted) else 0.0
    updates = [
        ClientUpdate(
            rank=r + 1, delta={"x": d, "b": torch.randn(5, 4, generator=g).bfloat16()}, num_samples=1
        )
        for r, d in enumerate(deltas)
    ]
    opt = create("FedAvg", ServerOptimizerArgs(server_learning_rate=0.5))
    one_pass, _ = opt.step(w0, list(reversed(updates)), {})
    acc = opt.begin_round(w0, {})
    for u in updates:
        acc.add(u)
    streamed, _ = acc.finish()
    for name in w0:
        assert torch.equal(one_pass[name], streamed[name]), name
    assert one_pass["x"][_native.CHUNK + 3] == torch.tensor(w0["x"][_native.CHUNK + 3].item() + 0.5 / clients)


def test_fedavg_step_in_one_pass_refuses_updates_with_inf_or_nan(caplog: pytest.LogCaptureFixture) -> None:
    """Found while folding, even two in the same block: they are refused, logged, and leave no trace."""
    g = torch.Generator().manual_seed(23)
    w0 = {"x": torch.randn(BIG, generator=g)}
    updates = [
        ClientUpdate(rank=r, delta={"x": torch.randn(BIG, generator=g)}, num_samples=r) for r in range(1, 7)
    ]
    bad = {2: float("nan"), 5: float("inf")}
    poisoned = [
        ClientUpdate(rank=u.rank, delta={"x": u.delta["x"].clone()}, num_samples=u.num_samples)
        for u in updates
    ]
    for u in poisoned:
        if u.rank in bad:
            u.delta["x"][BIG // 2] = bad[u.rank]  # the same block for both
    opt = create("FedAvg")
    with caplog.at_level("WARNING"):
        got, _ = opt.step(w0, poisoned, {})
    clean, _ = opt.step(w0, [u for u in updates if u.rank not in bad], {})
    assert torch.equal(got["x"], clean["x"])
    assert "client 2 rejected" in caplog.text and "client 5 rejected" in caplog.text
    with pytest.raises(RoundError, match="no valid client update"):
        opt.step(w0, [u for u in poisoned if u.rank in bad], {})


@pytest.mark.parametrize("native", [True, False])
def test_result_divided_is_the_correctly_rounded_sum_divided(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paths(native, monkeypatch)
    xs = _extreme_values(4, 8)
    acc = ExactSum((5000,))
    acc.add(xs, [3, 1, 2**29, 7])
    got = acc.result(divide_by=7919)
    assert torch.equal(got, acc.result() / 7919)
    assert torch.equal(acc.result(consume=True, divide_by=7919), got)


@pytest.mark.parametrize("native", [True, False])
def test_inputs_with_inf_or_nan_are_left_out_without_a_trace(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paths(native, monkeypatch)
    xs = _wide_updates(5, BIG, 7)
    bad_nan, bad_inf = xs[1].clone(), xs[3].bfloat16()
    bad_nan[BIG - 1] = float("nan")  # the last block: the rest was added before it was found
    bad_inf[_native.CHUNK + 5] = float("-inf")
    ws = [2, 3, 5, 7, 11]
    acc = ExactSum((BIG,))
    assert acc.add([xs[0], bad_nan, xs[2], bad_inf, xs[4]], ws, check_finite=True) == [1, 3]
    clean = ExactSum((BIG,))
    clean.add([xs[4], xs[2], xs[0]], [11, 5, 2])
    assert torch.equal(acc.result(), clean.result())
    first_refused = ExactSum((BIG,))  # the first input of a fresh sum is stored, not added
    assert first_refused.add([bad_nan, xs[2], xs[0], xs[4]], [3, 5, 2, 11], check_finite=True) == [0]
    assert torch.equal(first_refused.result(), clean.result())


@pytest.mark.parametrize("native", [True, False])
def test_unchecked_nan_is_an_error_not_an_endless_cascade(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paths(native, monkeypatch)
    x = torch.ones(1000)
    x[3] = float("nan")
    acc = ExactSum((1000,))
    with pytest.raises(ValueError, match="check_finite=True"):
        acc.add([torch.ones(1000), x], [1, 1])


@pytest.mark.parametrize("native", [True, False])
def test_buffers_left_by_earlier_rounds_do_not_leak_into_later_ones(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large accumulators and results reuse earlier rounds' memory: only this round's updates count."""
    _paths(native, monkeypatch)
    w0 = {"x": torch.zeros(BIG)}
    opt = create("FedAvg")
    g = torch.Generator().manual_seed(11)

    def round_of(scale: float) -> dict[str, torch.Tensor]:
        updates = [
            ClientUpdate(rank=r, delta={"x": torch.randn(BIG, generator=g) * scale}, num_samples=r)
            for r in (1, 2, 3)
        ]
        return opt.step(w0, updates, {})[0]

    g.manual_seed(11)
    alone = round_of(1.0)["x"].clone()
    for _ in range(2):
        round_of(1e20)  # big values left behind in the freed buffers
    g.manual_seed(11)
    again = round_of(1.0)
    assert torch.equal(again["x"], alone)


def test_streaming_round_refuses_an_update_with_nan_in_its_last_tensor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found while folding the last tensor: the update is taken back out of the earlier ones too."""
    w0 = {"a": torch.zeros(BIG), "b": torch.zeros(1000)}
    g = torch.Generator().manual_seed(9)
    good = [
        ClientUpdate(
            rank=r, delta={n: torch.randn(t.shape, generator=g) for n, t in w0.items()}, num_samples=r
        )
        for r in (1, 2, 3)
    ]
    poisoned = {"a": torch.randn(BIG, generator=g) * 1e30, "b": torch.randn(1000, generator=g)}
    poisoned["b"][999] = float("nan")
    opt = create("FedAvg")
    acc = opt.begin_round(w0, {})
    acc.add(good[0])
    with pytest.raises(UpdateRejected, match="'b' has 1 non-finite values"):
        acc.add(ClientUpdate(rank=7, delta=poisoned, num_samples=50))
    rejected = acc.add_many([good[2], ClientUpdate(rank=8, delta=poisoned, num_samples=5), good[1]])
    assert [e.rank for e in rejected] == [8]
    assert sorted(acc.accepted) == [1, 2, 3]
    new, _ = acc.finish()
    expected, _ = opt.step(w0, good, {})
    assert all(torch.equal(new[n], expected[n]) for n in w0)
    assert "client 8" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_apply_step_rounds_like_float64_addition_cast_back(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paths(native, monkeypatch)
    g = torch.Generator().manual_seed(10)
    w = {"x": torch.randn(BIG, generator=g), "y": torch.randn(100, generator=g).bfloat16()}
    step = {
        "x": torch.randn(BIG, generator=g, dtype=torch.float64) * 1e-7,
        "y": torch.randn(100, dtype=torch.float64),
    }
    new = apply_step(w, step)
    for n, old in w.items():
        assert new[n].dtype == old.dtype
        assert torch.equal(new[n], (old.double() + step[n]).to(old.dtype))


# -- client side ---------------------------------------------------------------------------------------


def test_scaffold_refuses_updates_without_control_deltas() -> None:
    w0 = initial_weights()
    opt = create("SCAFFOLD", num_clients=NUM_CLIENTS_TOTAL)
    acc = opt.begin_round(w0, opt.init_state(w0))
    with pytest.raises(UpdateRejected, match="extras: missing tensors 'control/layer.bias'"):
        acc.add(round_updates(0)[0])
    assert math.isclose(len(opt.server_control(opt.init_state(w0))), len(SHAPES))
