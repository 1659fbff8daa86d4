"""What a client keeps on disk so a restart, of itself or of the aggregator, repeats no work and changes no bytes.

Under ``node_<rank>/``:

* ``trainer_state/before_round_<r>.pt``: the local optimizer/schedule state round r starts from.
  It is written right after round r-1's training, so a client process restarted between rounds
  continues with the state it had, and a round asked for twice is trained from the same state.
* ``sent/last_update.json``: the last update this client sent, with what it answered (the round,
  the global model's digest and the extras' digests). A resumed aggregator asks again for the
  round it lost; when the question is the same and the update's blobs are still in the store,
  the client sends the same update again instead of training the round a second time.
* ``trainer_state/codec_residual_before_round_<r>.safetensors``: with an update codec that feeds
  errors back (``int8``, ``topk``), what round r's encoding adds to its delta; written before round
  r-1's update leaves, so a round trained again encodes to the same bytes.

Snapshots are read with ``torch.load(weights_only=True)``, so a file on disk never runs code: a
trainer's ``state_dict`` must hold only tensors, numbers, strings, lists and dicts (see
:meth:`LocalTrainer.state_dict <unitedllm.training.base.LocalTrainer.state_dict>`). A state that
could not be read back is refused when it is saved, and an unreadable snapshot is a
:class:`TrainingError` naming the file.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from unitedllm.errors import TrainingError
from unitedllm.protocol.messages import BlobRef, RoundStart, Update

if TYPE_CHECKING:
    import torch

    from unitedllm.training.base import LocalTrainer

__all__ = ["ClientJournal"]

log = logging.getLogger(__name__)

_SENT_FILE = "last_update.json"


def _question(start: RoundStart) -> dict[str, Any]:
    """What a round start asks: the round, and the exact global model and extras it starts from."""
    return {
        "round": start.round,
        "global": start.global_ref.digest,
        "extras": {key: ref.digest for key, ref in sorted(start.extras.items())},
    }


class ClientJournal:
    """One client's trainer-state snapshots and its last sent update, in ``folder`` (``node_<rank>``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.states = folder / "trainer_state"
        self.sent = folder / "sent" / _SENT_FILE
        self._held: int | None = None  # the round whose starting state the trainer holds in memory

    # -- trainer state ----------------------------------------------------------------------

    def _snapshot(self, round_idx: int) -> Path:
        return self.states / f"before_round_{round_idx}.pt"

    def align(self, trainer: LocalTrainer, round_idx: int) -> None:
        """Give ``trainer`` the state it had before ``round_idx``: the saved one, else save its current one."""
        if self._held == round_idx:
            return  # saved from this very trainer after the previous round: nothing to load
        snapshot = self._snapshot(round_idx)
        if snapshot.is_file():
            trainer.load_state_dict(_load(snapshot))
            self._held = round_idx
            return
        self.save_state(trainer, round_idx)

    def save_state(self, trainer: LocalTrainer, round_idx: int) -> None:
        """Snapshot ``trainer``'s state as the one ``round_idx`` starts from; keep the previous round's too."""
        import torch

        state = trainer.state_dict()
        self._held = round_idx
        if not state:
            return
        self.states.mkdir(parents=True, exist_ok=True)
        snapshot = self._snapshot(round_idx)
        tmp = snapshot.with_suffix(".tmp")
        torch.save(state, tmp)
        try:
            torch.load(tmp, weights_only=True, mmap=True)  # unpickles the small index; tensors stay on disk
        except _UNREADABLE as exc:
            tmp.unlink(missing_ok=True)
            raise TrainingError(
                f"{type(trainer).__name__}.state_dict() cannot be kept as a trainer-state snapshot: {_why(exc)};"
                " convert other objects to those in state_dict and back in load_state_dict"
            ) from None
        tmp.replace(snapshot)
        for old in self.states.glob("before_round_*.pt"):
            if int(old.stem.rsplit("_", 1)[1]) < round_idx - 1:
                old.unlink(missing_ok=True)

    def _residual_files(self) -> dict[int, Path]:
        found = self.states.glob("codec_residual_before_round_*.safetensors")
        return {int(path.stem.rsplit("_", 1)[1]): path for path in found}

    def residual(self, round_idx: int) -> dict[str, torch.Tensor]:
        """The update codec's error-feedback residual round ``round_idx`` starts from (empty at first).

        That is the newest one saved for a round up to ``round_idx``: a client left out of some
        rounds carries its residual over them.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        files = self._residual_files()
        earlier = [r for r in files if r <= round_idx]
        if not earlier:
            return {}
        path = files[max(earlier)]
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise TrainingError(
                f"cannot load the update codec's residual {path}: {exc}; delete it to start round"
                f" {round_idx} without error feedback, or start the client with a fresh output_dir"
            ) from None

    def save_residual(self, residual: Mapping[str, torch.Tensor], round_idx: int) -> None:
        """Keep ``residual`` as the one round ``round_idx`` starts from (written before the update leaves).

        The one before it is kept too, so a round trained again starts from the residual it had.
        """
        from safetensors.torch import save_file

        self.states.mkdir(parents=True, exist_ok=True)
        path = self.states / f"codec_residual_before_round_{round_idx}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({name: residual[name].contiguous() for name in sorted(residual)}, str(tmp))
        tmp.replace(path)
        files = self._residual_files()
        for old in sorted(files)[:-2]:
            files[old].unlink(missing_ok=True)

    def forget_held_state(self) -> None:
        """The trainer's state changed outside the journal (it trained): load from disk next time."""
        self._held = None

    # -- sent updates -----------------------------------------------------------------------

    def record(self, start: RoundStart, update: Update) -> None:
        """Remember ``update`` as this client's answer to ``start`` (replacing the previous one)."""
        self.sent.parent.mkdir(parents=True, exist_ok=True)
        entry = {"question": _question(start), "update": msgspec.to_builtins(update)}
        tmp = self.sent.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True), encoding="utf-8")
        tmp.replace(self.sent)

    def answer(self, start: RoundStart) -> Update | None:
        """The update already sent for exactly this round start, or ``None``."""
        try:
            entry = json.loads(self.sent.read_text(encoding="utf-8"))
            if entry.get("question") != _question(start):
                return None
            return msgspec.convert(entry["update"], Update)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
            log.warning("ignoring the unreadable record of the last sent update %s: %s", self.sent, exc)
            return None

    @staticmethod
    def blobs(update: Update) -> Mapping[str, BlobRef]:
        """Every blob an update names (its delta and its extras)."""
        return {"delta": update.delta_ref, **update.extras}


# What torch.load raises for a file it refuses (a class outside its allowlist), a damaged one or an empty one.
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)


def _why(exc: BaseException) -> str:
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found:
        return f"it holds a {found.group(1)} object, and snapshots hold only tensors, numbers, strings, lists and dicts"
    return f"it is damaged or not a trainer-state snapshot ({type(exc).__name__})"


def _load(snapshot: Path) -> Any:
    """A trainer-state snapshot, unpickled with only tensors, numbers, strings and containers allowed."""
    import torch

    try:
        return torch.load(snapshot, weights_only=True)
    except _UNREADABLE as exc:
        raise TrainingError(
            f"cannot load the trainer-state snapshot {snapshot}: {_why(exc)}; delete it to start that round"
            " with a fresh optimizer and schedule, or start the client with a fresh output_dir"
        ) from None
