"""An output dir that cannot be written: one clear line and exit code 1, never a traceback, nothing corrupted.

Real filesystems: a regular file where a folder should be, a read-only tmpfs and a full one
(the mounts need the privilege to mount; without it those two cases are skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "tiny_processes.yaml"


def run_into(output_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    sets = [
        "comm_args.backend=LOCAL",
        f"train_args.output_dir={output_dir}",
        f"data_args.cache_dir={tmp_path / 'cache'}",
        "train_args.comm_round=1",
    ]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "unitedllm",
            "run",
            str(CONFIG),
            "-q",
            *(x for s in sets for x in ("--set", s)),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of this test's own (mounting needs privileges; skipped without them)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_output_dir_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    done = run_into(blocker / "out", tmp_path)
    assert_one_clear_line(done, str(blocker / "out"), "Not a directory")
    assert blocker.read_text() == "keep me\n"


def test_read_only_filesystem(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "earlier.txt").write_text("from before\n")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    done = run_into(tmpfs / "out", tmp_path)
    assert_one_clear_line(done, "Read-only file system")
    assert (tmpfs / "earlier.txt").read_text() == "from before\n"


def test_full_disk(tmpfs: Path, tmp_path: Path) -> None:
    done = run_into(tmpfs / "out", tmp_path)
    assert_one_clear_line(done, "No space left on device")
    for line in (tmpfs / "out" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every record that made it is whole
    assert not (tmpfs / "out" / "node_0" / "final").exists(), "no final model that only looks complete"
