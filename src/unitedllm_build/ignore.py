"""Which files of a project go into a package: ignore globs and .gitignore defaults (secrets: :mod:`.secret_scan`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "DEFAULT_IGNORES",
    "GitignoreRule",
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


def _matches(rel: PurePosixPath, pattern: str) -> bool:
    if "/" in pattern:
        # anchored at the folder root, like .gitignore patterns with a slash
        anchored = pattern.lstrip("/")
        return fnmatch.fnmatchcase(rel.as_posix(), anchored) or any(
            fnmatch.fnmatchcase(PurePosixPath(*rel.parts[: i + 1]).as_posix(), anchored)
            for i in range(len(rel.parts) - 1)
        )
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.parts)


@dataclass(frozen=True)
class GitignoreRule:
    """One line of a ``.gitignore``: a glob, whether it re-includes (``!``), whether it names folders only."""

    pattern: str
    negated: bool = False
    dir_only: bool = False

    def matches(self, rel: PurePosixPath, is_dir: bool) -> bool:
        """Whether the rule names ``rel`` itself (its folders are checked one by one by the caller)."""
        if self.dir_only and not is_dir:
            return False
        if "/" in self.pattern:  # anchored at the folder of the .gitignore
            return fnmatch.fnmatchcase(rel.as_posix(), self.pattern.lstrip("/"))
        return fnmatch.fnmatchcase(rel.name, self.pattern)


def _gitignore_rules(folder: Path) -> list[GitignoreRule]:
    path = folder / ".gitignore"
    if not path.is_file():
        return []
    rules: list[GitignoreRule] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated:
            line = line[1:]
        elif line.startswith("\\!"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if line:
            rules.append(GitignoreRule(line, negated=negated, dir_only=dir_only))
    return rules


def gitignored(rules: Iterable[GitignoreRule], rel: PurePosixPath, is_dir: bool) -> bool:
    """Git's answer for ``rel``: the last matching rule wins, and nothing inside an ignored folder comes back."""
    rules = list(rules)
    for depth in range(1, len(rel.parts) + 1):
        prefix = PurePosixPath(*rel.parts[:depth])
        folder = depth < len(rel.parts) or is_dir
        state = False
        for rule in rules:
            if rule.matches(prefix, folder):
                state = not rule.negated
        if state:
            return True
    return False


@dataclass
class IgnoreRules:
    """Ignore globs for one folder: defaults, the folder's .gitignore, and the user's ``-ig`` globs."""

    user: list[str] = field(default_factory=list)
    gitignore: list[GitignoreRule] = field(default_factory=list)
    excluded_dirs: list[Path] = field(default_factory=list)

    @classmethod
    def for_folder(cls, folder: Path, user: Iterable[str], excluded_dirs: Iterable[Path] = ()) -> IgnoreRules:
        return cls(list(user), _gitignore_rules(folder), [p.resolve() for p in excluded_dirs])

    def ignored_by_user(self, rel: PurePosixPath) -> bool:
        """Whether the user's ``-ig`` globs exclude ``rel`` (an explicit choice, so secrets there are fine)."""
        return any(_matches(rel, p) for p in self.user)

    def ignored(self, rel: PurePosixPath, absolute: Path) -> bool:
        """Whether ``rel`` (relative to the folder) stays out of the package."""
        if any(absolute == d or absolute.is_relative_to(d) for d in self.excluded_dirs):
            return True
        if self.ignored_by_user(rel) or any(_matches(rel, p) for p in DEFAULT_IGNORES):
            return True
        return gitignored(self.gitignore, rel, absolute.is_dir())
