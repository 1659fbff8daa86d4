"""Which files of a project go into a package: ignore globs and .gitignore defaults (secrets: :mod:`.secret_scan`).

Every pattern (the defaults, the user's ``-ig`` globs, the folder's ``.gitignore``) follows git's
rules as ``pathspec`` implements them, the matcher formatters and linters use: a pattern without a
slash matches at any depth, a leading or inner slash anchors it at the folder, a trailing slash
names folders only, ``!`` re-includes, the last matching line wins, and nothing inside an ignored
folder comes back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pathspec

__all__ = [
    "DEFAULT_IGNORES",
    "IgnoreRules",
    "gitignored",
    "parse_ignore_option",
]

# FedML's pre-ignore list plus what a Python project and a UnitedLLM run leave behind
# (.logs holds checkpoints, .unitedllm holds unpacked packages).
DEFAULT_IGNORES: tuple[str, ...] = (
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".DS_Store",
    "dist-packages",
    "client-package.zip",
    "server-package.zip",
    ".venv",
    "venv",
    ".nox",
    ".tox",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    ".logs",
    ".unitedllm",
    ".idea",
    ".vscode",
)


def parse_ignore_option(value: str | None) -> list[str]:
    """FedML's ``-ig`` format: comma-separated globs (``"build,*.ckpt, data/*.bin"``)."""
    if not value:
        return []
    return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]


def _spec(lines: Iterable[str]) -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines(list(lines))


def gitignored(spec: pathspec.GitIgnoreSpec, rel: PurePosixPath, is_dir: bool) -> bool:
    """Git's answer for ``rel`` under ``spec``: it or a folder above it is ignored (folders can't be re-entered)."""
    parts = rel.parts
    for depth in range(1, len(parts) + 1):
        path = "/".join(parts[:depth])
        if spec.match_file(path + "/" if depth < len(parts) or is_dir else path):
            return True
    return False


def _gitignore(folder: Path) -> pathspec.GitIgnoreSpec:
    path = folder / ".gitignore"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return _spec(lines)


_DEFAULTS = _spec(DEFAULT_IGNORES)


@dataclass
class IgnoreRules:
    """Ignore globs for one folder: defaults, the folder's .gitignore, and the user's ``-ig`` globs."""

    user: list[str] = field(default_factory=list)
    gitignore: pathspec.GitIgnoreSpec = field(default_factory=lambda: _spec(()))
    excluded_dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._user = _spec(self.user)

    @classmethod
    def for_folder(cls, folder: Path, user: Iterable[str], excluded_dirs: Iterable[Path] = ()) -> IgnoreRules:
        return cls(list(user), _gitignore(folder), [p.resolve() for p in excluded_dirs])

    def ignored_by_user(self, rel: PurePosixPath, is_dir: bool = False) -> bool:
        """Whether the user's ``-ig`` globs exclude ``rel`` (an explicit choice, so secrets there are fine)."""
        return gitignored(self._user, rel, is_dir)

    def ignored(self, rel: PurePosixPath, absolute: Path) -> bool:
        """Whether ``rel`` (relative to the folder) stays out of the package."""
        if any(absolute == d or absolute.is_relative_to(d) for d in self.excluded_dirs):
            return True
        is_dir = absolute.is_dir()
        if self.ignored_by_user(rel, is_dir) or gitignored(_DEFAULTS, rel, is_dir):
            return True
        return gitignored(self.gitignore, rel, is_dir)
