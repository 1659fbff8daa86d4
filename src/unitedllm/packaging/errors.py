"""Errors of building and running UnitedLLM packages.

UnitedLLMError
└── PackageError         a package cannot be built or run (CLI exit code 2)
    ├── UnsafePackage    an archive entry could escape the workdir, is a link, or is too big
    ├── TamperedPackage  a file does not match the manifest (digest, size, missing or extra)
    ├── UnauthenticatedPackage  no valid signature under a package secret, and no opt-in to run it
    └── BootstrapFailed  ``environment_args.bootstrap`` exited with a non-zero code
"""

from __future__ import annotations

from unitedllm.errors import UnitedLLMError

__all__ = ["BootstrapFailed", "PackageError", "TamperedPackage", "UnauthenticatedPackage", "UnsafePackage"]


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


class UnauthenticatedPackage(PackageError):
    """The package's files match its manifest, but nothing shows who wrote the manifest.

    Without a package secret anyone who can replace the zip can rewrite a file and its manifest
    entry together; only a signature under the secret tells them apart.
    """

    def __init__(self, package: str, *, signed: bool):
        self.package = package
        self.signed = signed
        why = (
            "it is signed, but no package secret was given to check the signature"
            if signed
            else "it is not signed"
        )
        super().__init__(
            f"package {package} is unauthenticated: {why}; give the secret it was signed with"
            " (--secret-file or $UNITEDLLM_PACKAGE_SECRET), or pass --allow-unauthenticated to run it anyway"
        )


class BootstrapFailed(PackageError):
    """The bootstrap script exited with a non-zero code."""

    def __init__(self, script: str, returncode: int):
        self.script = script
        self.returncode = returncode
        super().__init__(
            f"bootstrap script {script} exited with code {returncode}; not starting the entry point"
        )
