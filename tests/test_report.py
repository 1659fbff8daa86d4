"""`unitedllm report`: plots, HTML and the round table from a real run's metrics, finished or not."""

from __future__ import annotations

import asyncio
import base64
import html as html_lib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from linear_trainer import LinearTrainer
from rich.console import Console
from services import require

from unitedllm.config.types import Config
from unitedllm.errors import UnitedLLMError
from unitedllm.report import summary_table, write_report
from unitedllm.report.data import load_run
from unitedllm.runner import run_async
from unitedllm.tracking import MetricsLog, read_metrics, system_metrics
from unitedllm.training.base import FitResult

pytest.importorskip("matplotlib", reason="matplotlib (unitedllm[tracking]) draws the report")

CHROMIUM = Path("/usr/bin/chromium")
PLOTS = ("eval_loss", "train_loss", "round_time", "bytes")


class TimedLinearTrainer(LinearTrainer):
    """The linear trainer, also reporting its training time like the Hugging Face trainer does."""

    def fit(self, weights: Mapping[str, Any], **kwargs: Any) -> FitResult:
        started = time.perf_counter()
        result = super().fit(weights, **kwargs)
        result.metrics["train_seconds"] = time.perf_counter() - started
        return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-round, 3-client federation with evaluations and system metrics."""
    root = tmp_path_factory.mktemp("runs")
    cfg = msgspec.convert(
        {
            "train_args": {
                "comm_round": 4,
                "client_num_in_total": 3,
                "client_num_per_round": 3,
                "local_max_steps": 3,
                "output_dir": str(root / "{run_id}"),
            },
            "validation_args": {
                "is_aggregator_test": True,
                "test_on_clients": "both",
                "test_on_client_ranks": [1, 2],
            },
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )
    out = root / "rep"
    with (
        MetricsLog(out / "metrics.jsonl") as metrics,
        system_metrics(metrics, rank=0, interval_s=0.01) as sampler,
    ):
        asyncio.run(
            run_async(
                cfg,
                run_id="rep",
                metrics=metrics,
                trainer_factory=lambda _cfg, rank: TimedLinearTrainer(rank),
            )
        )
        deadline = time.monotonic() + 5
        while sampler is not None and sampler.samples < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return out


def copy_run(src: Path, dst: Path, keep: int | None = None, tail: str = "") -> Path:
    """A copy of a run's metrics, cut to the first ``keep`` lines plus a torn ``tail`` (a run still writing)."""
    dst.mkdir(parents=True)
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:keep]) + tail)
    return dst


def png_is_a_chart(data: bytes) -> None:
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (800, 420)
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # lines, labels and antialiasing, not a blank canvas


def test_report_of_a_finished_run(finished_run: Path) -> None:
    page = write_report(finished_run)
    assert page == finished_run / "report" / "report.html"
    pngs = {name: (page.parent / f"{name}.png").read_bytes() for name in (*PLOTS, "system")}
    for data in pngs.values():
        png_is_a_chart(data)

    html = page.read_text()
    embedded = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(pngs.values())
    assert not re.search(r'(src|href)="(?!data:)', html)  # self-contained: nothing to fetch
    last_round = [e for e in read_metrics(finished_run / "metrics.jsonl") if e["event"] == "round"][-1]
    assert f"<td>{last_round['train_loss']:.5g}</td>" in html
    assert "finished · 4 rounds done · 3 clients" in html


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )


# Appended to a copy of the page: after load, report how many images the browser decoded and laid out.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("figure img")];
  const shown = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 100);
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({total: imgs.length, shown: shown.length, alts: shown.map(i => i.alt)});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_its_plots_in_headless_chromium(finished_run: Path, tmp_path: Path) -> None:
    require(None if CHROMIUM.exists() else f"no headless browser at {CHROMIUM} (scripts/test.sh installs it)")
    page = write_report(finished_run)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = _chromium(
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "p1"
    ).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom)
    assert found, f"the page never finished loading in chromium: {dom[-500:]}"
    check = json.loads(html_lib.unescape(found.group(1)))
    assert check["total"] == len(PLOTS) + 1 and check["shown"] == check["total"], check

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri(), profile=tmp_path / "p2")
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 200  # plots drawn, not a blank or error page


