"""The aggregator's agent exports the run's final model as ``unitedllm export`` does and zips it."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

__all__ = ["exported_model_zip"]


def exported_model_zip(run_dir: Path, run_id: str) -> bytes | None:
    """The run's final global adapter exported (:func:`unitedllm.serving.export.export_model`) and
    zipped under ``<run_id>-model/``; ``None`` when ``run_dir`` holds no final model."""
    from unitedllm.platform.final_model import model_folder
    from unitedllm.serving.export import export_model
    from unitedllm.serving.layout import RunFolder

    if not RunFolder.looks_like(run_dir) or not RunFolder(run_dir).final.is_dir():
        return None
    with tempfile.TemporaryDirectory(prefix="unitedllm-final-") as tmp:
        out = Path(tmp) / model_folder(run_id)
        export_model(run_dir, out)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(str(path.relative_to(tmp)), date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, path.read_bytes())
        return buffer.getvalue()
