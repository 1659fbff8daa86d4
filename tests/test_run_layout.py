"""RunLayout names every path of a run folder, and the run writes exactly there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from linear_trainer import LinearTrainer

from unitedllm.config.types import Config
from unitedllm.run_layout import RunLayout
from unitedllm.runner import run_async


def test_a_runs_folder_is_where_run_layout_says(tmp_path: Path) -> None:
    cfg = msgspec.convert(
        {
            "train_args": {
                "comm_round": 2,
                "client_num_in_total": 2,
                "client_num_per_round": 2,
                "local_max_steps": 2,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "validation_args": {"save_frequency": 1},
            "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
        },
        Config,
    )
    result = asyncio.run(run_async(cfg, run_id="laid-out", trainer_factory=lambda _c, r: LinearTrainer(r)))
    layout = RunLayout(result.output_dir)
    assert result.final_dir == layout.final()
    expected = [
        layout.metrics(),
        layout.init(),
        layout.final(),
        layout.resume_point,
        *(layout.round_dir(r) for r in range(2)),
    ]
    for rank in (1, 2):
        expected += [
            layout.metrics(rank),
            layout.init(rank),
            layout.final(rank),
            layout.sent(rank),
            *(layout.round_dir(r, rank=rank, stage="before_agg") for r in range(2)),
            layout.round_dir(0, rank=rank, stage="after_agg"),
        ]
    missing = [str(p.relative_to(layout.root)) for p in expected if not p.exists()]
    assert missing == []
    # Nothing at the top of node folders that the layout does not name.
    # (trainer_state/ holds the trainer's optimizer state: the linear trainer has none)
    named = {p.name for p in expected} | {"round_1_after_agg", layout.trainer_state(1).name}
    for rank in (0, 1, 2):
        unnamed = {c.name for c in layout.node(rank).iterdir()} - named
        assert unnamed == set(), (rank, unnamed)
    # Readers (serving, export) find the same folders by asking the layout back.
    assert layout.is_run() and not RunLayout(tmp_path).is_run()
    assert layout.ranks() == [0, 1, 2]
    assert layout.rounds() == {r: layout.round_dir(r) for r in range(2)}
    assert layout.rounds(rank=1, stage="before_agg") == {
        r: layout.round_dir(r, rank=1, stage="before_agg") for r in range(2)
    }
    assert layout.tensorboard(2) == layout.node(2) / "tensorboard"
