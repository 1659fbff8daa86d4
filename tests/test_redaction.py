"""Secrets never reach a tracker, log, report or package: one redaction, checked against every real sink.

Credentials written inline in the config (FedML-style configs allow it) go through a real run with
TensorBoard, W&B (offline) and MLflow (file store) on; afterwards no byte of any file the run wrote
holds them, and each tracker shows the key masked instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from linear_trainer import LinearTrainer

from unitedllm.config import Config, load_config
from unitedllm.config.redaction import MASK, redacted_config, scrub, secret_paths
from unitedllm.report import write_report
from unitedllm.run_layout import RunLayout
from unitedllm.runner import run_async
from unitedllm.tracking import MetricsLog, open_trackers

RUN_SECRET = "run-secret-3f9a1c77e0b24d5e"
MQTT_PASSWORD = "mqtt-pw-8d1e2f3a4b5c"
S3_SECRET = "s3-sak-Zx81QwErTy77PoLk"
RANK_KEY = "rank-2-key-77c1e09b5a"  # a per-rank HMAC key, from UNITEDLLM_RANK_KEY_2
SECRETS = (RUN_SECRET, MQTT_PASSWORD, S3_SECRET)


def _config_data(tmp_path: Path) -> dict[str, Any]:
    return {
        "train_args": {
            "comm_round": 2,
            "client_num_in_total": 2,
            "client_num_per_round": 2,
            "local_max_steps": 2,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        "comm_args": {
            "round_timeout_s": 30,
            "join_timeout_s": 30,
            "run_secret": RUN_SECRET,
            "mqtt": {"host": "broker.example", "username": "fl", "password": MQTT_PASSWORD},
            "s3": {"bucket": "b", "access_key_id": "AKIDEXAMPLE", "secret_access_key": S3_SECRET},
        },
        "tracking_args": {"log_system_metrics": False},
    }


def _leaks(folder: Path) -> list[str]:
    """Every file under ``folder`` holding any of the secrets, as ``path: secret``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    return found


