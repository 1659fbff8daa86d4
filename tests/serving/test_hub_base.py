"""A run on a pretrained base named by its hub id: ``export`` records the id, ``serve`` loads the base by it.

The hub is a local Hugging Face cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) holding a tiny GPT-NeoX
as ``acme/tiny-neox``: ``from_pretrained`` resolves the id through the same code as for a downloaded
model. Before, both pointed at ``node_0/init``, which holds only the initial adapter for such a run:
``serve`` refused the run ("holds no model yet") and the exported adapter did not load anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from serving_support import child_env, cli, quickstart_args, serving

from unitedllm.training.synthetic import generate_records
from unitedllm.training.tokenizer import EOS_TOKEN, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HUB_ID = "acme/tiny-neox"
REVISION = "0123456789abcdef0123456789abcdef01234567"
TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "models" / "tiny-gpt-neox" / "config.json"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A hub cache with ``acme/tiny-neox`` (pretrained weights and its tokenizer), offline."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--acme--tiny-neox"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION, encoding="utf-8")
    # The pretrained tokenizer knows the quickstart's kind of text (synthetic Dolly-format records).
    texts = [" ".join(record.values()) for record in generate_records(600)]
    tokenizer = train_tokenizer(texts, 1024, cache / "scratch")
    tokenizer.save_pretrained(str(snapshot))
    settings = {
        k: v for k, v in json.loads(TINY_CONFIG.read_text(encoding="utf-8")).items() if k != "architectures"
    }
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = GPTNeoXConfig(
        **{**settings, "vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos}
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(str(snapshot))
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub_run(hub_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of the quickstart on ``acme/tiny-neox`` with its own tokenizer (LoRA, pretrained weights)."""
    out = tmp_path_factory.mktemp("hub-run") / "run"
    extra = (
        "--set", f"model_args.model_name_or_path={HUB_ID}",
        "--set", "model_args.load_pretrained=true",
        "--set", "model_args.train_tokenizer_vocab_size=null",
        "--set", "train_args.local_max_steps=2",
    )  # fmt: skip
    done = cli(*quickstart_args(out, rounds=1, run_id="hub-run", extra=extra), env=hub_env)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = json.loads((out / "node_0" / "final" / "adapter_config.json").read_text(encoding="utf-8"))
    assert recorded["base_model_name_or_path"] == HUB_ID
    return out


def test_the_export_of_a_hub_based_run_records_the_hub_id_and_loads(
    hub_env: dict[str, str], hub_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"
    done = cli("export", str(hub_run), "--out", str(out), env=hub_env)
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == HUB_ID  # loads on any machine that can reach the hub
    assert f"| base model | {HUB_ID} |" in (out / "README.md").read_text(encoding="utf-8")
    code = (
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(model.peft_config['default'].base_model_name_or_path)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**child_env(), **hub_env},
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == HUB_ID


def test_a_hub_based_run_serves_its_global_model(
    hub_env: dict[str, str], hub_run: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    with serving(str(hub_run), log_dir=tmp_path, env=hub_env) as server:
        names = {m["id"] for m in httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]}
        assert {"global", "base"} <= names
        client = OpenAI(base_url=server.base_url, api_key="unused")
        answer = client.completions.create(model="global", prompt="apple river", max_tokens=4, temperature=0)
    assert answer.model.startswith("global") and answer.usage is not None
    assert answer.usage.prompt_tokens > 0
