"""``unitedllm export``: the folder loads with plain transformers / peft, merged logits equal the adapter's."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from serving_support import Server, cli, serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from unitedllm.serving.template import render_chat
from unitedllm.training.data import format_prompt

# Merging adds B·A·scale into each base weight: float32 rounding of a different summation order.
LOGIT_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    folders = {"adapter": out / "adapter", "merged": out / "merged", "client": out / "client"}
    for args in (
        ["--out", str(folders["adapter"])],
        ["--merge", "--round", "0", "--out", str(folders["merged"])],
        ["--rank", "2", "--out", str(folders["client"])],
    ):
        done = cli("export", str(trained_run), *args)
        assert done.returncode == 0, done.stdout + done.stderr
    return folders


def _logits(model: torch.nn.Module, tokenizer: object, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)  # type: ignore[operator]
    with torch.no_grad():
        return model(**ids).logits  # type: ignore[no-any-return]


def test_merged_model_loads_with_plain_transformers_and_matches_the_adapter(
    trained_run: Path, exported: dict[str, Path]
) -> None:
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(exported["merged"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    base = AutoModelForCausalLM.from_pretrained(trained_run / "node_0" / "init")
    adapter = PeftModel.from_pretrained(base, trained_run / "node_0" / "round_0_after_agg").eval()
    prompt = render_chat([{"role": "user", "content": "What comes after thursday?"}])
    expected = _logits(adapter, tokenizer, prompt)
    assert torch.allclose(_logits(merged, tokenizer, prompt), expected, atol=LOGIT_ATOL, rtol=0)
    with adapter.disable_adapter():  # the adapter does change the model
        assert not torch.allclose(_logits(adapter, tokenizer, prompt), expected, atol=LOGIT_ATOL)


def test_adapter_export_loads_with_peft(trained_run: Path, exported: dict[str, Path]) -> None:
    from peft import PeftModel

    folder = exported["adapter"]
    config = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, folder).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained_run / "node_0" / "init"),
        trained_run / "node_0" / "final",
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "apple river stone"
    assert torch.equal(_logits(model, tokenizer, text), _logits(reference, tokenizer, text))


def test_the_tokenizer_carries_the_training_prompt_template(exported: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(exported["adapter"])
    record = {"instruction": "Reverse the letters of the word.", "context": "otter", "response": "retto"}
    messages = [{"role": "system", "content": "otter"}, {"role": "user", "content": record["instruction"]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt(record)
    generation = json.loads((exported["adapter"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["do_sample"] is False


def test_the_card_records_provenance(trained_run: Path, exported: dict[str, Path]) -> None:
    merged = json.loads((exported["merged"] / "unitedllm_export.json").read_text())
    assert merged["run_id"] == "serving-run" and merged["round"] == 0 and merged["merged"] is True
    assert merged["clients"] == [1, 2, 3]
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    round_0 = next(e for e in metrics if e["event"] == "round" and e["round"] == 0)
    assert merged["eval_loss"] == pytest.approx(round_0["eval_loss"])
    card = (exported["merged"] / "README.md").read_text()
    assert "serving-run" in card and "| clients that contributed | 1, 2, 3 |" in card
    client = json.loads((exported["client"] / "unitedllm_export.json").read_text())
    assert (
        client["kind"] == "local"
        and client["rank"] == 2
        and client["round"] == 1
        and client["clients"] == [2]
    )
    assert client["source"].endswith("node_2/round_1_before_agg")


def test_the_card_takes_the_config_digest_and_server_optimizer(trained_run: Path, tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    done = cli(
        "export", str(trained_run), "--round", "1", "--config", str(config), "--out", str(tmp_path / "m")
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "m" / "unitedllm_export.json").read_text())
    assert record["server_optimizer"] == "FedAvg" and len(record["config_sha256"]) == 64


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--round", "7"], "--round: 7: no global model saved (saved rounds: 0, 1)"),
        (["--round", "last"], "--round: 'last' is not a round number or 'final'"),
        (["--rank", "9"], "--rank: 9 has no folder"),
    ],
)
def test_bad_choices_are_one_line_and_exit_2(
    trained_run: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    done = cli("export", str(trained_run), *args, "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_not_a_run_folder_and_an_existing_out_are_refused(trained_run: Path, tmp_path: Path) -> None:
    done = cli("export", str(tmp_path), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "is not a run folder" in done.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    done = cli("export", str(trained_run), "--out", str(tmp_path / "taken"))
    assert done.returncode == 2 and "--force" in done.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_an_exported_folder_serves_as_global(
    exported: dict[str, Path], run_server: Server, tmp_path: Path
) -> None:
    """The merged round-0 export answers like the run's own global@0 (same seeded samples)."""
    body = {"prompt": "apple river", "max_tokens": 8, "temperature": 2.0, "seed": 11, "n": 2}
    expected = httpx.post(
        f"{run_server.base_url}/completions", json={**body, "model": "global@0"}, timeout=120
    )
    with serving(str(exported["merged"]), log_dir=tmp_path) as server:
        names = {m["id"] for m in httpx.get(f"{server.base_url}/models").json()["data"]}
        assert {"global", "merged", "base"} <= names
        got = httpx.post(f"{server.base_url}/completions", json={**body, "model": "global"}, timeout=120)
    texts = [c["text"] for c in expected.json()["choices"]]
    assert any(texts)  # something to compare
    assert [c["text"] for c in got.json()["choices"]] == texts
