"""``unitedllm serve`` refuses bad command lines with one line and exit 2, before loading any model."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from serving_support import cli
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
        (["--api-key", ""], "--api-key: a key is empty"),
        (["--api-key", "k1", "--api-key", " "], "--api-key: a key is empty"),
        (["--host", "no-such-host.invalid", "--api-key", "k"], "--host: no-such-host.invalid:"),
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


@pytest.mark.parametrize(
    ("port", "says"), [("99999", "less than or equal to 65535"), ("0", "greater than or equal to 1")]
)
def test_a_port_out_of_range_is_a_usage_error(trained_run: Path, port: str, says: str) -> None:
    done = cli("serve", str(trained_run), "--port", port, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '--port': Input should be {says}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_taken_port_is_refused_before_any_model_loads(trained_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(trained_run), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"--port: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    assert len(result.output.strip().splitlines()) == 1  # no "loaded ..." line: it stopped first


def test_a_run_without_its_base_yet(tmp_path: Path) -> None:
    (tmp_path / "node_0" / "init").mkdir(parents=True)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", str(_free_port())])
    assert result.exit_code == 1, result.output
    assert "holds no model yet" in result.output and len(result.output.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
