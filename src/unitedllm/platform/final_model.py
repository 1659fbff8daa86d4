"""A run's final model on the platform: stored in S3 by digest, downloaded by logins.

When a run's aggregator finishes, its agent exports the final global adapter the way
``unitedllm export`` does (adapter, tokenizer with the training template, generation config,
``prompt_template.json``, model card; :mod:`unitedllm.serving.export`) and uploads it as one zip
whose files sit in the folder ``<run_id>-model/``. The controller checks that the upload comes
from the run's rank 0 and looks like an exported model, stores it under its sha256 and records it
on the run; the run page and ``GET /api/runs/<id>/model`` hand it out with the command that serves it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any

from sqlalchemy import select

from unitedllm.platform.controller import Controller
from unitedllm.platform.errors import PackageRefused, PlatformError
from unitedllm.platform.models import Run, RunMember
from unitedllm.platform.store import MODELS

__all__ = ["FinalModels", "model_filename", "serve_command"]

MAX_MODEL_BYTES = 2 * 2**30
EXPORTED_FILES = ("adapter_config.json", "unitedllm_export.json", "prompt_template.json")


def model_folder(run_id: str) -> str:
    return f"{run_id}-model"


def model_filename(run_id: str) -> str:
    return f"{model_folder(run_id)}.zip"


def serve_command(run_id: str) -> str:
    """The exact commands that unpack the downloaded model and serve it (OpenAI-compatible)."""
    return f"unzip {model_filename(run_id)} && unitedllm serve {model_folder(run_id)}"


def check_model_zip(data: bytes, run_id: str) -> None:
    """An exported model of this run: every file under ``<run_id>-model/``, the export's files there."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise PackageRefused(f"run {run_id}: the uploaded model is not a zip file", status=422) from None
    folder = model_folder(run_id) + "/"
    stray = [n for n in names if not n.startswith(folder) or ".." in n.split("/")]
    if stray:
        raise PackageRefused(
            f"run {run_id}: the uploaded model has {stray[0]!r} outside {folder}", status=422
        )
    missing = [f for f in EXPORTED_FILES if folder + f not in names]
    if missing:
        raise PackageRefused(f"run {run_id}: the uploaded model lacks {missing[0]}", status=422)


class FinalModels:
    """Stores and hands out runs' exported final models."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self.db = controller.db

    def store(self, device_id: str, run_id: str, data: bytes) -> dict[str, Any]:
        """Keep the model rank 0 of ``run_id`` uploaded (only that device may); returns the record."""
        with self.db.session() as s:
            member = s.scalar(
                select(RunMember).where(RunMember.run_id == run_id, RunMember.device_id == device_id)
            )
            if member is None or member.rank != 0:
                raise PlatformError(
                    f"only run {run_id!r}'s aggregator may upload its final model", status=403
                )
        if len(data) > MAX_MODEL_BYTES:
            raise PackageRefused(
                f"run {run_id}: a {len(data)} byte model is over the {MAX_MODEL_BYTES} byte cap", status=413
            )
        check_model_zip(data, run_id)
        digest = hashlib.sha256(data).hexdigest()
        stored = self.controller.store.put_sync(data, MODELS)
        if stored != digest:
            raise PackageRefused(f"run {run_id}: store digest {stored} differs from {digest}")
        record = {"digest": digest, "size": len(data), "filename": model_filename(run_id)}
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise PlatformError(f"no run {run_id!r}", status=404)
            run.model = record
        return record

    def download(self, run_id: str) -> tuple[str, bytes]:
        """The model's file name and bytes (checked against the digest by the store)."""
        from unitedllm.errors import CommError, IntegrityError

        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise PlatformError(f"no run {run_id!r}", status=404)
            record = run.model
        if not record:
            raise PlatformError(f"run {run_id} has no final model (yet)", status=404)
        try:
            data = self.controller.store.get_sync(str(record["digest"]), int(record["size"]), MODELS)
        except IntegrityError as exc:
            raise PackageRefused(f"run {run_id}: the stored model changed ({exc})", status=502) from None
        except CommError as exc:
            raise PlatformError(f"run {run_id}: the store failed: {exc}", status=502) from None
        return str(record["filename"]), data
