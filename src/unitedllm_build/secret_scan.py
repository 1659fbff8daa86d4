"""Finding credentials before they are packaged: file names, detect-secrets, and UnitedLLM's own keys.

A package is uploaded and shared, so the build refuses one that would carry a credential. Three
kinds of evidence, each reported as ``path:line: what`` and never with the secret itself:

* the file's name or folder says credentials (``.env``, ``*.pem``, ``.npmrc``, ``kubeconfig``,
  ``.aws/``, ``token.txt`` ...);
* Yelp's `detect-secrets <https://github.com/Yelp/detect-secrets>`_ finds one in its text (AWS,
  GitHub, npm, Slack, JWT, private keys, ``password = ...`` assignments, high-entropy strings);
* UnitedLLM's own settings hold a value: ``export UNITEDLLM_*_PASSWORD=...`` (any ``UNITEDLLM_``
  secret variable) in a shell file, or a credential key of ours (``run_secret``, ``password``,
  ``secret_access_key``, FedML's ``MQTT_PWD``/``CN_S3_SAK`` ...) in any YAML file, under any name.

A false positive is allowed explicitly: ``--allow-secret PATH[:LINE]`` (globs allowed) or
detect-secrets' inline ``# pragma: allowlist secret`` comment on the line.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from unitedllm.errors import MissingDependency

__all__ = ["Finding", "SecretAllowList", "credential_file_reason", "inline_credentials", "scan_file"]

log = logging.getLogger(__name__)

_SECRET_NAMES: tuple[str, ...] = (
    ".env",
    ".env.*",
    "*.env",
    "mqtt_config.yaml",
    "mqtt_config.yml",
    "s3_config.yaml",
    "s3_config.yml",
    "*credentials*",
    # token.txt, access_token, gh.token ... but not tokenizer.json or tokenizer.py
    "token",
    "token.*",
    "tokens.*",
    "*.token",
    "*_token",
    "*-token",
    "*_token.*",
    "*-token.*",
    ".netrc",
    ".pypirc",
    ".npmrc",
    ".yarnrc",
    ".dockercfg",
    ".git-credentials",
    ".htpasswd",
    "kubeconfig",
    "*.kubeconfig",
    "kubeconfig.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ppk",
    "*.secret",
    "secrets.*",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "id_rsa.*",
    "id_ecdsa.*",
    "id_ed25519.*",
)
_SECRET_DIRS: frozenset[str] = frozenset({".ssh", ".aws", ".gnupg", ".docker", ".kube"})
_SAFE_SUFFIXES: tuple[str, ...] = (".example", ".sample", ".template", ".pub", ".dist")
_SCAN_LIMIT = 1024 * 1024  # credential files are small; a big file is data, not config
_YAML_SUFFIXES = (".yaml", ".yml")

# A literal value, not ``$VAR``: ``export UNITEDLLM_MQTT_PASSWORD=value``  # pragma: allowlist secret
_ENV_ASSIGNMENT = re.compile(
    r"""^\s*(?:export\s+)?(?P<name>UNITEDLLM_\w*(?:SECRET|PASSWORD|PASSWD|TOKEN|KEY)\w*)\s*=\s*
        (?P<value>"[^"$]+"|'[^']+'|[^\s"'$#][^\s#]*)""",
    re.VERBOSE,
)
_NOT_SECRET_ENV = re.compile(r"_KEY_ID$|_PATH$|_FILE$")

# Keys whose value is a credential, in UnitedLLM configs and FedML's mqtt/s3 config files.
_CREDENTIAL_KEYS = frozenset(
    {
        "run_secret",
        "password",
        "passwd",
        "secret_access_key",
        "aws_secret_access_key",
        "mqtt_pwd",
        "cn_s3_sak",
        "token",
        "api_key",
        "rank_keys",
    }
)


@dataclass(frozen=True)
class Finding:
    """One credential found: the file (as packaged), the line (None: the whole file) and what it looks like."""

    path: str
    line: int | None
    kind: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.kind}"


@dataclass(frozen=True)
class SecretAllowList:
    """``--allow-secret`` entries: ``PATH`` (glob) allows every finding in the file, ``PATH:LINE`` one line."""

    entries: tuple[str, ...] = ()

    def allows(self, finding: Finding) -> bool:
        for entry in self.entries:
            pattern, line = entry, None
            head, _, tail = entry.rpartition(":")
            if head and tail.isdigit():
                pattern, line = head, int(tail)
            if fnmatch.fnmatchcase(finding.path, pattern) and line in (None, finding.line):
                return True
        return False


