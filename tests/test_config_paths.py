"""Paths a config names are relative to the config file, whatever directory the command runs in."""

from __future__ import annotations

from pathlib import Path

import pytest

from unitedllm.comm.settings import resolve_mqtt, resolve_s3
from unitedllm.config import load_config
from unitedllm.silo.launcher import resolve_config_path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with its FedML-style broker and store files beside it, read from another directory."""
    folder = tmp_path / "project"
    (folder / "conf").mkdir(parents=True)
    (folder / "conf" / "mqtt_config.yaml").write_text("BROKER_HOST: broker.beside\nBROKER_PORT: 2883\n")
    (folder / "conf" / "s3_config.yaml").write_text(
        "BUCKET_NAME: beside-bucket\nCN_S3_AKI: ak\nCN_S3_SAK: sk\nCN_REGION_NAME: eu-west-1\n"
    )
    (folder / "conf" / "bootstrap.sh").write_text("true\n")
    (folder / "fedml_config.yaml").write_text(
        "environment_args:\n  bootstrap: conf/bootstrap.sh\n"
        "comm_args:\n  backend: MQTT_S3\n  mqtt_config_path: conf/mqtt_config.yaml\n"
        "  s3_config_path: conf/s3_config.yaml\n  s3:\n    endpoint_url: http://127.0.0.1:8333\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder


def test_relative_broker_and_store_files_are_read_beside_the_config(project: Path) -> None:
    cfg = load_config(project / "fedml_config.yaml")
    mqtt = resolve_mqtt(cfg, env={})
    s3 = resolve_s3(cfg, env={})
    assert (mqtt.host, mqtt.port) == ("broker.beside", 2883)
    assert (s3.bucket, s3.region) == ("beside-bucket", "eu-west-1")


def test_every_config_relative_path_follows_one_rule(project: Path) -> None:
    cfg = load_config(project / "fedml_config.yaml")
    beside = project / "conf"
    assert cfg.comm_args.mqtt_config_path == str(beside / "mqtt_config.yaml")
    assert cfg.environment_args.bootstrap == str(beside / "bootstrap.sh")
    found = resolve_config_path("conf/bootstrap.sh", config_dir=project, key="environment_args.bootstrap")
    assert found == (beside / "bootstrap.sh").resolve()


def test_a_path_found_only_in_the_working_directory_is_still_read_there(project: Path) -> None:
    (Path.cwd() / "here.yaml").write_text("BROKER_HOST: broker.cwd\n")
    (project / "fedml_config.yaml").write_text(
        "comm_args:\n  backend: MQTT_S3\n  mqtt_config_path: here.yaml\n"
        "  s3:\n    endpoint_url: http://127.0.0.1:8333\n"
    )
    assert resolve_mqtt(load_config(project / "fedml_config.yaml"), env={}).host == "broker.cwd"
