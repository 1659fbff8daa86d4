"""The build's secret scan: each credential the campaign slipped past it is now refused, by file and line.

Every case builds a real `init` project with ``unitedllm-build``; a finding must name the file and
line, leave no package behind, and never print the secret itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from unitedllm_build.cli import app

runner = CliRunner()

# Fake credentials in the shapes real ones have (none of them works anywhere).
AWS_ID = "AKIAQ3EGRWXQ7PLMZ2TB"
AWS_SECRET = "kN4vUq8Rz1Xb7Yp2Lc9Wm3Td6Hs0Fg5Je8Ai2Bo"
GITHUB_TOKEN = "ghp_R7m2Kx9Qw4Zt1Lp8Vn3Hs6Yb0Jc5Fd2Ge7Ua"
NPM_TOKEN = "npm_8fJ2kL9mQ4rT7vX1zB5nC3dG6hW0yE2pA9sU"
JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6Ik1aIn0.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50In0"
    ".Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5d2FsZG9mcmVk"
)
MQTT_PASSWORD = "Tr0ub4dor-and-3-horses-9q"

CASES: dict[str, tuple[str, str, str, int]] = {
    # name: (file, text, secret that must not be printed, line the finding names)
    "aws_keys_in_py": (
        "app/storage.py",
        f'import boto3\n\nKEY_ID = "{AWS_ID}"\nSECRET = "{AWS_SECRET}"\n',
        AWS_SECRET,
        3,
    ),
    "s3_keys_in_other_yaml": (
        "deploy/storage.yaml",
        f"store:\n  endpoint: http://minio:9000\n  secret_access_key: {AWS_SECRET}\n",
        AWS_SECRET,
        3,
    ),
    "unitedllm_export_in_bootstrap": (
        "config/bootstrap.sh",
        f"#!/bin/bash\nset -e\nexport UNITEDLLM_MQTT_PASSWORD={MQTT_PASSWORD}\n",
        MQTT_PASSWORD,
        3,
    ),
    "token_txt": ("token.txt", f"{GITHUB_TOKEN}\n", GITHUB_TOKEN, 1),
    "npmrc": (".npmrc", f"//registry.npmjs.org/:_authToken={NPM_TOKEN}\n", NPM_TOKEN, 1),
    "kubeconfig": (
        "ops/kubeconfig",
        f"apiVersion: v1\nkind: Config\nusers:\n- name: fl\n  user:\n    token: {JWT}\n",
        JWT,
        6,
    ),
}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    result = runner.invoke(app, ["init", str(tmp_path / "proj")])
    assert result.exit_code == 0, result.output
    return tmp_path / "proj"


def build(project: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app,
        [
            "-t",
            "client",
            "-sf",
            str(project),
            "-ep",
            "launch.py",
            "-cf",
            str(project / "config"),
            "-df",
            str(project / "build"),
            *extra,
        ],
    )
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


def packaged(project: Path) -> bool:
    return (project / "build" / "dist-packages" / "client-package.zip").exists()


def test_the_init_project_has_no_findings(project: Path) -> None:
    code, out = build(project)
    assert code == 0, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_credential_is_refused_by_file_and_line_without_printing_it(project: Path, case: str) -> None:
    rel, text, secret, line = CASES[case]
    path = project / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    code, out = build(project)
    assert code == 2, out
    assert "refusing to package credentials" in out
    assert f"{rel}:{line}:" in out or f"{rel}: credential file name" in out, out
    assert secret not in out
    assert not packaged(project)


def test_a_false_positive_is_allowed_explicitly(project: Path) -> None:
    rel, text, secret, line = CASES["aws_keys_in_py"]
    (project / "app").mkdir()
    (project / rel).write_text(text, encoding="utf-8")
    code, out = build(project, "--allow-secret", f"{rel}:{line}")
    assert code == 2 and f"{rel}:4:" in out and f"{rel}:{line}:" not in out  # only that line is allowed
    code, out = build(project, "--allow-secret", f"{rel}:{line}", "--allow-secret", f"{rel}:4")
    assert code == 0, out
    assert packaged(project)


def test_inline_allowlist_pragma_is_honoured(project: Path) -> None:
    (project / "fixture.py").write_text(f'FAKE = "{AWS_ID}"  # pragma: allowlist secret\n', encoding="utf-8")
    code, out = build(project)
    assert code == 0, out


def test_unitedllm_variables_from_the_environment_are_fine(project: Path) -> None:
    boot = project / "config" / "bootstrap.sh"
    boot.write_text(
        boot.read_text()
        + 'export UNITEDLLM_MQTT_PASSWORD="$BROKER_PASSWORD"\nexport UNITEDLLM_MQTT_HOST=broker\n'
    )
    code, out = build(project)
    assert code == 0, out


def test_a_file_named_by_rank_keys_path_is_refused_whatever_its_name(project: Path) -> None:
    config = project / "config" / "fedml_config.yaml"
    config.write_text(
        config.read_text().replace("comm_args:\n", "comm_args:\n  rank_keys_path: ranks.yaml\n", 1)
    )
    (project / "config" / "ranks.yaml").write_text("1: k1\n2: k2\n")  # too short for any scanner
    code, out = build(project)
    assert code == 2 and "config/ranks.yaml: named by comm_args.rank_keys_path" in out, out
    assert "k1" not in out.replace("rank_keys", "")
    assert not packaged(project)


def test_references_to_secrets_kept_elsewhere_are_fine(project: Path) -> None:
    (project / "deploy").mkdir()
    (project / "deploy" / "values.yaml").write_text(
        'broker:\n  password: "${MQTT_PASSWORD}"\nstore:\n  secret_access_key: <set on each node>\n'
    )
    code, out = build(project)
    assert code == 0, out


def test_tokenizer_files_and_variable_names_are_not_findings(project: Path) -> None:
    (project / "tokenizer.py").write_text("def load_tokenizer(path):\n    return path\n")
    (project / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    (project / "settings.py").write_text(
        'SECRET_ENV = "UNITEDLLM_PACKAGE_SECRET"\npassword_var = "MQTT_PWD"\n'
    )
    code, out = build(project)
    assert code == 0, out


def test_device_secret_file_and_unwritable_dest_are_clear_errors(project: Path, tmp_path: Path) -> None:
    code, out = build(project, "--secret-file", "/dev/zero")  # would be read forever
    assert code == 2 and "--secret-file /dev/zero: not a regular file" in out
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(
        app,
        [
            "-t",
            "client",
            "-sf",
            str(project),
            "-ep",
            "launch.py",
            "-cf",
            str(project / "config"),
            "-df",
            str(blocker),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "-df/--dest_folder: cannot write" in result.output and "Traceback" not in result.output
