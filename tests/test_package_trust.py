"""Which packages `unitedllm package verify/run` trusts: signatures, hostile zips, the work dir, preflight."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
from test_package_run import PACKAGE_SECRET, invoke, packages, rewrite, run_cli

from unitedllm.packaging import PackageError, UnauthenticatedPackage, UnsafePackage
from unitedllm.packaging.archive import DEFAULT_MAX_RATIO, unpack
from unitedllm.packaging.cli import package_app
from unitedllm.packaging.runner import prepare_package

__all__ = ["packages"]  # the fixture, shared with test_package_run

MANIFEST = "client-package/manifest.json"
NO_SECRET = {"UNITEDLLM_PACKAGE_SECRET": ""}


def _strip_signature(source: Path, target: Path) -> Path:
    def change(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if info.filename == MANIFEST:
            manifest = json.loads(data)
            manifest["signature"] = None
            data = json.dumps(manifest, indent=2).encode()
        return info, data

    return rewrite(source, target, change)


def _rewrite_file_and_manifest(source: Path, target: Path) -> Path:
    """launch.py replaced and its manifest entry updated to match: what an attacker with the zip can do."""
    evil = b"import sys\nprint('rewritten entry point')\nsys.exit(0)\n"
    digest = hashlib.sha256(evil).hexdigest()

    def change(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if info.filename == "client-package/fedml/launch.py":
            data = evil
        elif info.filename == MANIFEST:
            manifest = json.loads(data)
            for entry in manifest["files"]:
                if entry["path"] == "fedml/launch.py":
                    manifest["total_size"] += len(evil) - entry["size"]
                    entry.update(sha256=digest, size=len(evil))
            manifest["signature"] = None
            data = json.dumps(manifest, indent=2).encode()
        return info, data

    return rewrite(source, target, change)


def test_stripped_signature_run_with_a_secret_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    stripped = _strip_signature(packages["client"], tmp_path / "stripped.zip")
    code, out, record = run_cli(stripped, tmp_path / "w", 1)
    assert code == 2 and record is None
    assert "manifest.json: is not signed under the given package secret" in out
    assert not (tmp_path / "w" / "client-package").exists()


def test_rewritten_files_and_manifest_are_refused_without_a_secret(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    forged = _rewrite_file_and_manifest(packages["client"], tmp_path / "forged.zip")
    code, out, record = run_cli(forged, tmp_path / "w", 1, env=NO_SECRET)
    assert code == 2 and record is None
    assert "is unauthenticated: it is not signed" in out and "--allow-unauthenticated" in out
    assert not (tmp_path / "w" / "client-package").exists()
    with pytest.raises(UnauthenticatedPackage):
        prepare_package(forged, tmp_path / "lib")

    code, out = invoke(package_app, "verify", forged)
    assert code == 2 and "unauthenticated" in out
    code, out = invoke(package_app, "verify", forged, "--allow-unauthenticated")
    assert code == 0 and "UNAUTHENTICATED" in out


def test_a_signed_package_without_the_secret_needs_the_opt_in(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    code, out, record = run_cli(packages["client"], tmp_path / "w", 1, env=NO_SECRET)
    assert code == 2 and record is None
    assert "is signed, but no package secret was given" in out
    code, out, record = run_cli(
        packages["client"], tmp_path / "w2", 1, "--allow-unauthenticated", env=NO_SECRET
    )
    assert code == 0 and record is not None, out
    code, out = invoke(package_app, "verify", packages["client"], "--secret-file", _secret_file(tmp_path))
    assert code == 0 and "signed under the package secret" in out


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(PACKAGE_SECRET)
    return path


def _set_central_sizes(path: Path, name: str, *, file_size: int | None = None) -> None:
    """Overwrite the uncompressed size that the central directory declares for ``name`` (a lying header)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        start = archive.start_dir
    offset = start
    while data[offset : offset + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        entry = bytes(data[offset + 46 : offset + 46 + name_len]).decode()
        if entry == name and file_size is not None:
            struct.pack_into("<I", data, offset + 24, file_size)
        offset += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


def test_zip_headers_that_lie_about_sizes_are_refused(tmp_path: Path) -> None:
    name = "client-package/fedml/data.bin"
    small = tmp_path / "understated.zip"
    with zipfile.ZipFile(small, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, bytes(range(256)) * 4096)  # 1 MiB
    _set_central_sizes(small, name, file_size=1000)  # claims 1,000 bytes, inflates to 1 MiB
    with pytest.raises(PackageError, match="corrupt|inflates past its declared size"):
        prepare_package(small, tmp_path / "w1")
    assert list((tmp_path / "w1").iterdir()) == [], "nothing of a refused package stays in the work dir"

    big = tmp_path / "overstated.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, b"tiny")
    _set_central_sizes(big, name, file_size=0xFFFFFFF0)  # claims 4 GiB: over the cap before any write
    with pytest.raises(UnsafePackage, match="over the cap"):
        unpack(big, tmp_path / "out2")
    assert not (tmp_path / "out2" / "client-package").exists()


def test_duplicate_entries_are_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    dup = rewrite(packages["client"], tmp_path / "dup.zip", lambda i, d: (i, d))
    with (
        pytest.warns(UserWarning, match="Duplicate name"),
        zipfile.ZipFile(dup, "a", zipfile.ZIP_DEFLATED) as archive,
    ):
        archive.writestr("client-package/fedml/launch.py", "print('second copy')\n")
    code, out, record = run_cli(dup, tmp_path / "w", 1)
    assert code == 2 and record is None
    assert "fedml/launch.py' appears twice in the archive" in out


def test_default_zip_bomb_ratio_is_1000(tmp_path: Path) -> None:
    assert DEFAULT_MAX_RATIO == 1000
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("client-package/fedml/zeros.bin", bytes(16 * 2**20))  # deflates ~1028:1
    with pytest.raises(UnsafePackage, match="over the cap of 1000:1"):
        unpack(bomb, tmp_path / "out")  # no max_ratio: the default applies
    assert not (tmp_path / "out" / "client-package").exists()


def test_package_folder_that_is_a_symlink_is_refused_and_not_followed(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("do not delete")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "client-package").symlink_to(precious, target_is_directory=True)
    code, out, record = run_cli(packages["client"], workdir, 1)
    assert code == 2 and record is None
    assert "is a symbolic link" in out and "Traceback" not in out
    assert (precious / "keep.txt").read_text() == "do not delete"
    assert (workdir / "client-package").is_symlink()


def test_package_run_without_broker_settings_is_a_clean_error(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    unset = {name: "" for name in ("UNITEDLLM_MQTT_HOST", "UNITEDLLM_S3_ENDPOINT_URL", "UNITEDLLM_S3_BUCKET")}
    code, out, record = run_cli(packages["client"], tmp_path / "w", 1, env=unset)
    assert code == 2, out
    assert record is None, "the entry point must not start"
    assert "comm_args.mqtt.host" in out and "UNITEDLLM_MQTT_HOST" in out
    assert "Traceback" not in out


def test_a_device_or_folder_as_the_package_is_refused_at_once(tmp_path: Path) -> None:
    for source in (Path("/dev/zero"), tmp_path):  # /dev/zero would be read forever looking for a zip
        code, out = invoke(package_app, "verify", source)
        assert code == 2 and "is not a zip file (a folder, device or pipe)" in out


def test_a_run_id_that_would_leave_the_work_dir_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    code, out = invoke(package_app, "run", packages["client"], "--rank", "1", "--run-id", "../../escape")
    assert code == 2 and "--run-id" in out and "is not a usable run id" in out
    assert not (Path.cwd().parent / "escape").exists()
