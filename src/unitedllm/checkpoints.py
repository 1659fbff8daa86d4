"""Checkpoint layout and atomic writes: ``<output_dir>/node_<rank>/{init, round_<r>_before_agg, round_<r>_after_agg, final}``.

A checkpoint directory is written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint that looks complete. The aggregator's checkpoints
(each round's global model and ``final``) also record the sha256 of every file they hold in
``SHA256SUMS`` (``sha256sum -c`` reads it), written before the rename: whoever loads the global
model later (``unitedllm serve --follow``) refuses bytes that changed after the aggregator wrote them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.errors import UnitedLLMError
from unitedllm.run_layout import RunLayout

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIGESTS_FILE",
    "SERVER_STATE_FILE",
    "OutputWriteError",
    "atomic_dir",
    "load_resume_point",
    "node_dir",
    "read_digests",
    "read_server_state",
    "round_dir",
    "save_init",
    "save_resume_point",
    "save_server_checkpoint",
    "write_digests",
    "write_server_state",
]

SERVER_STATE_FILE = "server_state.json"
OPTIMIZER_STATE_FILE = "server_optimizer.safetensors"
DIGESTS_FILE = "SHA256SUMS"


def node_dir(output_dir: Path, rank: int) -> Path:
    """The folder of one rank's checkpoints (``node_0`` is the aggregator)."""
    return RunLayout(output_dir).node(rank)


def round_dir(output_dir: Path, rank: int, round_idx: int, stage: str) -> Path:
    """``node_<rank>/round_<r>_<stage>`` where stage is ``before_agg`` or ``after_agg``."""
    return RunLayout(output_dir).round_dir(round_idx, rank=rank, stage=stage)  # type: ignore[arg-type]


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise OutputWriteError(target, exc) from None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(exc):
            raise OutputWriteError(target, exc) from None
        raise


class OutputWriteError(UnitedLLMError):
    """A checkpoint could not be written (disk full, read-only, not a directory); nothing complete was replaced."""

    def __init__(self, target: Path, cause: BaseException):
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        self.target = target
        super().__init__(f"cannot write the checkpoint {target}: {reason}")


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or the I/O error safetensors reports in its own exception type."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)


def save_init(
    trainer: Any, target: Path, weights: Mapping[str, torch.Tensor], *, random_base: bool, adopt: bool = True
) -> None:
    """``node_<rank>/init``: the randomly initialised base where there is one, else the initial weights.

    A random base is written in place (not renamed) because LoRA adapters saved later record this
    exact path as their base; ``adopt`` is passed to the trainer's ``save_base``.
    """
    if random_base:
        shutil.rmtree(target, ignore_errors=True)
        try:
            if trainer.save_base(target, adopt=adopt):
                return
        except Exception as exc:
            if _is_write_failure(exc):
                raise OutputWriteError(target, exc) from None
            raise
    with atomic_dir(target) as tmp:
        trainer.save_model(weights, tmp)


def write_server_state(
    directory: Path, *, round_idx: int, optimizer_state: Mapping[str, torch.Tensor], extra: dict[str, Any]
) -> None:
    """Save the aggregator's state beside a checkpoint: optimizer tensors + JSON (round, RNG, ...)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(directory / OPTIMIZER_STATE_FILE))
    (directory / SERVER_STATE_FILE).write_text(
        json.dumps({"round": round_idx, **extra}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def read_server_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What :func:`write_server_state` wrote."""
    from safetensors.torch import load_file

    meta = json.loads((directory / SERVER_STATE_FILE).read_text(encoding="utf-8"))
    state = load_file(str(directory / OPTIMIZER_STATE_FILE))
    return meta, state


GLOBAL_WEIGHTS_FILE = "global.safetensors"


def save_resume_point(
    output_dir: Path,
    *,
    round_idx: int,
    encoded_weights: bytes,
    optimizer_state: Mapping[str, torch.Tensor],
    extra: dict[str, Any],
) -> None:
    """Replace ``node_0/last`` with the exact state after ``round_idx``: global weights, optimizer state, round.

    ``encoded_weights`` is the global model's payload (:func:`~unitedllm.protocol.payload.encode_tensors`).
    """
    with atomic_dir(RunLayout(output_dir).resume_point) as tmp:
        (tmp / GLOBAL_WEIGHTS_FILE).write_bytes(encoded_weights)
        write_server_state(tmp, round_idx=round_idx, optimizer_state=optimizer_state, extra=extra)


def load_resume_point(
    output_dir: Path,
) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last complete round, global weights, optimizer state and metadata; ``None`` when nothing was saved."""
    from unitedllm.protocol.payload import decode_tensors

    directory = RunLayout(output_dir).resume_point
    if not (directory / SERVER_STATE_FILE).is_file():
        return None
    meta, state = read_server_state(directory)
    weights = decode_tensors((directory / GLOBAL_WEIGHTS_FILE).read_bytes())
    return int(meta["round"]), weights, state, meta


def save_server_checkpoint(
    trainer: Any,
    weights: Mapping[str, torch.Tensor],
    target: Path,
    state: Mapping[str, torch.Tensor],
    *,
    round_idx: int,
    run_id: str,
) -> None:
    """The aggregator's model at ``target`` with its optimizer state, written atomically."""
    with atomic_dir(target) as tmp:
        trainer.save_model(weights, tmp)
        write_server_state(tmp, round_idx=round_idx, optimizer_state=state, extra={"run_id": run_id})
        write_digests(tmp)


def file_digest(path: Path) -> str:
    """The sha256 (hex) of one file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_digests(directory: Path) -> None:
    """``SHA256SUMS`` in ``directory``: one ``<sha256>  <name>`` line per file beside it, as sha256sum writes."""
    lines = [
        f"{file_digest(path)}  {path.name}\n"
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != DIGESTS_FILE
    ]
    (directory / DIGESTS_FILE).write_text("".join(lines), encoding="utf-8")


def read_digests(directory: Path) -> dict[str, str] | None:
    """File name -> sha256 as ``SHA256SUMS`` records it; ``None`` when the folder has no such record.

    A line that is not ``<64 hex>  <name>`` is left out, so a damaged record checks nothing it garbled.
    """
    try:
        text = (directory / DIGESTS_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    recorded: dict[str, str] = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and name and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            recorded[name.lstrip("*")] = digest
    return recorded
