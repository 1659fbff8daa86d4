"""Where a round's time goes: every rank's phases of every round in metrics.jsonl, and in the report."""

from __future__ import annotations

import asyncio
import html as html_lib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from linear_trainer import LinearTrainer

from unitedllm.config.types import Config
from unitedllm.phases import AGGREGATOR_PHASES, CLIENT_PHASES
from unitedllm.runner import run_async
from unitedllm.tracking.events import decode_event

ROUNDS, CLIENTS = 3, 3


def make_config(tmp_path: Path) -> Config:
    return msgspec.convert(
        {
            "train_args": {
                "comm_round": ROUNDS,
                "client_num_in_total": CLIENTS,
                "client_num_per_round": CLIENTS,
                "local_max_steps": 4,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "validation_args": {"is_aggregator_test": True, "test_on_clients": "both"},
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LOCAL run of 3 rounds with 3 clients, evaluations and checkpoints every round."""
    cfg = make_config(tmp_path_factory.mktemp("phases"))
    result = asyncio.run(run_async(cfg, run_id="ph", trainer_factory=lambda _c, rank: LinearTrainer(rank)))
    return result.output_dir


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def test_every_rank_records_every_phase_of_every_round(local_run: Path) -> None:
    metrics = local_run / "metrics.jsonl"
    rounds = {e["round"]: e for e in events(metrics, "round")}
    assert sorted(rounds) == list(range(ROUNDS))
    trained = {(e["round"], e["rank"]): e for e in events(metrics, "train")}
    assert sorted(trained) == [(r, c) for r in range(ROUNDS) for c in range(1, CLIENTS + 1)]
    for round_idx, row in rounds.items():
        wall = row["seconds"]
        assert set(row["phases"]) == set(AGGREGATOR_PHASES)
        assert all(v >= 0 for v in row["phases"].values()), row
        assert sum(row["phases"].values()) <= wall, row
        for rank in range(1, CLIENTS + 1):
            phases = trained[(round_idx, rank)]["phases"]
            assert set(phases) == set(CLIENT_PHASES), phases
            assert all(v >= 0 for v in phases.values()), phases
            assert sum(phases.values()) <= wall, (round_idx, rank, phases, wall)
    # Every line still reads as its declared event, the phases typed.
    for line in metrics.read_text().splitlines():
        assert decode_event(line) is not None


def test_phases_leave_the_trainers_metrics_and_match_the_clients_own_records(local_run: Path) -> None:
    on_aggregator = {(e["round"], e["rank"]): e for e in events(local_run / "metrics.jsonl", "train")}
    for rank in range(1, CLIENTS + 1):
        own = events(local_run / f"node_{rank}" / "metrics.jsonl", "train")
        assert [e["round"] for e in own] == list(range(ROUNDS))
        for event in own:
            assert event["phases"] == on_aggregator[(event["round"], rank)]["phases"]
            assert not any(key.startswith("phase/") for key in event["metrics"]), event["metrics"]


def test_overlapping_blocks_of_one_phase_count_once() -> None:
    """The aggregator fetches several updates at once: their phase is the time any of them ran, not the sum."""
    from unitedllm.phases import PhaseClock

    clock = PhaseClock(AGGREGATOR_PHASES)
    go = asyncio.Event()

    async def fetch() -> None:
        with clock.phase("fetch"):
            await go.wait()

    async def main() -> None:
        fetches = [asyncio.ensure_future(fetch()) for _ in range(8)]
        await asyncio.sleep(0.05)
        go.set()
        await asyncio.gather(*fetches)

    asyncio.run(main())
    assert 0 < clock.seconds["fetch"] <= clock.wall()


def test_trackers_get_every_phase_as_a_scalar(local_run: Path) -> None:
    from unitedllm.tracking.scalars import scalars_of

    for kind, names in (("round", AGGREGATOR_PHASES), ("train", CLIENT_PHASES)):
        for event in events(local_run / "metrics.jsonl", kind):
            got = {s.tag: s.value for s in scalars_of(event) if s.tag.startswith("phase/")}
            assert got == {f"phase/{n}_s": event["phases"][n] for n in names}, event


def test_the_report_shows_each_ranks_phases(local_run: Path) -> None:
    from unitedllm.report import write_report
    from unitedllm.report.table import PHASE_COLUMNS

    pytest.importorskip("matplotlib", reason="matplotlib (unitedllm[tracking]) draws the report")
    page = write_report(local_run).read_text()
    section = page[page.index("<h2>Where each round's time went</h2>") :]
    section = section[: section.index("</table>")]
    headers = [html_lib.unescape(h) for h in re.findall(r"<th>([^<]*)</th>", section)]
    assert headers == list(PHASE_COLUMNS)
    rows = [
        [html_lib.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", section)[1:]
    ]
    rounds = {e["round"]: e for e in events(local_run / "metrics.jsonl", "round")}
    trained = {(e["round"], e["rank"]): e for e in events(local_run / "metrics.jsonl", "train")}
    assert len(rows) == ROUNDS * (CLIENTS + 1)
    for cells in rows:
        round_idx, who = int(cells[0]), cells[1]
        rank = int(who.split()[0])
        recorded = rounds[round_idx]["phases"] if rank == 0 else trained[(round_idx, rank)]["phases"]
        assert cells[2] == f"{rounds[round_idx]['seconds']:.2f}"
        for header, cell in zip(headers[3:], cells[3:], strict=True):
            phase = header.removesuffix(" s")
            assert cell == (f"{recorded[phase]:.3f}" if phase in recorded else "-"), (cells, header)
    # Each round names its slowest client: the one whose phases add up to the most.
    for round_idx in range(ROUNDS):
        slowest = max(range(1, CLIENTS + 1), key=lambda r: sum(trained[(round_idx, r)]["phases"].values()))
        assert [c[1] for c in rows if c[0] == str(round_idx) and "slowest" in c[1]] == [
            f"{slowest} (slowest)"
        ]


def test_a_run_recorded_without_phases_keeps_the_old_breakdown(local_run: Path, tmp_path: Path) -> None:
    from unitedllm.report import write_report
    from unitedllm.report.data import load_run

    pytest.importorskip("matplotlib", reason="matplotlib (unitedllm[tracking]) draws the report")
    old = tmp_path / "old"
    old.mkdir()
    lines = []
    for line in (local_run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        event.pop("phases", None)
        lines.append(json.dumps(event))
    (old / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(old)
    assert all(run.phase_breakdown(row) is None for row in run.finished_rounds())
    page = write_report(old).read_text()
    assert "Where each round" not in page
    assert "Round time: slowest client&#x27;s train and communication, aggregation, other" in page
    new_page = write_report(local_run).read_text()
    assert "Round time by phase: the slowest client&#x27;s, the aggregator&#x27;s, other" in new_page
