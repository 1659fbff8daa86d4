"""Unpacking a package zip without trusting it: no escapes, no links, no bombs, every byte hashed.

The checks run on the entry table before anything is written, and sizes are counted
while bytes are read (a zip header may lie about them), so a hostile archive cannot
write outside the target folder nor fill the disk.
"""

from __future__ import annotations

import hashlib
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from unitedllm.packaging.errors import PackageError, UnsafePackage

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_RATIO", "UnpackedFile", "check_entries", "unpack"]

# A package is code plus config; models come from the hub or a path. 2 GiB leaves room for
# vendored wheels or small datasets while stopping a zip bomb long before the disk fills.
DEFAULT_MAX_BYTES = 2 * 1024**3
# Text compresses ~4-10x with deflate; 1000x only happens with crafted (e.g. all-zero) data.
DEFAULT_MAX_RATIO = 1000
_RATIO_FLOOR_BYTES = 1024 * 1024  # small files may compress very well; only judge big ones
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UnpackedFile:
    """A file written by :func:`unpack`: its archive name, sha256 and size."""

    name: str
    sha256: str
    size: int


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


def _unsafe_name_reason(name: str) -> str | None:
    if not name:
        return "has an empty name"
    if "\\" in name:
        return "contains a backslash (Windows path separators are not allowed)"
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..' (it would be written outside the package folder)"
    return None


def check_entries(
    archive: zipfile.ZipFile,
    *,
    package: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> list[zipfile.ZipInfo]:
    """The archive's file entries after checking names, links and declared sizes (raises UnsafePackage)."""
    files: list[zipfile.ZipInfo] = []
    seen: set[str] = set()
    total = 0
    for info in archive.infolist():
        reason = _unsafe_name_reason(info.filename)
        if reason:
            raise UnsafePackage(package, info.filename, reason)
        if _is_symlink(info):
            raise UnsafePackage(package, info.filename, "is a symbolic link")
        if info.is_dir():
            continue
        if info.filename in seen:
            raise UnsafePackage(package, info.filename, "appears twice in the archive")
        seen.add(info.filename)
        if info.file_size > max_bytes:
            raise UnsafePackage(
                package, info.filename, f"unpacks to {info.file_size} bytes, over the cap of {max_bytes}"
            )
        if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise UnsafePackage(
                package,
                info.filename,
                f"compresses {info.file_size // max(info.compress_size, 1)}:1, over the cap of {max_ratio}:1"
                " (zip bomb?)",
            )
        total += info.file_size
        if total > max_bytes:
            raise UnsafePackage(
                package, info.filename, f"takes the package past the cap of {max_bytes} unpacked bytes"
            )
        files.append(info)
    return files


def unpack(
    zip_path: Path,
    target: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> list[UnpackedFile]:
    """Unpack ``zip_path`` into the empty folder ``target``, hashing every file; raise on anything unsafe."""
    package = str(zip_path)
    try:
        file_stat = zip_path.stat()
    except FileNotFoundError as exc:
        raise PackageError(f"package not found: {zip_path}") from exc
    except OSError as exc:
        raise PackageError(f"cannot read {zip_path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(file_stat.st_mode):
        # /dev/zero or a FIFO would be read forever looking for the zip's directory
        raise PackageError(f"{zip_path} is not a zip file (a folder, device or pipe)")
    try:
        archive = zipfile.ZipFile(zip_path)
    except FileNotFoundError as exc:
        raise PackageError(f"package not found: {zip_path}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"{zip_path} is not a readable zip archive: {exc}") from exc
    written: list[UnpackedFile] = []
    root = target.resolve()
    with archive:
        entries = check_entries(archive, package=package, max_bytes=max_bytes, max_ratio=max_ratio)
        total = 0
        for info in entries:
            dest = (root / info.filename).resolve()
            if not dest.is_relative_to(root):
                raise UnsafePackage(package, info.filename, "resolves outside the package folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            try:
                with archive.open(info) as src, open(dest, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        total += len(chunk)
                        # headers can understate sizes; count what is really inflated
                        if size > info.file_size or total > max_bytes:
                            raise UnsafePackage(
                                package, info.filename, "inflates past its declared size or the size cap"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            except FileExistsError as exc:
                raise UnsafePackage(package, info.filename, "would overwrite another entry") from exc
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                ValueError,
                RuntimeError,
                NotImplementedError,
            ) as exc:
                # a CRC mismatch (BadZipFile) or a broken deflate stream: bytes changed after zipping
                raise PackageError(f"package {package} is corrupt at entry {info.filename!r}: {exc}") from exc
            if info.external_attr >> 16 & 0o111:
                dest.chmod(0o755)
            written.append(UnpackedFile(info.filename, digest.hexdigest(), size))
    return written
