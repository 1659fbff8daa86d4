"""Running UnitedLLM packages: verify the manifest, unpack safely, bootstrap, launch the role."""

from unitedllm.packaging.errors import (
    BootstrapFailed,
    PackageError,
    TamperedPackage,
    UnauthenticatedPackage,
    UnsafePackage,
)
from unitedllm.packaging.manifest import FileEntry, Manifest

__all__ = [
    "BootstrapFailed",
    "FileEntry",
    "Manifest",
    "PackageError",
    "TamperedPackage",
    "UnauthenticatedPackage",
    "UnsafePackage",
]
