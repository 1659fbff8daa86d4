"""MQTT_S3 connection settings: env > FedML-style file > config, and clear errors for what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from unitedllm.comm.factory import open_backend
from unitedllm.comm.local import LocalHub, LocalTransport
from unitedllm.comm.mqtt import MqttTransport
from unitedllm.comm.s3 import S3BlobStore
from unitedllm.comm.settings import resolve_mqtt, resolve_run_secret, resolve_s3
from unitedllm.config.types import CommArgs, Config, MqttArgs, S3Args, TrainArgs
from unitedllm.errors import ConfigError

COMPLETE_S3 = S3Args(
    endpoint_url="http://cfg:8333", bucket="cfg-bucket", access_key_id="cfg-ak", secret_access_key="cfg-sk"
)


def test_config_alone_is_enough() -> None:
    comm = CommArgs(
        mqtt=MqttArgs(host="broker.cfg", port=1884, username="u", password="pw-cfg-123"), s3=COMPLETE_S3
    )
    mqtt = resolve_mqtt(comm, env={})
    assert (mqtt.host, mqtt.port, mqtt.username, mqtt.password, mqtt.tls) == (
        "broker.cfg",
        1884,
        "u",
        "pw-cfg-123",
        False,
    )
    s3 = resolve_s3(comm, env={})
    assert (s3.endpoint_url, s3.bucket, s3.access_key_id, s3.secret_access_key) == (
        "http://cfg:8333",
        "cfg-bucket",
        "cfg-ak",
        "cfg-sk",
    )
    assert "pw-cfg-123" not in repr(mqtt) and "cfg-sk" not in repr(s3), (
        "secrets must not show in reprs or logs"
    )


def test_env_beats_file_beats_config(tmp_path: Path) -> None:
    mqtt_file = tmp_path / "mqtt_config.yaml"
    mqtt_file.write_text(
        "BROKER_HOST: broker.file\nBROKER_PORT: 2883\nMQTT_USER: file-user\nMQTT_PWD: file-pwd\nMQTT_KEEPALIVE: 30\n"
    )
    s3_file = tmp_path / "s3_config.yaml"
    s3_file.write_text(
        "BUCKET_NAME: file-bucket\nCN_S3_AKI: file-ak\nCN_S3_SAK: file-sk\nCN_REGION_NAME: eu-west-1\n"
    )
    comm = CommArgs(
        mqtt=MqttArgs(host="broker.cfg", username="cfg-user", password="cfg-pwd"),
        s3=COMPLETE_S3,
        mqtt_config_path=str(mqtt_file),
        s3_config_path=str(s3_file),
    )
    env = {"UNITEDLLM_MQTT_PASSWORD": "env-pwd", "UNITEDLLM_S3_SECRET_ACCESS_KEY": "env-sk"}
    mqtt = resolve_mqtt(comm, env=env)
    assert (mqtt.host, mqtt.port, mqtt.username, mqtt.password, mqtt.keepalive) == (
        "broker.file",
        2883,
        "file-user",
        "env-pwd",
        30,
    )
    s3 = resolve_s3(comm, env=env)
    assert (s3.endpoint_url, s3.bucket, s3.region, s3.access_key_id, s3.secret_access_key) == (
        "http://cfg:8333",
        "file-bucket",
        "eu-west-1",
        "file-ak",
        "env-sk",
    )


def test_lower_case_file_keys_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "s3.yaml").write_text(
        "endpoint_url: http://file:9000\nbucket: lower\naccess_key_id: a\nsecret_access_key: b\nprefix: fl\n"
    )
    s3 = resolve_s3(CommArgs(s3_config_path="conf/s3.yaml"), env={}, base_dir=tmp_path)
    assert (s3.endpoint_url, s3.bucket, s3.prefix) == ("http://file:9000", "lower", "fl")


def test_missing_settings_name_the_key_and_every_way_to_set_it() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_mqtt(CommArgs(), env={})
    text = str(caught.value)
    assert "comm_args.mqtt.host" in text and "UNITEDLLM_MQTT_HOST" in text and "BROKER_HOST" in text

    with pytest.raises(ConfigError) as caught:
        resolve_s3(CommArgs(s3=S3Args(endpoint_url="http://x:1", bucket="bkt", access_key_id="a")), env={})
    assert [p.path for p in caught.value.problems] == ["comm_args.s3.secret_access_key"]
    assert "UNITEDLLM_S3_SECRET_ACCESS_KEY" in str(caught.value) and "CN_S3_SAK" in str(caught.value)


def test_bad_values_say_where_they_came_from(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"comm_args\.mqtt\.port: .*'eighty'.*environment variable UNITEDLLM_MQTT_PORT"
    ):
        resolve_mqtt(CommArgs(mqtt=MqttArgs(host="h")), env={"UNITEDLLM_MQTT_PORT": "eighty"})
    bad_file = tmp_path / "mqtt.yaml"
    bad_file.write_text("BROKER_HOST: h\nBROKER_PROT: 1883\n")
    with pytest.raises(ConfigError, match="BROKER_PROT: unknown key"):
        resolve_mqtt(CommArgs(mqtt_config_path=str(bad_file)), env={})
    with pytest.raises(ConfigError, match=r"comm_args\.mqtt_config_path: file not found"):
        resolve_mqtt(CommArgs(mqtt_config_path=str(tmp_path / "absent.yaml")), env={})
    with pytest.raises(ConfigError, match=r"comm_args\.mqtt\.tls_ca_file: file not found"):
        resolve_mqtt(CommArgs(mqtt=MqttArgs(host="h", tls_ca_file=str(tmp_path / "ca.pem"))), env={})
    with pytest.raises(ConfigError, match=r"comm_args\.s3\.endpoint_url: expected an http"):
        resolve_s3(
            CommArgs(
                s3=S3Args(endpoint_url="s3.example", bucket="b", access_key_id="a", secret_access_key="s")
            ),
            env={},
        )


def test_run_secret_env_beats_config_and_is_required_for_mqtt_s3() -> None:
    comm = CommArgs(run_secret="from-config")
    assert resolve_run_secret(comm, required=True, env={}) == b"from-config"
    assert resolve_run_secret(comm, required=True, env={"UNITEDLLM_RUN_SECRET": "from-env"}) == b"from-env"
    assert resolve_run_secret(CommArgs(), required=False, env={}) is None
    with pytest.raises(ConfigError, match=r"comm_args\.run_secret: .*UNITEDLLM_RUN_SECRET"):
        resolve_run_secret(CommArgs(), required=True, env={})


def test_open_backend_picks_the_backend_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNITEDLLM_MQTT_HOST", "UNITEDLLM_S3_BUCKET", "UNITEDLLM_RUN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    hub = LocalHub(run_id="r", secret=b"s", ranks={0, 1, 2})
    transport, _ = open_backend(Config(), rank=1, run_id="r", hub=hub)
    assert isinstance(transport, LocalTransport)
    with pytest.raises(ConfigError, match="comm_args.backend: LOCAL connects roles inside one process"):
        open_backend(Config(), rank=1, run_id="r")

    cfg = Config(
        comm_args=CommArgs(backend="MQTT_S3", mqtt=MqttArgs(host="broker"), s3=COMPLETE_S3, run_secret="k")
    )
    transport, store = open_backend(cfg, rank=0, run_id="r")
    assert isinstance(transport, MqttTransport) and isinstance(store, S3BlobStore)
    assert transport.peers == {1, 2}, "the aggregator listens to every client"
    assert store.key_for("ab") == "unitedllm/r/ab"
    client, _ = open_backend(cfg, rank=2, run_id="r")
    assert client.peers == {0}  # type: ignore[attr-defined]

    with pytest.raises(ConfigError) as caught:
        open_backend(Config(comm_args=CommArgs(backend="MQTT_S3")), rank=1, run_id="r")
    paths = {p.path for p in caught.value.problems}
    assert {"comm_args.mqtt.host", "comm_args.s3.bucket", "comm_args.run_secret"} <= paths


def test_rank_keys_env_beats_file_and_a_client_reads_only_its_own(tmp_path: Path) -> None:
    from unitedllm.comm.keys import resolve_rank_keys

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("1: file-key-1\n2: file-key-2\n3: file-key-3\n")
    cfg = Config(
        train_args=TrainArgs(client_num_in_total=3, client_num_per_round=3),
        comm_args=CommArgs(rank_keys_path=str(keys_file)),
    )
    env = {"UNITEDLLM_RANK_KEY_2": "env-key-2"}
    aggregator = resolve_rank_keys(cfg, rank=0, env=env)
    assert aggregator.ranks() == {1, 2, 3} and aggregator.shared is None
    assert aggregator.link(0, 2) == b"env-key-2" and aggregator.link(1, 0) == b"file-key-1"
    client = resolve_rank_keys(cfg, rank=3, env=env)
    assert client.ranks() == {3} and client.link(0, 1) is None and client.link(3, 0) == b"file-key-3"


def test_shared_run_secret_still_works_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    from unitedllm.comm.keys import resolve_rank_keys

    cfg = Config(train_args=TrainArgs(client_num_in_total=2, client_num_per_round=2))
    with caplog.at_level("WARNING"):
        keys = resolve_rank_keys(cfg, rank=0, env={"UNITEDLLM_RUN_SECRET": "s3kr1t-value"})
    assert keys.link(0, 1) == keys.link(2, 0) == b"s3kr1t-value"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "every client is trusted with every rank" in warnings[0]
    assert "s3kr1t-value" not in warnings[0], "the secret itself never reaches the log"
    with pytest.raises(ConfigError, match="UNITEDLLM_RANK_KEY_1"):
        resolve_rank_keys(cfg, rank=1, env={})


def test_credentials_read_from_files_are_masked_in_this_processs_logs(tmp_path: Path) -> None:
    """A password, S3 key or rank key that only a settings file holds never reaches a log line."""
    from unitedllm.comm.keys import resolve_rank_keys
    from unitedllm.config.redaction import scrub

    (tmp_path / "mqtt.yaml").write_text("BROKER_HOST: b\nMQTT_USER: u\nMQTT_PWD: file-only-mqtt-pw\n")
    (tmp_path / "s3.yaml").write_text(
        "endpoint_url: http://s3:9000\nbucket: b\naccess_key_id: a\nsecret_access_key: file-only-s3-sk\n"
    )
    (tmp_path / "keys.yaml").write_text("1: file-only-rank-key\n")
    comm = CommArgs(mqtt_config_path="mqtt.yaml", s3_config_path="s3.yaml", rank_keys_path="keys.yaml")
    resolve_mqtt(comm, env={}, base_dir=tmp_path)
    resolve_s3(comm, env={}, base_dir=tmp_path)
    cfg = Config(train_args=TrainArgs(client_num_in_total=1, client_num_per_round=1), comm_args=comm)
    resolve_rank_keys(cfg, rank=1, env={}, base_dir=tmp_path)
    line = "connect with file-only-mqtt-pw, file-only-s3-sk and file-only-rank-key"
    assert scrub(line) == "connect with ********, ******** and ********"
