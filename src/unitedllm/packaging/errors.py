"""Errors of building and running UnitedLLM packages.

UnitedLLMError
└── PackageError         a package cannot be built or run (CLI exit code 2)
    ├── UnsafePackage    an archive entry could escape the workdir, is a link, or is too big
    ├── TamperedPackage  a file does not match the manifest (digest, size, missing or extra)
    └── BootstrapFailed  ``environment_args.bootstrap`` exited with a non-zero code
"""

from __future__ import annotations

from unitedllm.errors import UnitedLLMError

__all__ = ["BootstrapFailed", "PackageError", "TamperedPackage", "UnsafePackage"]


class PackageError(UnitedLLMError):
    """A package cannot be built, verified, unpacked or started."""


class UnsafePackage(PackageError):
    """An archive entry is unsafe to unpack; ``member`` names it."""

    def __init__(self, package: str, member: str, reason: str):
        self.package = package
        self.member = member
        self.reason = reason
        super().__init__(f"refusing unsafe package {package}: entry {member!r} {reason}")


class TamperedPackage(PackageError):
    """The package's files do not match its manifest; ``member`` names the first mismatch."""

    def __init__(self, package: str, member: str, reason: str):
        self.package = package
        self.member = member
        self.reason = reason
        super().__init__(f"package {package} failed verification: {member}: {reason}")


class BootstrapFailed(PackageError):
    """The bootstrap script exited with a non-zero code."""

    def __init__(self, script: str, returncode: int):
        self.script = script
        self.returncode = returncode
        super().__init__(
            f"bootstrap script {script} exited with code {returncode}; not starting the entry point"
        )
