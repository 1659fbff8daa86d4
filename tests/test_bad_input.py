"""Bad input never tracebacks: hostile configs and CLI misuse get one clear line each, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unitedllm.config import load_config
from unitedllm.config.cli_support import format_problems
from unitedllm.errors import ConfigError
from unitedllm_build.cli import app as build_app

ROOT = Path(__file__).resolve().parents[1]

# name -> (config text, what the one error line must say)
HOSTILE: dict[str, tuple[str, str]] = {
    "nul_escape": ('data_args:\n  dataset: "a\\0b"\n', "data_args.dataset: control character U+0000"),
    "control_char": ("data_args:\n  dataset: a\x01b\n", "control character U+0001 at line 2, column 13"),
    "nested_3000": ("data_args:\n  dataset_path: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    "digits_5000": ("model_args:\n  lora_r: " + "9" * 5000 + "\n", "an integer of 5000 digits is too large"),
    "lora_r_too_big": (
        "model_args:\n  lora_r: 10000000\n",
        "model_args.lora_r: expected int >= 1 and <= 65536",
    ),
    "seed_too_big": (
        "common_args:\n  random_seed: 99999999999999999999999\n",
        "common_args.random_seed: expected int >= 0 and <= 4294967295",
    ),
    "vocab_too_big": (
        "model_args:\n  train_tokenizer_vocab_size: 99999999999999999999\n",
        "model_args.train_tokenizer_vocab_size: expected int >= 1 and <= 16777216",
    ),
    "c1_control_char": ("data_args:\n  dataset: a\x80b\n", "control character U+0080 at line 2, column 13"),
    "vocab_override_too_big": (
        "model_args:\n  model_config_overrides:\n    vocab_size: 1000000000000\n",
        "model_args.model_config_overrides.vocab_size: an integer of 13 digits is too large",
    ),
    "yaml_syntax": ("train_args:\n  comm_round: [1, 2\n", "YAML syntax error at line"),
}


def unitedllm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # No COLUMNS: stderr is a pipe, as in `unitedllm run x.yaml 2>&1 | grep ...`.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "unitedllm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_is_one_config_error_in_the_library(tmp_path: Path, name: str) -> None:
    text, expected = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = format_problems(info.value).splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_in_validate_is_one_line_and_exit_2(tmp_path: Path, name: str) -> None:
    text, expected = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(build_app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert expected in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["nul_escape", "nested_3000", "digits_5000", "seed_too_big"])
def test_hostile_config_in_run_is_one_unwrapped_line_and_exit_2(tmp_path: Path, name: str) -> None:
    text, expected = HOSTILE[name]
    path = tmp_path / f"{name}-with-a-long-file-name-so-the-error-line-is-well-over-eighty-columns.yaml"
    path.write_text(text, encoding="utf-8")
    proc = unitedllm("run", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # not wrapped at 80 columns although stderr is a pipe
    assert expected in lines[0] and path.name in lines[0]


def test_mapping_nested_thousands_deep_is_a_config_error() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(3000):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="nested more than"):
        load_config({"model_args": {"model_config_overrides": deep}})


def test_huge_python_int_is_named_without_crashing() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"model_args": {"lora_r": 10**5000}})
    assert "model_args.lora_r" in str(info.value) and "digits" in str(info.value)


def test_dev_zero_and_a_fifo_are_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    for source in (Path("/dev/zero"), fifo):
        proc = unitedllm("run", str(source))  # would hang reading forever without the check
        assert proc.returncode == 2, proc.stderr
        assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_oversized_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (2 * 1024 * 1024) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="over 1024 KiB"):
        load_config(path)


def test_dev_services_port_over_65535_is_a_clear_error() -> None:
    proc = unitedllm("dev-services", "--mqtt-port", "70000")
    assert proc.returncode == 2
    assert "--mqtt-port: 70000 is not a TCP port" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_error_is_one_plain_line_when_piped() -> None:
    option = "--no-such-option-" + "x" * 90  # longer than the 80 columns rich would wrap at
    proc = unitedllm("run", option, "config.yaml")
    assert proc.returncode == 2
    assert f"Error: No such option: {option}" in proc.stderr.splitlines()
    assert "╭" not in proc.stderr


def test_package_runner_module_usage_error_is_one_plain_line_when_piped() -> None:
    """``python -m unitedllm.packaging`` (how agents start roles) answers like ``unitedllm package``."""
    proc = subprocess.run(
        [sys.executable, "-m", "unitedllm.packaging", "run", "pkg.zip"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Error: Missing option '--rank'." in proc.stderr.splitlines()
    assert "╭" not in proc.stderr


def test_every_number_in_the_schema_has_both_bounds() -> None:
    from unitedllm.config import config_schema

    unbounded: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("integer", "number"):
                low = "minimum" in node or "exclusiveMinimum" in node
                high = "maximum" in node or "exclusiveMaximum" in node
                if not (low and high):
                    unbounded.append(path)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(config_schema(), "$")
    assert unbounded == []
