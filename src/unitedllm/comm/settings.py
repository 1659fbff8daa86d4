"""Connection settings for the MQTT_S3 backend, resolved from environment, FedML-style files and config.

Each setting is looked up in this order (first one set wins):

1. an environment variable (``UNITEDLLM_MQTT_PASSWORD``, ``UNITEDLLM_S3_SECRET_ACCESS_KEY``, ...),
2. the separate YAML file named by ``comm_args.mqtt_config_path`` / ``comm_args.s3_config_path``
   (FedML's upper-case keys such as ``BROKER_HOST`` or ``CN_S3_AKI`` and our lower-case names both work),
3. the run config (``comm_args.mqtt.*`` / ``comm_args.s3.*``).

There is no fallback to any hosted service: a missing broker host, S3 endpoint, bucket or
secret is a :class:`ConfigError` naming the key and every way to set it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitedllm.config.redaction import remember_secret
from unitedllm.config.types import CommArgs, Config
from unitedllm.errors import ConfigError, ConfigProblem

__all__ = [
    "ENV_RUN_SECRET",
    "MqttSettings",
    "S3Settings",
    "resolve_mqtt",
    "resolve_run_secret",
    "resolve_s3",
]

ENV_RUN_SECRET = "UNITEDLLM_RUN_SECRET"


@dataclass(frozen=True)
class MqttSettings:
    """Where the MQTT broker is and how to log in (secrets hidden from ``repr``)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 60
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS (a CA file was given)."""
        return self.tls_ca_file is not None

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a connection to this broker (its CA, and our certificate when given), or None."""
        if self.tls_ca_file is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file is not None:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 store is and the keys for it (secret hidden from ``repr``)."""

    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    prefix: str = "unitedllm"
    multipart_threshold_mb: int = 64


@dataclass(frozen=True)
class _Key:
    """One setting: its name, environment variable, accepted file keys and value parser."""

    name: str
    env: str | None
    file_keys: tuple[str, ...]
    parse: Callable[[Any], Any] = str


def _port(value: Any) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"expected a port number 1..65535, got {value!r}")
    return port


def _positive(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return number


_MQTT_KEYS = (
    _Key("host", "UNITEDLLM_MQTT_HOST", ("host", "BROKER_HOST")),
    _Key("port", "UNITEDLLM_MQTT_PORT", ("port", "BROKER_PORT"), _port),
    _Key("username", "UNITEDLLM_MQTT_USERNAME", ("username", "MQTT_USER")),
    _Key("password", "UNITEDLLM_MQTT_PASSWORD", ("password", "MQTT_PWD")),
    _Key("keepalive", "UNITEDLLM_MQTT_KEEPALIVE", ("keepalive", "MQTT_KEEPALIVE"), _positive),
    _Key("tls_ca_file", "UNITEDLLM_MQTT_TLS_CA_FILE", ("tls_ca_file",)),
    _Key("tls_cert_file", "UNITEDLLM_MQTT_TLS_CERT_FILE", ("tls_cert_file",)),
    _Key("tls_key_file", "UNITEDLLM_MQTT_TLS_KEY_FILE", ("tls_key_file",)),
)

_S3_KEYS = (
    _Key("endpoint_url", "UNITEDLLM_S3_ENDPOINT_URL", ("endpoint_url", "S3_ENDPOINT_URL")),
    _Key("bucket", "UNITEDLLM_S3_BUCKET", ("bucket", "BUCKET_NAME")),
    _Key("region", "UNITEDLLM_S3_REGION", ("region", "CN_REGION_NAME")),
    _Key("prefix", "UNITEDLLM_S3_PREFIX", ("prefix",)),
    _Key("access_key_id", "UNITEDLLM_S3_ACCESS_KEY_ID", ("access_key_id", "CN_S3_AKI")),
    _Key("secret_access_key", "UNITEDLLM_S3_SECRET_ACCESS_KEY", ("secret_access_key", "CN_S3_SAK")),
    _Key(
        "multipart_threshold_mb",
        "UNITEDLLM_S3_MULTIPART_THRESHOLD_MB",
        ("multipart_threshold_mb",),
        _positive,
    ),
)


def _comm(cfg: Config | CommArgs) -> CommArgs:
    return cfg.comm_args if isinstance(cfg, Config) else cfg


def _load_file(
    path_key: str, path: str | None, base_dir: Path | None, keys: tuple[_Key, ...]
) -> tuple[dict[str, Any], str | None]:
    """The settings in a FedML-style YAML file, by our lower-case names, and the file's path."""
    if path is None:
        return {}, None
    import yaml  # lazily: only MQTT_S3 runs read these files

    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    try:
        raw = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(ConfigProblem(path_key, f"file not found: {str(resolved)!r}")) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(ConfigProblem(path_key, f"cannot read {str(resolved)!r}: {exc}")) from exc
    if raw is None:
        return {}, str(resolved)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            ConfigProblem(
                path_key, f"{str(resolved)!r} must hold a mapping of settings, got {type(raw).__name__}"
            )
        )
    by_file_key = {fk: k.name for k in keys for fk in k.file_keys}
    values: dict[str, Any] = {}
    problems = []
    for file_key, value in raw.items():
        name = by_file_key.get(str(file_key))
        if name is None:
            known = ", ".join(sorted(by_file_key))
            problems.append(ConfigProblem(f"{resolved}:{file_key}", f"unknown key (accepted: {known})"))
        elif value is not None:
            values[name] = value
    if problems:
        raise ConfigError(problems, source=str(resolved))
    return values, str(resolved)


