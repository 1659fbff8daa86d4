"""``unitedllm serve CONFIG --follow --run-id``: follow an MQTT_S3 run over the real broker and S3 store.

A live quickstart run over mosquitto + SeaweedFS; the server, given only the run's config and the
same environment as the run's processes, serves each round's global model once it is announced.
Announcements that are not the aggregator's (wrong key) or whose blob is not what they announce
are refused while the previous model keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import yaml
from linear_trainer import LinearTrainer
from openai import OpenAI
from safetensors.torch import load_file
from services import service_env
from serving_support import QUICKSTART, ROOT, Server, child_env, serving

from unitedllm.checkpoints import read_digests
from unitedllm.comm.mqtt import to_topic
from unitedllm.comm.s3 import S3BlobStore
from unitedllm.comm.settings import MqttSettings, S3Settings
from unitedllm.config.types import Config
from unitedllm.protocol.messages import BlobRef, Finish, Message, RoundStart, TrainSpec
from unitedllm.protocol.payload import encode_tensors
from unitedllm.protocol.signing import seal
from unitedllm.serving.network_follow import RunMirror

pytestmark = [pytest.mark.services]

DEADLINE_S = 300.0
ROUNDS = 4
KEYS = {1: "follow-key-one", 2: "follow-key-two", 3: "follow-key-three"}


def run_config(tmp_path: Path) -> Path:
    """The quickstart as an MQTT_S3 run (broker and store from the environment), shortened."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["model_args"]["model_name_or_path"] = str(QUICKSTART.parent / "models" / "tiny-gpt-neox")
    raw["data_args"]["cache_dir"] = str(tmp_path / "data-cache")
    raw["train_args"].update(
        comm_round=ROUNDS, local_max_steps=4, output_dir=str(tmp_path / "out" / "{run_id}")
    )
    raw["comm_args"] = {"backend": "MQTT_S3", "round_timeout_s": 240, "join_timeout_s": 240}
    path = tmp_path / "mqtt_quickstart.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_for(condition: Any, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() not in (None, 0):
            pytest.fail(f"the run exited with {process.returncode} before {what}")
        time.sleep(0.3)
    pytest.fail(f"{what} did not happen within {DEADLINE_S:.0f} s")


def global_round(api: OpenAI) -> int | None:
    """The round ``global`` names now, read from ``/v1/models`` with the openai client."""
    for model in api.models.list():
        if model.id == "global":
            root = str(getattr(model, "root", ""))
            return int(root.split("@")[1]) if "@" in root else None
    return None


async def announce(settings: MqttSettings, run_id: str, frame: bytes) -> None:
    """Publish one frame on client 1's topic, as whoever holds the broker login could."""
    async with aiomqtt.Client(
        settings.host, settings.port, username=settings.username, password=settings.password
    ) as client:
        await client.publish(to_topic(run_id, 1), frame, qos=1)


def round_start(run_id: str, round_idx: int, ref: BlobRef) -> RoundStart:
    return RoundStart(
        run_id=run_id,
        round=round_idx,
        sender=0,
        seq=time.time_ns(),
        global_ref=ref,
        spec=TrainSpec(local_max_steps=1, local_num_train_epochs=1.0),
    )


def plant(s3: S3Settings, run_id: str, digest: str, data: bytes) -> None:
    """Put ``data`` at the store key of ``digest`` (bytes that are not what the digest says)."""
    import boto3

    from unitedllm.comm.s3 import boto_config

    raw = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        region_name=s3.region,
        config=boto_config(),
    )
    raw.put_object(Bucket=s3.bucket, Key=f"{s3.prefix.strip('/')}/{run_id}/{digest}", Body=data)


@pytest.mark.slow
def test_serve_follows_an_mqtt_s3_run_and_refuses_forged_announcements(
    tmp_path: Path, mqtt_settings: MqttSettings, s3_settings: S3Settings, run_id: str
) -> None:
    config = run_config(tmp_path)
    env = {
        **service_env(mqtt_settings, s3_settings),
        **{f"UNITEDLLM_RANK_KEY_{r}": k for r, k in KEYS.items()},
    }
    follow = ("--follow", "--run-id", run_id, "--cache-dir", str(tmp_path / "mirror"))
    with serving(str(config), *follow, log_dir=tmp_path, env=env) as server:
        api = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        assert global_round(api) is None  # nothing announced yet: only the base
        with (tmp_path / "run.log").open("wb") as sink:
            training = subprocess.Popen(
                [sys.executable, "-m", "unitedllm", "run", str(config), "--run-id", run_id, "-q"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**child_env(), **env},
                cwd=ROOT,
            )
        try:
            wait_for(lambda: global_round(api) is not None, "a first global model", training)
            first = global_round(api)
            assert first is not None
            wait_for(lambda: (global_round(api) or -1) > first, f"a round after {first}", training)
            later = global_round(api)
            answer = api.completions.create(
                model=f"global@{later}", prompt="apple", max_tokens=2, temperature=0
            )
            assert answer.choices[0].finish_reason in ("length", "stop")
            assert training.wait(timeout=DEADLINE_S) == 0, (tmp_path / "run.log").read_text()
        finally:
            if training.poll() is None:
                training.kill()
                training.wait()
        wait_for(lambda: global_round(api) == ROUNDS - 1, "the final round")
        assert {m.id for m in api.models.list()} >= {f"global@{r}" for r in range(ROUNDS)}

        check_refusals(server, api, mqtt_settings, s3_settings, run_id)
        log = server.output()
        secrets = [mqtt_settings.password, s3_settings.secret_access_key, *KEYS.values()]
        assert not [s for s in secrets if s and s in log], "a credential reached the server's log"