def test_every_credential_field_is_marked_secret() -> None:
    """A new key named like a credential (password, secret, token, key) must carry the SECRET marker."""
    marked = {".".join(p) for p in secret_paths()}
    assert {"comm_args.run_secret", "comm_args.mqtt.password", "comm_args.s3.secret_access_key"} <= marked
    credential = re.compile(r"(^|_)(password|passwd|secret|token|keys?)(_|$)")
    not_credential = re.compile(r"_id$|_path$|_file$|^tls_")

    def names(cls: type[msgspec.Struct], prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls, include_extras=True)
        out = []
        for name in cls.__struct_fields__:
            hint = hints[name]
            inner = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
                out += names(inner, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    unmarked = [
        path
        for path in names(Config, "")
        if credential.search(path.rsplit(".", 1)[-1])
        and not not_credential.search(path.rsplit(".", 1)[-1])
        and path not in marked
        and not any(m.startswith(path + ".") for m in marked)
    ]
    assert unmarked == []


def test_redacted_config_masks_every_secret_and_keeps_the_rest(tmp_path: Path) -> None:
    cfg = load_config(_config_data(tmp_path))
    shown = redacted_config(cfg)
    assert shown["comm_args"]["run_secret"] == MASK
    assert shown["comm_args"]["mqtt"]["password"] == MASK
    assert shown["comm_args"]["s3"]["secret_access_key"] == MASK
    assert shown["comm_args"]["mqtt"]["username"] == "fl"
    assert shown["train_args"]["comm_round"] == 2
    assert not any(s in repr(shown) for s in SECRETS)
    # the config itself is untouched: the run still needs its secrets
    assert cfg.comm_args.run_secret == RUN_SECRET
    # a loaded config's secrets are masked in any text from now on
    assert scrub(f"login failed for fl:{MQTT_PASSWORD}@broker") == f"login failed for fl:{MASK}@broker"


def test_no_sink_of_a_run_sees_an_inline_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    have_wandb = importlib.util.find_spec("wandb") is not None
    have_mlflow = importlib.util.find_spec("mlflow") is not None
    have_tb = importlib.util.find_spec("tensorboard") is not None
    if not (have_wandb and have_mlflow and have_tb):
        pytest.skip("the tracking extra (wandb, mlflow, tensorboard) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = _config_data(tmp_path)
    uri = (tmp_path / "mlruns").as_uri()
    data["tracking_args"].update(
        enable_tensorboard=True,
        enable_wandb=True,
        wandb_project="unitedllm-test",
        mlflow_tracking_uri=uri,
        mlflow_experiment="redaction",
    )
    cfg = load_config(data, run_id="leak")
    out = Path(cfg.train_args.output_dir)
    with (
        open_trackers(cfg, rank=0, run_id="leak", layout=RunLayout(out)) as listeners,
        MetricsLog(out / "metrics.jsonl", listeners=listeners) as metrics,
    ):
        # an error message quoting a credential, as a failed login might
        metrics.log("rejected", round_idx=0, rank=1, reason=f"bad signature under {RUN_SECRET}")
        asyncio.run(
            run_async(
                cfg, run_id="leak", metrics=metrics, trainer_factory=lambda _cfg, rank: LinearTrainer(rank)
            )
        )
    report = write_report(out, out_dir=tmp_path / "report")

    # W&B's offline file is written by its own process a moment after finish() returns
    (wandb_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 20
    while b"round/train_loss" not in wandb_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"round/train_loss" in wandb_file.read_bytes()
    assert MASK.encode() in wandb_file.read_bytes()  # the config is there, masked

    assert _leaks(out) == []  # metrics.jsonl, TensorBoard, W&B
    assert _leaks(tmp_path / "mlruns") == []
    assert _leaks(report.parent) == []
    assert "bad signature under " + MASK in (out / "metrics.jsonl").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("redaction")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["comm_args.run_secret"] == MASK
    assert MASK in params["comm_args.mqtt"] and MQTT_PASSWORD not in params["comm_args.mqtt"]
    assert params["train_args.comm_round"] == "2"

    tb_files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert tb_files and any(MASK.encode() in f.read_bytes() for f in tb_files)


@pytest.mark.parametrize(
    "setup",
    [
        "from unitedllm.cli import _setup_logging; _setup_logging(False)",
        "from unitedllm.silo.worker import _setup_logging; _setup_logging(False, 0)",
    ],
    ids=["cli", "silo-worker"],
)
def test_cli_logs_mask_config_and_environment_secrets(tmp_path: Path, setup: str) -> None:
    """The command and every process of a silo log through one set-up that masks secrets."""
    config = tmp_path / "inline.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            comm_args:
              run_secret: "{RUN_SECRET}"
              mqtt:
                username: fl
                password: "{MQTT_PASSWORD}"
            """),
        encoding="utf-8",
    )
    code = textwrap.dedent(f"""\
        import logging
        {setup}
        from unitedllm.config import load_config
        load_config({str(config)!r})
        log = logging.getLogger("unitedllm.test")
        log.warning("connecting as fl:%s with run secret %s", {MQTT_PASSWORD!r}, {RUN_SECRET!r})
        log.warning("s3 key from the environment: {S3_SECRET}")
        log.warning("rank 2 signs with {RANK_KEY}")
        """)
    env = {**os.environ, "UNITEDLLM_S3_SECRET_ACCESS_KEY": S3_SECRET, "UNITEDLLM_RANK_KEY_2": RANK_KEY}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "connecting as fl:" + MASK in proc.stderr
    assert "s3 key from the environment: " + MASK in proc.stderr
    assert "rank 2 signs with " + MASK in proc.stderr and RANK_KEY not in proc.stderr
    assert not any(s in proc.stderr + proc.stdout for s in SECRETS)


@pytest.mark.parametrize(
    "setup",
    [
        "from unitedllm.cli import _setup_logging; _setup_logging(False)",
        "from unitedllm.silo.worker import _setup_logging; _setup_logging(False, 0)",
        "from unitedllm.serving.cli import _serve_logging; _serve_logging(False)",
        "from unitedllm.agent.cli import _setup_logging; _setup_logging()",
        "from unitedllm.packaging.cli import _setup_logging; _setup_logging()",
        "from unitedllm_build.cli import _setup_logging; _setup_logging()",
    ],
    ids=["cli", "silo-worker", "serve", "agent", "package-run", "build"],
)
def test_every_command_masks_environment_secrets_before_any_config_is_read(setup: str) -> None:
    """The agent, the server and the packaging commands read no run config: the environment's secrets
    (and a library's traceback carrying one) are masked by the one logging set-up all commands share."""
    code = textwrap.dedent(f"""\
        import logging
        {setup}
        logging.getLogger("unitedllm.test").warning("s3 key from the environment: {S3_SECRET}")
        logging.getLogger("httpx").error("request with {RANK_KEY} failed")
        try:
            raise RuntimeError("token {S3_SECRET} refused")
        except RuntimeError:
            logging.getLogger("unitedllm.test").exception("the call failed")
        """)
    env = {**os.environ, "UNITEDLLM_S3_SECRET_ACCESS_KEY": S3_SECRET, "UNITEDLLM_RANK_KEY_2": RANK_KEY}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "s3 key from the environment: " + MASK in proc.stderr
    assert f"request with {MASK} failed" in proc.stderr
    assert f"token {MASK} refused" in proc.stderr
    assert S3_SECRET not in proc.stderr + proc.stdout and RANK_KEY not in proc.stderr + proc.stdout


def test_an_entry_point_without_logging_setup_still_masks_config_secrets(tmp_path: Path) -> None:
    """A package's own launch.py may never configure logging: Python's last-resort handler prints then."""
    config = tmp_path / "inline.yaml"
    config.write_text(f'comm_args:\n  run_secret: "{RUN_SECRET}"\n', encoding="utf-8")
    code = textwrap.dedent(f"""\
        import logging
        from unitedllm.config import load_config
        load_config({str(config)!r})
        logging.getLogger("unitedllm.aggregator").warning("frame signed with %s refused", {RUN_SECRET!r})
        logging.getLogger("botocore").warning("request signed with {S3_SECRET}")
        """)
    env = {**os.environ, "UNITEDLLM_S3_SECRET_ACCESS_KEY": S3_SECRET}  # a secret from the environment
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert f"frame signed with {MASK} refused" in proc.stderr and RUN_SECRET not in proc.stderr
    assert f"request signed with {MASK}" in proc.stderr and S3_SECRET not in proc.stderr


def test_environment_secrets_set_changed_or_removed_later_are_followed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the process environment holds is looked up again when it changes (it is cached between changes)."""
    line = "connecting with rotated-token-0001 and rotated-token-0002"
    monkeypatch.setenv("UNITEDLLM_RANK_KEY_901", "rotated-token-0001")
    assert scrub(line) == f"connecting with {MASK} and rotated-token-0002"
    monkeypatch.setenv("UNITEDLLM_RANK_KEY_901", "rotated-token-0002")
    assert scrub(line) == f"connecting with rotated-token-0001 and {MASK}"
    monkeypatch.delenv("UNITEDLLM_RANK_KEY_901")
    monkeypatch.setenv("UNITEDLLM_S3_SECRET_ACCESS_KEY", "rotated-token-0001")
    assert scrub(line) == f"connecting with {MASK} and rotated-token-0002"
    monkeypatch.delenv("UNITEDLLM_S3_SECRET_ACCESS_KEY")
    assert scrub(line) == line
