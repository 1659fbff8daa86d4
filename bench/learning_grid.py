"""The learning bench over a grid of settings: local steps x rounds x seeds, each rule vs data-parallel.

Each cell is one ``bench/learning.py`` comparison (the same model, data, held-out set and
equal compute) at K local steps, R rounds and one ``train_args.seed``, with data-parallel
training as the baseline (``centralized 8x batch``: R·K steps at batch N·B, the same examples).
Every finished cell is written to ``--out-dir`` as ``cell-k<K>-r<R>-s<seed>.json`` at once, so a
grid can be run a few cells at a time (cells already there are skipped) and summarised later:

    python bench/learning_grid.py --out-dir bench/results/learning-grid                   # the whole grid
    python bench/learning_grid.py --out-dir DIR --cells 10:6:7,4:4:1234                   # chosen cells
    python bench/learning_grid.py --out-dir DIR --summarize --out bench/results/learning-grid.json

Per cell and rule the summary gives the final held-out loss, its gap to data-parallel (nats and
%), the worst round-over-round rise of the eval loss, and whether the rule meets the target (within
1% of data-parallel, no rise over 0.1 nats). Flags other than the grid's go to every cell as they
would to ``bench/learning.py`` (``--optimizers``, ``--eval-examples``, ``--max-seq-length``, ``--set``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
BASELINE_PREFIX = "centralized "  # the data-parallel row: "centralized <N>x batch"
TARGET_GAP = 0.01  # the best federated rule within 1% of data-parallel
TARGET_RISE = 0.1  # and no round-over-round rise above 0.1 nats


def _learning() -> Any:
    spec = importlib.util.spec_from_file_location("bench_learning", HERE / "learning.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class UsageError(Exception):
    """A bad flag: printed as one line, exit 2."""


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: expected integers of at least 1")
    return values


def cells(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The (local steps, rounds, seed) cells to run, in order."""
    if args.cells:
        out = []
        for item in args.cells.split(","):
            parts = item.split(":")
            if len(parts) != 3:
                raise UsageError(f"--cells {item!r}: expected K:R:SEED")
            k, r, s = _ints(",".join(parts), "--cells")
            out.append((k, r, s))
        return out
    return list(
        itertools.product(
            _ints(args.local_steps, "--local-steps"),
            _ints(args.rounds, "--rounds"),
            _ints(args.seeds, "--seeds"),
        )
    )


def cell_path(out_dir: Path, k: int, r: int, seed: int) -> Path:
    return (
        out_dir / f"cell-k{k}-r{r}-s{seed}.json"
    )  # summarize also reads cell-k<K>-r<R>-s<seed>-<label>.json


