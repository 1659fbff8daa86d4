"""Errors of ``unitedllm-build`` (each is a user mistake: the CLI prints it and exits 2).

UnitedLLMError
├── ConfigError              the config in the config folder is invalid (from unitedllm.errors)
└── PackageError             (from unitedllm.packaging)
    └── BuildError           a package cannot be built from these inputs
        ├── EntryPointMissing  the entry point is not in the source folder (or is ignored)
        └── SecretsInPackage   credential files or inline credentials would be packaged
"""

from __future__ import annotations

from unitedllm.packaging.errors import PackageError

__all__ = ["BuildError", "EntryPointMissing", "SecretsInPackage"]


class BuildError(PackageError):
    """A package cannot be built from the given folders and options."""


class EntryPointMissing(BuildError):
    """The entry point does not exist in the source folder or would not be packaged."""


class SecretsInPackage(BuildError):
    """Files or config values holding credentials would end up in the package; ``found`` lists them."""

    def __init__(self, found: list[str]):
        self.found = found
        listing = "\n".join(f"  - {item}" for item in found)
        super().__init__(
            "refusing to package credentials (packages are uploaded and shared):\n"
            f"{listing}\n"
            "Keep them on each node instead (comm_args.mqtt_config_path / s3_config_path, UNITEDLLM_*"
            " variables), exclude them with -ig, pass --drop-secrets to leave those files out with a"
            " warning, or, for a false positive, --allow-secret PATH[:LINE]."
        )
