"""The offline quickstart, end to end: it learns, federation beats isolation, the result loads with peft."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unitedllm
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> unitedllm.RunResult:
    out = tmp_path_factory.mktemp("quickstart")
    assert Path.cwd() == ROOT, "the example names its model folder relative to the project root"
    cfg = unitedllm.load_config(
        QUICKSTART,
        overrides={"train_args.output_dir": str(out / "{run_id}"), "data_args.cache_dir": str(out / "cache")},
        run_id="qs",
    )
    return unitedllm.run(cfg, run_id="qs")


def global_evals(result: unitedllm.RunResult) -> list[dict[str, object]]:
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "eval" and e["rank"] == 0]


def test_held_out_loss_falls_clearly_over_the_rounds(quickstart_run: unitedllm.RunResult) -> None:
    losses = [float(e["loss"]) for e in global_evals(quickstart_run)]  # type: ignore[arg-type]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b <= a + 0.05 for a, b in itertools.pairwise(losses)), losses


def test_global_model_beats_isolated_clients_on_categories_they_never_saw(
    quickstart_run: unitedllm.RunResult,
) -> None:
    cfg = unitedllm.load_config(
        QUICKSTART,
        overrides={"data_args.cache_dir": str(quickstart_run.output_dir.parent / "cache")},
        run_id="isolated",
    )
    cache = ModelCache()
    server = HFLocalTrainer(cfg, 0, model_cache=cache)
    global_losses = server.evaluate(quickstart_run.weights).per_category
    steps = cfg.train_args.local_max_steps * cfg.train_args.comm_round
    checked = 0
    for rank in range(1, cfg.train_args.client_num_in_total + 1):
        client = HFLocalTrainer(cfg, rank, model_cache=cache)
        seen = set(client.train_dataset["category"])
        weights = server.initial_weights()
        for round_idx in range(cfg.train_args.comm_round):  # the same compute, without the others
            weights = client.fit(
                weights, round_idx=round_idx, max_steps=cfg.train_args.local_max_steps
            ).weights
        isolated = server.evaluate(weights).per_category
        for category, loss in isolated.items():
            if category not in seen:
                assert global_losses[category] < loss, (rank, category, global_losses[category], loss)
                checked += 1
    assert checked == 12 and steps > 0  # 3 clients x the 4 categories each never saw


def test_final_adapter_loads_with_peft_onto_the_saved_base(quickstart_run: unitedllm.RunResult) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = quickstart_run.final_dir
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert (
        Path(adapter["base_model_name_or_path"]) == (quickstart_run.output_dir / "node_0" / "init").resolve()
    )
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(final)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == base.config.vocab_size and torch.isfinite(logits).all()


def test_every_rank_records_where_its_rounds_went(quickstart_run: unitedllm.RunResult) -> None:
    from unitedllm.phases import AGGREGATOR_PHASES, CLIENT_PHASES

    lines = (quickstart_run.output_dir / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    walls = {e["round"]: e["seconds"] for e in events if e["event"] == "round"}
    assert sorted(walls) == [0, 1, 2, 3]
    for e in events:
        if e["event"] == "round":
            assert set(e["phases"]) == set(AGGREGATOR_PHASES)
        elif e["event"] == "train":
            assert set(e["phases"]) == set(CLIENT_PHASES)
        else:
            continue
        assert min(e["phases"].values()) >= 0 and sum(e["phases"].values()) <= walls[e["round"]], e
    trained = sorted((e["round"], e["rank"]) for e in events if e["event"] == "train")
    assert trained == [(r, c) for r in range(4) for c in (1, 2, 3)]


def test_cli_run_prints_progress_and_writes_fedml_layout(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitedllm",
            "run",
            str(QUICKSTART),
            "--run-id",
            "cli",
            "--quiet",
            "--set",
            f"train_args.output_dir={tmp_path}/{{run_id}}",
            "--set",
            "train_args.comm_round=2",
            "--set",
            "train_args.local_max_steps=5",
            "--set",
            f"data_args.cache_dir={tmp_path}/cache",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rounds are numbered as in metrics.jsonl and round_<r>_after_agg, with the count beside them
    assert "round 1 (2/2)" in proc.stderr and "final model:" in proc.stderr
    if not torch.cuda.is_available():  # DeepSpeed's "no GPU found" notice is noise on a CPU machine
        assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout
    node = tmp_path / "cli" / "node_0"
    assert {"init", "final", "round_0_after_agg", "round_1_after_agg"} <= {p.name for p in node.iterdir()}
    events = [
        json.loads(line)["event"] for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    ]
    assert events.count("round") == 2 and "run_end" in events