def summarize_cell(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per federated rule of a cell: final loss, gap to data-parallel, worst rise, target met."""
    methods = report["methods"]
    base = next((m for m in methods if m["name"].startswith(BASELINE_PREFIX)), None)
    dp = base["final_eval_loss"] if base else None
    s = report["settings"]
    rows = []
    for m in methods:
        if m["kind"] != "federated":
            continue
        final, rise = m["final_eval_loss"], m.get("worst_rise")
        gap = None if final is None or dp is None else final - dp
        rows.append(
            {
                "local_steps": s["local_steps"],
                "rounds": s["rounds"],
                "seed": s.get("seed"),
                "rule": m["name"],
                "final_eval_loss": final,
                "data_parallel": dp,
                "gap": gap,
                "gap_percent": None if gap is None or not dp else 100.0 * gap / dp,
                "worst_rise": rise,
                "meets_target": (
                    gap is not None
                    and dp is not None
                    and gap <= TARGET_GAP * dp
                    and (rise is None or rise <= TARGET_RISE)
                ),
            }
        )
    return rows


def summarize(out_dir: Path) -> dict[str, Any]:
    """Every cell JSON under ``out_dir`` as one document: the cells' rows, and the cells themselves.

    Files of the same cell (``cell-k<K>-r<R>-s<seed>*.json``, e.g. a rule run on its own later,
    with ``--optimizers RULE --centralized none``) are merged: their methods form one cell. A file
    run with ``--set`` overrides names them after its rules (``FedAvg + train_args.x=y``).
    """
    merged: dict[tuple[int, int, int], dict[str, Any]] = {}
    for path in sorted(out_dir.glob("cell-*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        if "methods" not in report:
            continue
        s = report["settings"]
        key = (s["local_steps"], s["rounds"], s.get("seed") or 0)
        if s.get("overrides"):  # e.g. --set train_args.local_optimizer_state=reset: the rule's name says so
            for m in report["methods"]:
                m["name"] = f"{m['name']} + {', '.join(s['overrides'])}"
        if key in merged:
            merged[key]["methods"].extend(report["methods"])
            merged[key].setdefault("files", []).append(path.name)
        else:
            merged[key] = {**report, "files": [path.name]}
    reports = [merged[k] for k in sorted(merged)]
    return {
        "benchmark": "learning-grid",
        "target": {"gap_fraction_of_data_parallel": TARGET_GAP, "worst_rise_nats": TARGET_RISE},
        "rows": [row for r in reports for row in summarize_cell(r)],
        "cells": reports,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(doc: dict[str, Any], out: TextIO) -> None:
    """A markdown table: one row per cell and rule."""
    print("| K | R | seed | rule | final | data-parallel | gap | worst rise | target |", file=out)
    print("|---:|---:|---:|---|---:|---:|---:|---:|---|", file=out)
    for row in doc["rows"]:
        print(
            f"| {row['local_steps']} | {row['rounds']} | {row['seed']} | {row['rule']} | "
            f"{_fmt(row['final_eval_loss'], '.3f')} | {_fmt(row['data_parallel'], '.3f')} | "
            f"{_fmt(row['gap'], '+.3f')} ({_fmt(row['gap_percent'], '+.1f')}%) | {_fmt(row['worst_rise'], '+.3f')} | "
            f"{'met' if row['meets_target'] else 'not met'} |",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, required=True, help="one JSON per finished cell")
    parser.add_argument("--local-steps", default="4,10,25", help="K values (default: %(default)s)")
    parser.add_argument("--rounds", default="4,8", help="R values (default: %(default)s)")
    parser.add_argument("--seeds", default="1234,7", help="train_args.seed values (default: %(default)s)")
    parser.add_argument("--cells", help="run only these cells, K:R:SEED,... (instead of the product)")
    parser.add_argument(
        "--summarize", action="store_true", help="run nothing: summarise the cells in --out-dir"
    )
    parser.add_argument("--out", type=Path, help="with --summarize: write the summary JSON here")
    args, rest = parser.parse_known_args(argv)
    if args.summarize:
        if not any(args.out_dir.glob("cell-*.json")):
            print(
                f"bench/learning_grid.py: --out-dir {args.out_dir}: no cell-*.json to summarise",
                file=sys.stderr,
            )
            return 2
        doc = summarize(args.out_dir)
        if args.out:
            args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print_summary(doc, sys.stdout)
        return 0
    try:
        todo = cells(args)
    except UsageError as exc:
        print(f"bench/learning_grid.py: {exc}", file=sys.stderr)
        return 2
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"bench/learning_grid.py: --out-dir {args.out_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    learning = _learning()
    for k, r, seed in todo:
        path = cell_path(args.out_dir, k, r, seed)
        if path.is_file():
            print(f"learning_grid: K={k} R={r} seed={seed}: already in {path}", file=sys.stderr)
            continue
        flags = [*rest, "--local-steps", str(k), "--rounds", str(r), "--seed", str(seed)]
        if "--centralized" not in rest:
            flags += ["--centralized", "batch"]
        print(f"learning_grid: K={k} R={r} seed={seed} ...", file=sys.stderr, flush=True)
        status = learning.main([*flags, "--out", str(path)])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
