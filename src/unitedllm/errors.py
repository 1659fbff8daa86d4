"""Exceptions raised by UnitedLLM.

Every error the library raises on purpose derives from one root::

    UnitedLLMError
    ├── ConfigError          a config file, override or value is wrong (CLI exit code 2)
    ├── ProtocolError        a message or blob failed decoding, signature or digest checks
    │   └── IntegrityError   blob bytes do not match their sha256 digest
    ├── CommError            a transport or blob store failed (broker, S3, network)
    │   └── BlobNotFound     a blob is not (or no longer) in the store
    ├── RoundError           a round could not complete (deadline passed without quorum, ...)
    ├── UpdateRejected       a client update failed validation (names, shapes, dtypes, finiteness)
    ├── TrainingError        local training or evaluation failed
    └── MissingDependency    an optional package is needed; names the extra to install
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BlobNotFound",
    "CommError",
    "ConfigError",
    "ConfigProblem",
    "IntegrityError",
    "MissingDependency",
    "ProtocolError",
    "RoundError",
    "TrainingError",
    "UnitedLLMError",
    "UpdateRejected",
]


class UnitedLLMError(Exception):
    """Root of every error UnitedLLM raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: where it is (YAML path) and what is wrong."""

    path: str
    message: str
    source: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}"


class ConfigError(UnitedLLMError):
    """A config is invalid; ``problems`` lists each problem with its YAML path."""

    def __init__(self, problems: list[ConfigProblem] | ConfigProblem | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [ConfigProblem("", problems, source)]
        elif isinstance(problems, ConfigProblem):
            problems = [problems]
        self.problems: list[ConfigProblem] = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"invalid config {self.source}" if self.source else "invalid config"
        if len(self.problems) == 1:
            return f"{head}: {self.problems[0]}"
        lines = [f"{head} ({len(self.problems)} problems):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ProtocolError(UnitedLLMError):
    """A message or payload could not be decoded or failed its checks."""


class IntegrityError(ProtocolError):
    """Blob bytes do not match the sha256 digest they were addressed by."""

    def __init__(self, expected: str, actual: str, *, where: str = ""):
        self.expected = expected
        self.actual = actual
        suffix = f" ({where})" if where else ""
        super().__init__(f"blob digest mismatch{suffix}: expected sha256 {expected}, got {actual}")


class CommError(UnitedLLMError):
    """A transport or blob store operation failed."""


class BlobNotFound(CommError):
    """A blob is not in the store: never written, or deleted when its round closed."""


class RoundError(UnitedLLMError):
    """A federated round could not complete."""


class UpdateRejected(UnitedLLMError):
    """A client update failed validation and was not aggregated."""

    def __init__(self, reason: str, *, rank: int | None = None, round_idx: int | None = None):
        self.reason = reason
        self.rank = rank
        self.round_idx = round_idx
        who = f"client {rank}" if rank is not None else "client"
        when = f" in round {round_idx}" if round_idx is not None else ""
        super().__init__(f"update from {who}{when} rejected: {reason}")


class TrainingError(UnitedLLMError):
    """Local training or evaluation failed."""


class MissingDependency(UnitedLLMError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package = package
        self.extra = extra
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'unitedllm[{extra}]'")
