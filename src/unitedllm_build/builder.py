"""Building ``<dest>/dist-packages/{server,client}-package.zip`` in FedML's layout, byte for byte reproducible.

Layout (as ``fedml build`` makes it, so the package fits the platform the seed targets)::

    <type>-package/
      fedml/               the source folder
      fedml/config/        the config folder (fedml_config.yaml, bootstrap.sh, ...)
      conf/fedml.yaml      entry_config (entry_file, conf_file) and dynamic_args (rank, run_id, ...)
      manifest.json        UnitedLLM's addition: sha256 and size of every other file
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml

from unitedllm.packaging.manifest import MANIFEST_NAME, FileEntry, Manifest, encode_manifest, sign_manifest
from unitedllm_build.config_check import CONFIG_FILE_NAME, check_config
from unitedllm_build.errors import BuildError, EntryPointMissing, SecretsInPackage
from unitedllm_build.ignore import IgnoreRules
from unitedllm_build.secret_scan import SecretAllowList, inline_credentials, scan_file

__all__ = ["BuildRequest", "BuildResult", "build_package", "fedml_yaml"]

log = logging.getLogger(__name__)

PackageType = Literal["server", "client"]
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest time a zip can hold; fixed so rebuilds give identical bytes
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the seed's ``fedml build`` flags plus UnitedLLM's options."""

    package_type: PackageType
    source_folder: Path
    entry_point: str
    config_folder: Path
    dest_folder: Path
    ignore: tuple[str, ...] = ()
    drop_secrets: bool = False
    secret: bytes | None = None
    allow_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildResult:
    """A built package: where it is, its manifest, the zip's own sha256 and size."""

    zip_path: Path
    manifest: Manifest
    sha256: str
    size: int
    dropped_secrets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    arcname: str  # relative to <type>-package/
    source: Path
    executable: bool