def check_refusals(server: Server, api: OpenAI, mqtt: MqttSettings, s3: S3Settings, run_id: str) -> None:
    """A forged announcement is dropped; a signed one whose blob is not what it says is refused."""
    good, bad = b"announced bytes", b"different bytes"
    ref = BlobRef(digest=hashlib.sha256(good).hexdigest(), size=len(good))
    plant(s3, run_id, ref.digest, bad)
    forged = seal(round_start(run_id, 11, ref), b"not the aggregator's key")
    asyncio.run(announce(mqtt, run_id, forged))
    corrupted = seal(round_start(run_id, 21, ref), KEYS[1].encode())
    asyncio.run(announce(mqtt, run_id, corrupted))
    wait_for(lambda: "round 20 not served" in server.output(), "the corrupted blob's refusal")
    log = server.output()
    assert "bad signature" in log and "round 10 not served" not in log
    refusal = next(line for line in log.splitlines() if "round 20 not served" in line)
    assert ref.digest[:12] in refusal
    assert server.metric("unitedllm_adapters_refused_total") == 1
    assert global_round(api) == ROUNDS - 1
    ids = {m.id for m in api.models.list()}
    assert "global@10" not in ids and "global@20" not in ids


def test_the_mirror_writes_signed_announcements_and_refuses_forged_and_corrupted_ones(
    tmp_path: Path,
    mqtt_settings: MqttSettings,
    s3_settings: S3Settings,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The network half alone (a plain PyTorch trainer, no model server): fast enough for every run."""
    for name, value in service_env(mqtt_settings, s3_settings).items():
        monkeypatch.setenv(name, value)
    for rank, key in KEYS.items():
        monkeypatch.setenv(f"UNITEDLLM_RANK_KEY_{rank}", key)
    cfg = msgspec.convert(
        {"train_args": {"client_num_in_total": 3}, "comm_args": {"backend": "MQTT_S3"}}, Config
    )
    cache = tmp_path / "mirror"
    trainer = LinearTrainer(0)
    refused: list[str] = []

    async def scenario() -> None:
        async with (
            S3BlobStore(s3_settings, run_id=run_id) as store,
            RunMirror(
                cfg, run_id=run_id, cache=cache, trainer=trainer, on_refused=lambda _n, r: refused.append(r)
            ) as mirror,
        ):
            following = asyncio.create_task(mirror.run())
            weights = {k: v + 1 for k, v in trainer.initial_weights().items()}
            ref = await store.put(encode_tensors(weights))
            good, bad = b"announced bytes", b"different bytes"
            corrupt = BlobRef(digest=hashlib.sha256(good).hexdigest(), size=len(good))
            plant(s3_settings, run_id, corrupt.digest, bad)

            async def say(message: Message, key: bytes, rank: int = 1) -> None:
                async with aiomqtt.Client(
                    mqtt_settings.host,
                    mqtt_settings.port,
                    username=mqtt_settings.username,
                    password=mqtt_settings.password,
                ) as client:
                    await client.publish(to_topic(run_id, rank), seal(message, key), qos=1)

            await say(round_start(run_id, 5, ref), b"forged")  # not the aggregator's key
            await say(round_start(run_id, 7, corrupt), KEYS[1].encode())
            await say(round_start(run_id, 2, ref), KEYS[1].encode())
            await say(round_start(run_id, 2, ref), KEYS[2].encode(), rank=2)  # the same round to client 2
            final = Finish(run_id=run_id, round=4, sender=0, seq=time.time_ns(), final_ref=ref)
            await say(final, KEYS[3].encode(), rank=3)
            deadline = time.monotonic() + 60
            while not (cache / "node_0" / "round_3_after_agg").is_dir() or not refused:
                assert time.monotonic() < deadline, "the announcements were not taken in"
                await asyncio.sleep(0.1)
            following.cancel()

    asyncio.run(scenario())
    rounds = sorted(p.name for p in (cache / "node_0").iterdir() if p.name.startswith("round_"))
    assert rounds == ["round_1_after_agg", "round_3_after_agg"]  # round 4 (forged) and 6 (corrupt) are not
    written = load_file(cache / "node_0" / "round_1_after_agg" / "model.safetensors")
    assert all(bool((written[k] == v + 1).all()) for k, v in trainer.initial_weights().items())
    recorded = read_digests(cache / "node_0" / "round_1_after_agg")
    assert recorded is not None and "model.safetensors" in recorded
    assert len(refused) == 1 and "round 6" in refused[0] and "digest mismatch" in refused[0]
