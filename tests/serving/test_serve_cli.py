"""``unitedllm serve`` refuses bad command lines with one line and exit 2, before loading any model."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from unitedllm.cli import app


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--host", "0.0.0.0"], "--host: 0.0.0.0 is not loopback: give --api-key"),
        (["--engine", "vllm"], "--engine: vllm: the 'vllm' package is not installed"),
        (["--adapter", "oops"], "--adapter: 'oops' is not NAME=PATH"),
        (["--adapter", "x=/no/such/dir"], "--adapter: x=/no/such/dir: no PEFT adapter there"),
        (["--adapter", "global=RUN/node_1/round_0_before_agg"], "'global' is a reserved model name"),
    ],
)
def test_bad_serve_options(trained_run: Path, args: list[str], says: str) -> None:
    args = [a.replace("RUN", str(trained_run)) for a in args]
    result = CliRunner().invoke(app, ["serve", str(trained_run), *args])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_targets(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "TARGET:" in result.output and "does not exist" in result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run folder" in result.output


def test_a_run_without_its_base_yet(tmp_path: Path) -> None:
    (tmp_path / "node_0" / "init").mkdir(parents=True)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", "1"])
    assert result.exit_code == 1, result.output
    assert "holds no model yet" in result.output and len(result.output.strip().splitlines()) == 1
