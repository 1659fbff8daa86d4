"""Hugging Face local training: model building, trainable weights, fit/evaluate rounds, saved models."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from services import require_shared_data

from unitedllm.config.types import Config
from unitedllm.errors import ConfigError, TrainingError
from unitedllm.training.base import StepEvent
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache
from unitedllm.training.weights import load_trainable, trainable_state

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "examples" / "models" / "tiny-gpt-neox"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "common_args": {"random_seed": 0},
        "data_args": {
            "dataset": "unitedllm-synthetic",
            "dataset_name": None,
            "synthetic_num_examples": 360,
            "test_dataset_size": 48,
            "max_seq_length": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "model_args": {
            "model_name_or_path": str(TINY_MODEL),
            "load_pretrained": False,
            "train_tokenizer_vocab_size": 512,
            "model_config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
            "peft_type": "lora",
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "lora_target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"],
        },
        "train_args": {
            "client_num_in_total": 2,
            "comm_round": 3,
            "seed": 11,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "linear",
            "local_max_steps": 6,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return msgspec.convert(raw, Config)


def test_lora_trains_only_adapter_tensors_and_every_rank_builds_the_same_base(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    a, b = HFLocalTrainer(cfg, 1), HFLocalTrainer(cfg, 2)  # separate caches: two independent builds
    weights = a.initial_weights()
    assert weights and all(".lora_A." in n or ".lora_B." in n for n in weights)
    assert any("lm_head" in n for n in weights)
    total = sum(p.numel() for p in a.model.parameters())
    assert sum(w.numel() for w in weights.values()) < total / 2
    assert a.base_fingerprint() == b.base_fingerprint()
    for name, w in b.initial_weights().items():
        assert torch.equal(w, weights[name])
    other_seed = make_cfg(tmp_path, common_args={"random_seed": 1})
    assert HFLocalTrainer(other_seed, 1).base_fingerprint() != a.base_fingerprint()


def test_load_trainable_rejects_wrong_names_and_shapes(tmp_path: Path) -> None:
    trainer = HFLocalTrainer(make_cfg(tmp_path), 1)
    weights = trainer.initial_weights()
    name = next(iter(weights))
    bad = dict(weights, **{name: torch.zeros(3, 3)})
    with pytest.raises(TrainingError, match=rf"{name} has shape \(3, 3\), the model expects"):
        load_trainable(trainer.model, bad)
    missing = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(TrainingError, match=rf"missing 1: {name}"):
        trainer.evaluate(missing)


def test_two_rounds_lower_the_loss_and_report_progress(tmp_path: Path) -> None:
    trainer = HFLocalTrainer(make_cfg(tmp_path), 1)
    weights = trainer.initial_weights()
    before = trainer.evaluate(weights)
    events: list[StepEvent] = []
    first = trainer.fit(weights, round_idx=0, max_steps=6, on_step=events.append)
    second = trainer.fit(first.weights, round_idx=1, max_steps=6, on_step=events.append)
    after = trainer.evaluate(second.weights)
    assert after.metrics["eval_loss"] < before.metrics["eval_loss"] - 0.5
    assert after.metrics["perplexity"] < before.metrics["perplexity"]
    assert [(e.round_idx, e.step) for e in events] == [(r, s) for r in (0, 1) for s in range(1, 7)]
    assert all(e.rank == 1 and e.max_steps == 6 for e in events)
    assert second.num_samples == len(trainer.train_dataset)  # FedAvg's n_k: the local dataset size
    assert second.metrics["train_samples"] == 6 * 8
    assert second.metrics["tokens_per_second"] > 0
    assert set(after.per_category) == {r for r in set(trainer.test_dataset["category"])}


def test_a_client_does_worse_on_categories_it_never_saw(tmp_path: Path) -> None:
    cache = ModelCache()
    cfg = make_cfg(tmp_path)
    server, client = HFLocalTrainer(cfg, 0, model_cache=cache), HFLocalTrainer(cfg, 1, model_cache=cache)
    own = set(client.train_dataset["category"])
    trained = client.fit(server.initial_weights(), round_idx=1, max_steps=20).weights
    losses = server.evaluate(trained).per_category
    seen = [v for k, v in losses.items() if k in own]
    unseen = [v for k, v in losses.items() if k not in own]
    assert len(seen) == 3 and len(unseen) == 3
    assert sum(seen) / 3 < sum(unseen) / 3 - 0.3


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    results = []
    for _ in range(2):
        trainer = HFLocalTrainer(make_cfg(tmp_path), 2, model_cache=ModelCache())
        results.append(trainer.fit(trainer.initial_weights(), round_idx=1, max_steps=4).weights)
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    other = HFLocalTrainer(make_cfg(tmp_path, train_args={"seed": 12}), 2)
    moved = other.fit(other.initial_weights(), round_idx=1, max_steps=4).weights
    assert any(not torch.equal(moved[k], results[0][k]) for k in moved)


def test_learning_rate_schedule_continues_across_rounds(tmp_path: Path) -> None:
    trainer = HFLocalTrainer(make_cfg(tmp_path), 1)
    lrs: dict[int, list[float]] = {0: [], 1: []}

    def record(event: StepEvent) -> None:
        assert event.learning_rate is not None
        lrs[event.round_idx].append(event.learning_rate)

    w = trainer.fit(trainer.initial_weights(), round_idx=0, max_steps=6, on_step=record).weights
    trainer.fit(w, round_idx=1, max_steps=6, on_step=record)
    # Linear decay over 6 steps x 3 rounds: one constant decrement, no restart at round 2.
    seq = lrs[0] + lrs[1]
    step = 5e-3 / 18
    assert seq[0] == pytest.approx(5e-3)  # the rate the first step used
    assert lrs[1][0] == pytest.approx(lrs[0][-1] - step)
    assert all(b == pytest.approx(a - step) for a, b in itertools.pairwise(seq))
    state = trainer.state_dict()
    assert state["scheduler"]["last_epoch"] == 12
    assert state["optimizer"]["state"]  # Adam moments are kept for round 3

    # A fresh trainer given the state continues from the same point.
    resumed = HFLocalTrainer(make_cfg(tmp_path), 1)
    resumed.load_state_dict(state)
    got: list[float] = []
    resumed.fit(w, round_idx=2, max_steps=6, on_step=lambda e: got.append(e.learning_rate or 0.0))
    assert got[0] == pytest.approx(seq[-1] - step)


def test_a_client_left_out_of_a_round_trains_at_the_runs_point_in_the_schedule(tmp_path: Path) -> None:
    """The schedule spans the run: a client selected in rounds 0 and 2 only starts round 2 at step 12 of 18."""
    trainer = HFLocalTrainer(make_cfg(tmp_path), 1)
    lrs: dict[int, list[float]] = {0: [], 2: []}

    def record(event: StepEvent) -> None:
        assert event.learning_rate is not None
        lrs[event.round_idx].append(event.learning_rate)

    w = trainer.fit(trainer.initial_weights(), round_idx=0, max_steps=6, on_step=record).weights
    trainer.fit(w, round_idx=2, max_steps=6, on_step=record)
    step = 5e-3 / 18
    assert lrs[0][0] == pytest.approx(5e-3)
    assert lrs[2][0] == pytest.approx(5e-3 - 12 * step)  # not 5e-3 - 6 * step: the run went on without it
    assert lrs[2][-1] == pytest.approx(step)  # and it ends decayed with everyone else
    assert trainer.state_dict()["scheduler"]["last_epoch"] == 18


@pytest.mark.parametrize("state", ["keep", "reset"])
def test_the_local_optimizer_state_is_kept_or_reset_between_rounds_and_the_schedule_goes_on(
    tmp_path: Path, state: str
) -> None:
    """``keep`` carries AdamW's moments into the next round (DiLoCo); ``reset`` starts them at zero."""
    cfg = make_cfg(tmp_path, train_args={"local_optimizer_state": state})
    trainer = HFLocalTrainer(cfg, 1)
    first = trainer.fit(trainer.initial_weights(), round_idx=0, max_steps=4).weights
    second = trainer.fit(first, round_idx=1, max_steps=4).weights
    saved = trainer.state_dict()
    steps = {int(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert steps == ({8} if state == "keep" else {4})  # AdamW's per-tensor step count
    assert saved["scheduler"]["last_epoch"] == 8  # the schedule spans the run either way
    fresh = HFLocalTrainer(cfg, 1)  # a client that never trained: zero moments, at the round's lr
    alone = fresh.fit(first, round_idx=1, max_steps=4).weights
    same = all(torch.equal(second[k], alone[k]) for k in second)
    assert same == (state == "reset")


def test_trainers_share_one_model_but_keep_their_own_optimizer(tmp_path: Path) -> None:
    cache = ModelCache()
    cfg = make_cfg(tmp_path)
    server, one, two = (HFLocalTrainer(cfg, r, model_cache=cache) for r in (0, 1, 2))
    assert one.model is two.model is server.model
    w = server.initial_weights()
    r1 = one.fit(w, round_idx=1, max_steps=3)
    r2 = two.fit(w, round_idx=1, max_steps=3)
    # Client 1's result is its own even though client 2 trained the same model object afterwards.
    solo = HFLocalTrainer(cfg, 1).fit(w, round_idx=1, max_steps=3)
    assert all(torch.equal(r1.weights[k], solo.weights[k]) for k in w)
    assert any(not torch.equal(r1.weights[k], r2.weights[k]) for k in w)
    assert one.state_dict()["optimizer"]["state"] is not two.state_dict()["optimizer"]["state"]
    result = server.evaluate(r1.weights)
    assert result.num_samples == 48 and len(result.per_category) == 6
    with pytest.raises(TrainingError, match="rank 0"):
        server.fit(w, round_idx=1, max_steps=1)


def test_saved_adapter_loads_with_peft_on_the_saved_base(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = HFLocalTrainer(make_cfg(tmp_path), 1)
    trainer.save_base(tmp_path / "node_0" / "init")
    weights = trainer.fit(trainer.initial_weights(), round_idx=1, max_steps=3).weights
    final = tmp_path / "node_0" / "final"
    trainer.save_model(weights, final)

    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "node_0" / "init").resolve())
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    ids = torch.tensor([tok("What is 3 plus 4?")["input_ids"]])
    with trainer.lock:
        load_trainable(trainer.model, weights)
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def test_later_saves_write_the_bytes_of_a_first_save_without_rendering_the_card_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard

    rendered: list[object] = []
    render = ModelCard.from_template.__func__  # type: ignore[attr-defined]

    def counted(cls: type[ModelCard], *args: Any, **kwargs: Any) -> ModelCard:
        rendered.append(args)
        return render(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(ModelCard, "from_template", classmethod(counted))  # counts, changes nothing
    cfg = make_cfg(tmp_path)
    trainer, fresh = HFLocalTrainer(cfg, 1), HFLocalTrainer(cfg, 1)
    weights = trainer.initial_weights()
    trained = trainer.fit(weights, round_idx=0, max_steps=1).weights
    trainer.save_model(weights, tmp_path / "first")
    trainer.save_model(trained, tmp_path / "second")
    trainer.save_model(trained, tmp_path / "third")
    assert len(rendered) == 1  # the template is rendered once per trainer, not at every save
    fresh.save_model(trained, tmp_path / "fresh")
    assert len(rendered) == 2
    card = (tmp_path / "fresh" / "README.md").read_bytes()  # rendered from the template
    assert b"library_name: peft" in card
    for folder in ("first", "second", "third"):
        assert (tmp_path / folder / "README.md").read_bytes() == card, folder
    files = sorted(p.name for p in (tmp_path / "second").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "third").iterdir())
    for name in files:  # the same weights saved twice: the same bytes
        assert (tmp_path / "third" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_full_finetuning_trains_and_saves_every_parameter(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, model_args={"peft_type": "none", "lora_target_modules": None})
    trainer = HFLocalTrainer(cfg, 2)
    weights = trainer.initial_weights()
    assert set(weights) == {n for n, _ in trainer.model.named_parameters()}
    new = trainer.fit(weights, round_idx=1, max_steps=2).weights
    trainer.save_model(new, tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    state = trainable_state(loaded)
    assert all(torch.equal(state[k], new[k]) for k in new)


def test_model_dir_with_only_config_and_tokenizer_builds(tmp_path: Path) -> None:
    # A tokenizer.json + special_tokens_map.json beside config.json: the layout of an offline model dir.
    trained = HFLocalTrainer(make_cfg(tmp_path), 1).tokenizer
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(TINY_MODEL / "config.json", model_dir / "config.json")
    trained.backend_tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    )
    cfg = make_cfg(
        tmp_path, model_args={"model_name_or_path": str(model_dir), "train_tokenizer_vocab_size": None}
    )
    trainer = HFLocalTrainer(cfg, 1)
    assert trainer.tokenizer.eos_token == "<|endoftext|>" and trainer.tokenizer.pad_token is not None
    result = trainer.fit(trainer.initial_weights(), round_idx=1, max_steps=2)
    assert result.metrics["train_loss"] > 0


def test_unknown_config_override_names_the_key(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, model_args={"model_config_overrides": {"hidden_sise": 8}})
    with pytest.raises(ConfigError, match="model_args.model_config_overrides.hidden_sise"):
        HFLocalTrainer(cfg, 1).initial_weights()


def test_bad_client_optimizer_is_a_config_error(tmp_path: Path) -> None:
    trainer = HFLocalTrainer(make_cfg(tmp_path, train_args={"client_optimizer": "adamw_nope"}), 1)
    with pytest.raises(ConfigError, match="adamw_nope"):
        trainer.fit(trainer.initial_weights(), round_idx=1, max_steps=1)


def test_real_dolly_pythia_run_trains_a_few_steps(tmp_path: Path) -> None:
    shared_data = require_shared_data("dolly/databricks-dolly-15k.jsonl", "pythia/pythia-14m/config.json")
    model_dir = tmp_path / "pythia-14m"
    model_dir.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(shared_data / "pythia" / name, model_dir / name)
    shutil.copy(shared_data / "pythia" / "pythia-14m" / "config.json", model_dir / "config.json")
    cfg = make_cfg(
        tmp_path,
        data_args={
            "dataset": "databricks-dolly",
            "dataset_path": [str(shared_data / "dolly" / "databricks-dolly-15k.jsonl")],
            "test_dataset_size": 16,
            "max_seq_length": 128,
            "remove_long_seq": True,
        },
        model_args={
            "model_name_or_path": str(model_dir),
            "train_tokenizer_vocab_size": None,
            "model_config_overrides": {},
            "lora_target_modules": None,
            "lora_r": 8,
        },
        train_args={"per_device_train_batch_size": 4, "learning_rate": 1e-3},
    )
    trainer = HFLocalTrainer(cfg, 1)
    assert len(trainer.tokenizer) == 50277
    assert all(len(ids) <= 128 for ids in trainer.train_dataset["input_ids"][:200])
    first = trainer.fit(trainer.initial_weights(), round_idx=1, max_steps=3)
    assert first.metrics["train_loss"] > 0
    assert first.weights.keys() == trainer.initial_weights().keys()
    assert all(torch.isfinite(w).all() for w in first.weights.values())


def test_fingerprint_does_not_change_when_the_model_is_saved(tmp_path: Path) -> None:
    """Saving rewrites parts of the model config; ranks that saved nothing must still match the aggregator."""
    cache = ModelCache()
    server = HFLocalTrainer(make_cfg(tmp_path), 0, model_cache=cache)
    before = server.base_fingerprint()
    server.save_base(tmp_path / "init")
    server.save_model(server.initial_weights(), tmp_path / "final")
    client = HFLocalTrainer(make_cfg(tmp_path), 1, model_cache=cache)
    assert client.base_fingerprint() == before == HFLocalTrainer(make_cfg(tmp_path), 1).base_fingerprint()


def test_evaluation_loss_is_the_models_own_loss_on_response_tokens(tmp_path: Path) -> None:
    from unitedllm.training.evaluation import response_losses

    trainer = HFLocalTrainer(make_cfg(tmp_path), rank=1)
    test = trainer.test_dataset.select(range(6))
    model = trainer.model
    sums = response_losses(model, test, batch_size=4, pad_token_id=trainer.tokenizer.pad_token_id)
    ours = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    total, count = 0.0, 0
    with torch.no_grad():
        for row in test:  # one example at a time: no padding, Hugging Face's own shifted loss
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
            total, count = total + float(loss) * n, count + n
    assert count == sum(n for _, n in sums.values())
    assert abs(ours - total / count) < 1e-4
