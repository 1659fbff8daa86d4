"""``unitedllm-build``: validate a run's config and bundle code + config into server/client packages."""

from unitedllm_build.errors import BuildError, EntryPointMissing, SecretsInPackage

__all__ = ["BuildError", "EntryPointMissing", "SecretsInPackage"]