def test_summary_table_lists_every_round(finished_run: Path) -> None:
    console = Console(width=100, record=True)
    console.print(summary_table(finished_run))
    text = console.export_text()
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+1,2,3\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    rounds = [e for e in read_metrics(finished_run / "metrics.jsonl") if e["event"] == "round"]
    assert [float(r[2]) for r in rows] == pytest.approx([e["train_loss"] for e in rounds], rel=1e-4)


def test_run_in_progress_with_a_torn_line_still_renders(finished_run: Path, tmp_path: Path) -> None:
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if '"event": "round_start"' in line]
    cut = starts[2] + 2  # round 2 has started, one client update has arrived, the next line is half written
    run_dir = copy_run(finished_run, tmp_path / "live", keep=cut, tail=lines[cut][: len(lines[cut]) // 2])

    page = write_report(run_dir)
    html = page.read_text()
    assert "in progress · 2 rounds done" in html
    assert "1 unreadable line(s)" in html
    assert "has not ended" in html
    assert (page.parent / "train_loss.png").stat().st_size > 10_000
    run = load_run(run_dir)
    assert [r.finished for r in run.rounds.values()] == [True, True, False]
    console = Console(width=100, record=True)
    console.print(summary_table(run))
    assert re.search(r"^\s*2\s+1,2,3\s+running", console.export_text(), re.MULTILINE)


def test_missing_rounds_and_empty_runs_render(finished_run: Path, tmp_path: Path) -> None:
    gappy = tmp_path / "gappy"
    gappy.mkdir()
    kept = [
        line
        for line in (finished_run / "metrics.jsonl").read_text().splitlines()
        if '"round": 1,' not in line
    ]
    (gappy / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    write_report(gappy)
    assert sorted(load_run(gappy).rounds) == [0, 2, 3]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    html = write_report(empty).read_text()
    assert "no round has started yet" in html and "no client updates received yet" in html
    assert not (empty / "report" / "train_loss.png").exists()


def test_a_directory_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnitedLLMError, match=re.escape(str(tmp_path)) + ".*no metrics.jsonl"):
        write_report(tmp_path)
    with pytest.raises(UnitedLLMError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_unitedllm_report_writes_the_page_and_prints_the_table(finished_run: Path, tmp_path: Path) -> None:
    """The installed ``unitedllm report`` command, as a user runs it."""
    out = tmp_path / "out"
    ok = _unitedllm("report", str(finished_run), "--out", str(out))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"report: {out / 'report.html'}" in ok.stdout.replace("\n", "")
    assert (out / "report.html").is_file() and (out / "train_loss.png").is_file()
    rows = [line.split() for line in ok.stdout.splitlines() if re.match(r"\s*\d+\s+1,2,3\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"], ok.stdout

    bad = _unitedllm("report", str(tmp_path / "missing"))
    assert bad.returncode == 1
    text = bad.stdout + bad.stderr
    assert "error:" in text and "missing" in text and "Traceback" not in text


def _unitedllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unitedllm", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
        check=False,
    )


def test_cli_module_imports_no_heavy_packages() -> None:
    code = (
        "import sys, unitedllm.report.cli, unitedllm.tracking; "
        "heavy = [m for m in ('torch', 'matplotlib', 'wandb', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_clients_own_records_render_as_a_report(finished_run: Path) -> None:
    client = load_run(finished_run / "node_1")
    assert client.run_id == "rep/node_1" and client.finished
    rows = client.finished_rounds()
    assert [r.round for r in rows] == [0, 1, 2, 3] and all(r.selected == [1] for r in rows)
    server = load_run(finished_run)
    for row in rows:
        # The client's own train loss is the one the aggregator received from it.
        assert row.train_loss == server.clients[(row.round, 1)].train_loss
        assert row.eval_loss is not None  # rank 1 tests the global model every round
    page = write_report(finished_run / "node_1")
    png_is_a_chart((page.parent / "train_loss.png").read_bytes())