def credential_file_reason(rel: PurePosixPath) -> str | None:
    """Why a file's name or folder says it holds credentials, or None."""
    name = rel.name.lower()
    if any(part in _SECRET_DIRS for part in rel.parts[:-1]):
        return "inside a credentials folder"
    if not name.endswith(_SAFE_SUFFIXES):
        for pattern in _SECRET_NAMES:
            if fnmatch.fnmatchcase(name, pattern):
                return f"credential file name ({pattern})"
    return None


def _detect_secrets(path: Path) -> Iterator[tuple[int, str]]:
    try:
        from detect_secrets.core.secrets_collection import SecretsCollection
        from detect_secrets.settings import default_settings
    except ImportError as exc:  # pragma: no cover - the build extra declares it
        raise MissingDependency("detect-secrets", "build", "unitedllm-build's secret scan") from exc
    found = SecretsCollection()
    with default_settings():
        found.scan_file(str(path))
    for secrets in found.data.values():
        for secret in secrets:
            if secret.type == "Secret Keyword" and _names_a_variable(secret.secret_value):
                continue
            yield secret.line_number, f"looks like a secret ({secret.type}, found by detect-secrets)"


# ``SECRET_ENV = "UNITEDLLM_RUN_SECRET"`` names where a secret comes from; it is not one.
_VARIABLE_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")


def _names_a_variable(value: str | None) -> bool:
    return value is not None and bool(_VARIABLE_NAME.match(value))


def _env_assignments(lines: Sequence[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        match = _ENV_ASSIGNMENT.match(line)
        if match and not _NOT_SECRET_ENV.search(match.group("name")):
            yield number, f"sets {match.group('name')} to a literal value"


def _yaml_credentials(text: str) -> Iterator[tuple[int, str]]:
    """Credential keys of ours with a value, at any depth of a YAML file (line numbers from the parser)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    stack: list[tuple[yaml.Node | None, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                where = f"{path}.{name}" if path else name
                if name.lower() in _CREDENTIAL_KEYS and _has_value(value):
                    yield key.start_mark.line + 1, f"credential key {where} holds a value"
                else:
                    stack.append((value, where))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))


# A reference to a value kept elsewhere, not the value: ${MQTT_PASSWORD}, $SECRET, <your key here>.
_REFERENCE = re.compile(r"^(\$\{?\w+\}?|<[^<>]*>)$")


def _has_value(node: yaml.Node) -> bool:
    if isinstance(node, yaml.ScalarNode):
        text = str(node.value).strip()
        return (
            node.tag != "tag:yaml.org,2002:null"
            and text not in ("", "~", "null")
            and not _REFERENCE.match(text)
        )
    return bool(node.value)


def scan_file(path: Path, shown: str, allow: SecretAllowList = SecretAllowList()) -> list[Finding]:
    """Every credential in the file at ``path`` (``shown``: its path as packaged), less the allowed ones."""
    findings: list[Finding] = []
    reason = credential_file_reason(PurePosixPath(shown))
    if reason:
        findings.append(Finding(shown, None, reason))
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= _SCAN_LIMIT else b""
    except OSError:
        raw = b""
    if raw and b"\x00" not in raw[:8192]:  # text only: a binary file is data, not config
        text = raw.decode("utf-8", "replace")
        lines = text.splitlines()
        hits = list(_detect_secrets(path)) + list(_env_assignments(lines))
        if path.suffix.lower() in _YAML_SUFFIXES:
            hits += list(_yaml_credentials(text))
        allowed_inline = {n for n in range(1, len(lines) + 1) if "pragma: allowlist secret" in lines[n - 1]}
        seen: set[int] = set()
        for line, kind in sorted(hits):
            if line not in seen and line not in allowed_inline:
                seen.add(line)
                findings.append(Finding(shown, line, kind))
    return [f for f in findings if not allow.allows(f)]


def inline_credentials(config: object, paths: Iterable[tuple[str, ...]] | None = None) -> list[str]:
    """YAML paths of secret config fields written straight into a parsed config (``comm_args.mqtt.password``...).

    The fields are those marked secret in the config types (:mod:`unitedllm.config.redaction`).
    """
    from unitedllm.config.redaction import secret_paths

    found: list[str] = []
    for path in paths if paths is not None else secret_paths():
        found.extend(_set_paths(config, path, ()))
    return found


def _set_paths(node: object, path: tuple[str, ...], done: tuple[str, ...]) -> Iterator[str]:
    if not path:
        if node not in (None, "", {}, []):
            yield ".".join(done)
        return
    head, rest = path[0], path[1:]
    if isinstance(node, Mapping):
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            yield from _set_paths(node[key], rest, (*done, str(key)))
