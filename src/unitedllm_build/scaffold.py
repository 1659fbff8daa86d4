"""``unitedllm-build init``: a ready project (config, bootstrap, launch entry point, run scripts) from the
repository's ``templates/``, shipped as package data."""

from __future__ import annotations

import shutil
from pathlib import Path

from unitedllm_build.errors import BuildError

__all__ = ["PROJECT_TEMPLATE", "create_project", "templates_dir"]

PROJECT_TEMPLATE = "project"


def templates_dir() -> Path:
    """Where the templates live: ``unitedllm_build/templates`` (package data in a wheel; in a checkout, a
    link to the repository's ``templates/``)."""
    here = Path(__file__).resolve().parent / "templates"
    if not (here / PROJECT_TEMPLATE).is_dir():
        raise BuildError(f"UnitedLLM's project templates are missing from {here}; reinstall unitedllm")
    return here


def create_project(target: Path, *, force: bool = False) -> list[Path]:
    """Copy the project template into ``target``; refuse a non-empty folder unless ``force``."""
    if target.exists() and not target.is_dir():
        raise BuildError(f"init {target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise BuildError(f"init {target}: folder is not empty (use --force to write into it anyway)")
    source = templates_dir() / PROJECT_TEMPLATE
    created: list[Path] = []
    for path in sorted(source.rglob("*")):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        # scripts must stay runnable whatever the checkout's file modes are
        dest.chmod(0o755 if path.suffix == ".sh" else 0o644)
        created.append(dest)
    return created
