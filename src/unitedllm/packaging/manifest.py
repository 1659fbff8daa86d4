"""The package manifest: what a UnitedLLM package holds, with the sha256 and size of every file.

``unitedllm-build`` writes it as ``<type>-package/manifest.json`` inside the zip;
``unitedllm package run`` refuses a package whose files differ from it. Its JSON Schema
(``schemas/package-manifest.schema.json``) is generated from :class:`Manifest`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "SECRET_ENV",
    "FileEntry",
    "Manifest",
    "decode_manifest",
    "encode_manifest",
    "manifest_schema",
    "read_package_secret",
    "render_schema",
    "sign_manifest",
    "signature_matches",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION: Literal[1] = 1

Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$", description="Lower-case hex sha256")]
RelPath = Annotated[
    str,
    Meta(
        pattern=r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\\]+$",
        description="POSIX path relative to the package root folder, no '..'",
    ),
]
PackageType = Literal["server", "client"]


class FileEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One file of the package: path relative to ``<type>-package/``, sha256 and size in bytes."""

    path: RelPath
    sha256: Sha256
    size: Annotated[int, Meta(ge=0)]


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a UnitedLLM package holds; every file except the manifest itself is listed."""

    manifest_version: Literal[1] = MANIFEST_VERSION
    package_type: PackageType
    root: Annotated[str, Meta(description="Top folder of the zip: '<type>-package'")]
    entry_point: Annotated[RelPath, Meta(description="Entry file, relative to the package root")]
    conf_file: Annotated[str, Meta(description="Config file, relative to the source folder 'fedml/'")]
    config_sha256: Annotated[Sha256, Meta(description="sha256 of the config file's bytes")]
    unitedllm_version: str
    files: list[FileEntry]
    total_size: Annotated[int, Meta(ge=0)]
    signature: Annotated[
        str | None,
        Meta(description="HMAC-SHA256 (hex) of the manifest without this field, keyed by the package secret"),
    ] = None


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(Manifest)


def encode_manifest(manifest: Manifest) -> bytes:
    """Stable, pretty JSON bytes of ``manifest`` (same manifest, same bytes)."""
    return msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n"


def decode_manifest(data: bytes) -> Manifest:
    """Parse and check manifest bytes; raises ``msgspec.ValidationError``/``DecodeError`` when invalid."""
    return _decoder.decode(data)


def _signed_body(manifest: Manifest) -> bytes:
    return _encoder.encode(msgspec.structs.replace(manifest, signature=None))


def sign_manifest(manifest: Manifest, secret: bytes) -> Manifest:
    """A copy of ``manifest`` carrying its HMAC-SHA256 signature under ``secret``."""
    mac = hmac.new(secret, _signed_body(manifest), hashlib.sha256).hexdigest()
    return msgspec.structs.replace(manifest, signature=mac)


def signature_matches(manifest: Manifest, secret: bytes) -> bool:
    """Whether ``manifest`` carries a valid signature under ``secret``."""
    if manifest.signature is None:
        return False
    expected = hmac.new(secret, _signed_body(manifest), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, manifest.signature)


def manifest_schema() -> dict[str, object]:
    """The JSON Schema of ``manifest.json``, generated from :class:`Manifest`."""
    schema: dict[str, object] = msgspec.json.schema(Manifest)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "UnitedLLM package manifest"
    return schema


def render_schema() -> str:
    """The committed text of ``schemas/package-manifest.schema.json`` (``python -m unitedllm.schemas``)."""
    from unitedllm.schemas import render

    return render(manifest_schema())


SECRET_ENV = "UNITEDLLM_PACKAGE_SECRET"
_MAX_SECRET_BYTES = 64 * 1024


def read_package_secret(secret_file: Path | None) -> bytes | None:
    """The package-signing secret: from ``--secret-file``, else ``$UNITEDLLM_PACKAGE_SECRET``, else none."""
    from unitedllm.errors import UnitedLLMError

    if secret_file is not None:
        try:
            # O_NONBLOCK and fstat: a FIFO or /dev/zero is refused, not read forever
            fd = os.open(secret_file, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise UnitedLLMError(f"--secret-file {secret_file}: not a regular file")
                data = handle.read(_MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise UnitedLLMError(f"--secret-file {secret_file}: cannot read it ({exc.strerror})") from exc
        if len(data) > _MAX_SECRET_BYTES:
            raise UnitedLLMError(
                f"--secret-file {secret_file}: over {_MAX_SECRET_BYTES} bytes; a secret is short"
            )
        return data.strip()
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None
