"""The self-hosted MLOps platform: a controller (API, page, database, package store) for enrolled agents."""

from unitedllm.platform.errors import CommandRefused, PackageRefused, PlatformError

__all__ = ["CommandRefused", "PackageRefused", "PlatformError"]