def fedml_yaml(package_type: PackageType, entry_point: str) -> bytes:
    """``conf/fedml.yaml`` as ``fedml build`` writes it (the platform fills the ${FEDSYS.*} values)."""
    rank = "0" if package_type == "server" else "${FEDSYS.CLIENT_INDEX}"
    lines = [
        "entry_config:",
        f"  entry_file: fedml/{entry_point}",
        f"  conf_file: config/{CONFIG_FILE_NAME}",
        "dynamic_args:",
        f"  rank: {rank}",
        "  run_id: ${FEDSYS.RUN_ID}",
        "  data_cache_dir: /fedml/fedml-package/fedml/data",
        "  mqtt_config_path: /fedml/fedml_config/mqtt_config.yaml",
        "  s3_config_path: /fedml/fedml_config/s3_config.yaml",
        "  log_file_dir: /fedml/fedml-package/fedml/data",
        "  log_server_url: ${FEDSYS.LOG_SERVER_URL}",
        "  client_id_list: ${FEDSYS.CLIENT_ID_LIST}",
        "  client_objects: ${FEDSYS.CLIENT_OBJECT_LIST}",
        "  is_using_local_data: ${FEDSYS.IS_USING_LOCAL_DATA}",
        "  synthetic_data_url: ${FEDSYS.SYNTHETIC_DATA_URL}",
        "  client_num_in_total: ${FEDSYS.CLIENT_NUM}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _unitedllm_version() -> str:
    try:
        return metadata.version("unitedllm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _folder(path: Path, flag: str) -> Path:
    if not path.exists():
        raise BuildError(f"{flag} {path}: folder does not exist")
    if not path.is_dir():
        raise BuildError(f"{flag} {path}: not a folder")
    return path.resolve()


def _walk(
    folder: Path,
    rules: IgnoreRules,
    rules_base: Path,
    prefix: str,
    drop_secrets: bool,
    allow: SecretAllowList,
    secrets: list[str],
    dropped: list[str],
) -> dict[str, _Member]:
    """Files of ``folder`` to package as ``prefix + path``; ignore globs match paths relative to ``rules_base``."""
    members: dict[str, _Member] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        rel_base = PurePosixPath(base.relative_to(rules_base).as_posix())
        kept_dirs = []
        for name in sorted(dirnames):
            rel = rel_base / name
            if not rules.ignored(rel, base / name):
                if (base / name).is_symlink():
                    log.warning("skipping symlinked folder %s (packages hold no links)", base / name)
                else:
                    kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            path = base / name
            rel = rel_base / name
            if rules.ignored(rel, path):
                continue
            if path.is_symlink():
                log.warning("skipping symlink %s (packages hold no links)", path)
                continue
            arcname = f"{prefix}{path.relative_to(folder).as_posix()}"
            findings = scan_file(path, arcname.removeprefix("fedml/"), allow)
            if findings:
                if drop_secrets:
                    log.warning("not packaging %s: %s", path, findings[0].kind)
                    dropped.append(str(path))
                else:
                    secrets.extend(str(f) for f in findings)
                continue
            mode = path.stat().st_mode
            members[arcname] = _Member(arcname, path, bool(mode & stat.S_IXUSR))
    return members


def _hash(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _zip_info(name: str, executable: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so the permission bits below are honoured by unzip
    info.external_attr = ((0o100755 if executable else 0o100644) & 0xFFFF) << 16
    return info


def _check_entry_point(source: Path, entry_point: str, members: dict[str, _Member]) -> str:
    rel = PurePosixPath(entry_point.replace(os.sep, "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise EntryPointMissing(
            f"-ep {entry_point}: the entry point must be a path inside the source folder {source}"
        )
    if not (source / rel).is_file():
        raise EntryPointMissing(f"-ep {entry_point}: entry point not found in the source folder {source}")
    if rel.suffix not in (".py", ".sh"):
        raise EntryPointMissing(f"-ep {entry_point}: the entry point must be a .py (or .sh) file")
    if f"fedml/{rel.as_posix()}" not in members:
        raise EntryPointMissing(f"-ep {entry_point}: the entry point is excluded by the ignore rules")
    return rel.as_posix()


def _load_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # check_config has already reported anything unreadable


def _check_bootstrap(config: object, members: dict[str, _Member], config_path: Path) -> None:
    env_args = config.get("environment_args") if isinstance(config, dict) else None
    script = env_args.get("bootstrap") if isinstance(env_args, dict) else None
    if not script:
        return
    rel = PurePosixPath(str(script))
    if rel.is_absolute() or ".." in rel.parts or f"fedml/{rel.as_posix()}" not in members:
        raise BuildError(
            f"environment_args.bootstrap: {script!r} (in {config_path}) is not in the package; it is resolved"
            " from the source folder, e.g. 'config/bootstrap.sh' for bootstrap.sh in the config folder"
        )


# Config keys naming files that hold credentials: those files stay on each node.
_CREDENTIAL_FILE_KEYS = ("mqtt_config_path", "s3_config_path", "rank_keys_path")


def _credential_files_named_by(config: object, members: dict[str, _Member]) -> list[str]:
    """Packaged files that ``comm_args.*_config_path`` / ``rank_keys_path`` name, whatever they are called."""
    comm = config.get("comm_args") if isinstance(config, dict) else None
    found = []
    for key in _CREDENTIAL_FILE_KEYS:
        value = comm.get(key) if isinstance(comm, dict) else None
        if not isinstance(value, str) or not value or PurePosixPath(value).is_absolute():
            continue
        rel = PurePosixPath(value)
        # relative paths are resolved from the config's folder or the source folder when the package runs
        for candidate in (f"fedml/config/{rel.as_posix()}", f"fedml/{rel.as_posix()}"):
            if candidate in members:
                shown = candidate.removeprefix("fedml/")
                found.append(f"{shown}: named by comm_args.{key}, so it holds credentials")
    return found


def build_package(request: BuildRequest) -> BuildResult:
    """Validate the inputs, then write the package zip; nothing is written when any check fails."""
    source = _folder(request.source_folder, "-sf/--source_folder")
    config_folder = _folder(request.config_folder, "-cf/--config_folder")
    config_path = config_folder / CONFIG_FILE_NAME
    if not config_path.is_file():
        found = sorted(p.name for p in config_folder.glob("*.y*ml"))
        raise BuildError(
            f"-cf {request.config_folder}: no {CONFIG_FILE_NAME} in the config folder"
            + (f" (found: {', '.join(found)})" if found else "")
        )
    check_config(config_path)
    config = _load_yaml(config_path)

    dest = request.dest_folder.resolve()
    dist = dest / "dist-packages"
    root = f"{request.package_type}-package"
    allow = SecretAllowList(request.allow_secrets)
    secrets = [f"{config_path}: {key} is written inline" for key in inline_credentials(config)]
    dropped: list[str] = []
    source_rules = IgnoreRules.for_folder(source, request.ignore, [dest])
    members = _walk(source, source_rules, source, "fedml/", request.drop_secrets, allow, secrets, dropped)
    # the config folder lands in fedml/config/, replacing whatever the source tree had there;
    # inside the source folder it follows the source's ignore rules (.gitignore included)
    members = {k: v for k, v in members.items() if not k.startswith("fedml/config/")}
    if config_folder.is_relative_to(source):
        config_rules, config_base = source_rules, source
    else:
        config_rules, config_base = (
            IgnoreRules.for_folder(config_folder, request.ignore, [dest]),
            config_folder,
        )
    members.update(
        _walk(
            config_folder,
            config_rules,
            config_base,
            "fedml/config/",
            request.drop_secrets,
            allow,
            secrets,
            dropped,
        )
    )
    secrets += _credential_files_named_by(config, members)
    if secrets:
        raise SecretsInPackage(sorted(set(secrets)))
    entry_point = _check_entry_point(source, request.entry_point, members)
    _check_bootstrap(config, members, config_path)

    conf_yaml = fedml_yaml(request.package_type, entry_point)
    entries: list[FileEntry] = []
    for arcname, member in sorted(members.items()):
        digest, size = _hash(member.source)
        entries.append(FileEntry(path=arcname, sha256=digest, size=size))
    entries.append(
        FileEntry(path="conf/fedml.yaml", sha256=hashlib.sha256(conf_yaml).hexdigest(), size=len(conf_yaml))
    )
    entries.sort(key=lambda e: e.path)
    config_entry = next(e for e in entries if e.path == f"fedml/config/{CONFIG_FILE_NAME}")
    manifest = Manifest(
        package_type=request.package_type,
        root=root,
        entry_point=f"fedml/{entry_point}",
        conf_file=f"config/{CONFIG_FILE_NAME}",
        config_sha256=config_entry.sha256,
        unitedllm_version=_unitedllm_version(),
        files=entries,
        total_size=sum(e.size for e in entries),
    )
    if request.secret is not None:
        manifest = sign_manifest(manifest, request.secret)
    manifest_bytes = encode_manifest(manifest)

    zip_path = dist / f"{root}.zip"
    try:
        dist.mkdir(parents=True, exist_ok=True)
        # write beside the target and rename: a failed build never leaves a half-written package
        fd, tmp_name = tempfile.mkstemp(prefix=f".{root}-", suffix=".zip.tmp", dir=dist)
        os.close(fd)
        try:
            _write_zip(Path(tmp_name), root, members, entries, conf_yaml, manifest_bytes)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, zip_path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:  # an unwritable, full or misplaced -df: say where, no traceback
        where = exc.filename or dist
        raise BuildError(f"-df/--dest_folder: cannot write {where} ({exc.strerror or exc})") from None
    digest, size = _hash(zip_path)
    return BuildResult(zip_path, manifest, digest, size, dropped)


def _write_zip(
    path: Path,
    root: str,
    members: dict[str, _Member],
    entries: list[FileEntry],
    conf_yaml: bytes,
    manifest_bytes: bytes,
) -> None:
    expected = {e.path: e.sha256 for e in entries}
    sizes = {e.path: e.size for e in entries}
    generated = {"conf/fedml.yaml": conf_yaml, MANIFEST_NAME: manifest_bytes}
    names = sorted([*expected, MANIFEST_NAME])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in names:
            if name in generated:
                archive.writestr(_zip_info(f"{root}/{name}", False), generated[name])
                continue
            member = members[name]
            digest = hashlib.sha256()
            with (
                open(member.source, "rb") as src,
                archive.open(
                    _zip_info(f"{root}/{name}", member.executable),
                    "w",
                    force_zip64=sizes[name] >= zipfile.ZIP64_LIMIT,
                ) as out,
            ):
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected[name]:
                raise BuildError(f"{member.source} changed while the package was being built; build again")