def _resolve(
    section: str,
    keys: tuple[_Key, ...],
    from_config: Mapping[str, Any],
    from_file: Mapping[str, Any],
    file_path: str | None,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """Each setting from env > file > config, parsed, with errors naming where the bad value came from."""
    values: dict[str, Any] = {}
    problems = []
    for key in keys:
        if key.env is not None and env.get(key.env, "") != "":
            raw, where = env[key.env], f"environment variable {key.env}"
        elif key.name in from_file:
            raw, where = from_file[key.name], f"{file_path}"
        elif from_config.get(key.name) is not None:
            raw, where = from_config[key.name], f"comm_args.{section}.{key.name}"
        else:
            continue
        try:
            values[key.name] = key.parse(raw)
        except (TypeError, ValueError) as exc:
            problems.append(ConfigProblem(f"comm_args.{section}.{key.name}", f"{exc} (from {where})"))
    if problems:
        raise ConfigError(problems)
    return values


def _missing(section: str, key: _Key, path_key: str, why: str) -> ConfigProblem:
    file_keys = " or ".join(key.file_keys)
    return ConfigProblem(
        f"comm_args.{section}.{key.name}",
        f"{why}; set comm_args.{section}.{key.name}, the environment variable {key.env}, "
        f"or {file_keys} in the file named by comm_args.{path_key}",
    )


def resolve_mqtt(
    cfg: Config | CommArgs, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> MqttSettings:
    """The MQTT broker settings of ``cfg`` (env > ``comm_args.mqtt_config_path`` file > ``comm_args.mqtt``)."""
    comm = _comm(cfg)
    from_file, file_path = _load_file(
        "comm_args.mqtt_config_path", comm.mqtt_config_path, base_dir, _MQTT_KEYS
    )
    values = _resolve(
        "mqtt", _MQTT_KEYS, _struct_dict(comm.mqtt), from_file, file_path, os.environ if env is None else env
    )
    keys = {k.name: k for k in _MQTT_KEYS}
    problems = []
    if not values.get("host"):
        problems.append(
            _missing("mqtt", keys["host"], "mqtt_config_path", "the MQTT_S3 backend needs a broker host")
        )
    if values.get("password") is not None and values.get("username") is None:
        problems.append(
            _missing("mqtt", keys["username"], "mqtt_config_path", "a password was given without a username")
        )
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if values.get(name) is not None and not Path(values[name]).expanduser().is_file():
            problems.append(ConfigProblem(f"comm_args.mqtt.{name}", f"file not found: {values[name]!r}"))
    if (values.get("tls_cert_file") is None) != (values.get("tls_key_file") is None):
        problems.append(
            ConfigProblem(
                "comm_args.mqtt.tls_cert_file",
                "a client certificate needs both tls_cert_file and tls_key_file",
            )
        )
    if values.get("tls_cert_file") is not None and values.get("tls_ca_file") is None:
        problems.append(
            ConfigProblem(
                "comm_args.mqtt.tls_ca_file",
                "a client certificate needs tls_ca_file (TLS is on only with a CA)",
            )
        )
    if problems:
        raise ConfigError(problems)
    remember_secret(values.get("password"))  # wherever it came from: a file's secret is masked in logs too
    return MqttSettings(**values)


def resolve_s3(
    cfg: Config | CommArgs, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> S3Settings:
    """The S3 store settings of ``cfg`` (env > ``comm_args.s3_config_path`` file > ``comm_args.s3``)."""
    comm = _comm(cfg)
    from_file, file_path = _load_file("comm_args.s3_config_path", comm.s3_config_path, base_dir, _S3_KEYS)
    values = _resolve(
        "s3", _S3_KEYS, _struct_dict(comm.s3), from_file, file_path, os.environ if env is None else env
    )
    keys = {k.name: k for k in _S3_KEYS}
    problems = []
    for name, why in (
        ("endpoint_url", "the MQTT_S3 backend needs the S3 endpoint URL (no hosted default)"),
        ("bucket", "the MQTT_S3 backend needs a bucket name (it is created when missing)"),
        ("access_key_id", "the MQTT_S3 backend needs an S3 access key id"),
        ("secret_access_key", "the MQTT_S3 backend needs an S3 secret access key"),
    ):
        if not values.get(name):
            problems.append(_missing("s3", keys[name], "s3_config_path", why))
    endpoint = values.get("endpoint_url")
    if endpoint and not str(endpoint).startswith(("http://", "https://")):
        problems.append(
            ConfigProblem(
                "comm_args.s3.endpoint_url", f"expected an http:// or https:// URL, got {endpoint!r}"
            )
        )
    if problems:
        raise ConfigError(problems)
    remember_secret(values.get("secret_access_key"))
    return S3Settings(**values)


def resolve_run_secret(
    cfg: Config | CommArgs, *, required: bool, env: Mapping[str, str] | None = None
) -> bytes | None:
    """The run secret (HMAC key shared by aggregator and clients): ``UNITEDLLM_RUN_SECRET`` > ``comm_args.run_secret``.

    ``None`` when unset and not ``required`` (an in-process run makes up its own).
    """
    environ = os.environ if env is None else env
    secret = environ.get(ENV_RUN_SECRET) or _comm(cfg).run_secret
    if not secret:
        if required:
            raise ConfigError(
                ConfigProblem(
                    "comm_args.run_secret",
                    "the MQTT_S3 backend needs a run secret (the HMAC key every message is signed with, "
                    f"the same for the aggregator and all clients); set the environment variable {ENV_RUN_SECRET} "
                    "or comm_args.run_secret",
                )
            )
        return None
    remember_secret(secret)
    return secret.encode("utf-8")


def _struct_dict(section: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.structs.asdict(section)
