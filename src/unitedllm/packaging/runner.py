"""Running a package the way an edge device does after download: verify, unpack, bootstrap, launch.

``unitedllm package run`` calls :func:`run_package`. The entry point gets FedML's dynamic
args as flags (``--cf <conf_file> --rank N --run_id ID``) and as ``UNITEDLLM_*`` variables;
rank 0 is the aggregator (server package), ranks 1..N are clients.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import yaml

from unitedllm import node_processes
from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.packaging.archive import DEFAULT_MAX_BYTES, UnpackedFile, unpack
from unitedllm.packaging.errors import BootstrapFailed, PackageError, TamperedPackage, UnauthenticatedPackage
from unitedllm.packaging.manifest import MANIFEST_NAME, Manifest, decode_manifest, signature_matches

__all__ = [
    "PreparedPackage",
    "default_workdir",
    "launch_command",
    "preflight",
    "prepare_package",
    "run_bootstrap",
    "run_package",
]

log = logging.getLogger(__name__)

SOURCE_DIR = "fedml"  # FedML's layout: the source tree lives in <type>-package/fedml/


@dataclass(frozen=True)
class PreparedPackage:
    """A verified, unpacked package ready to start; ``authenticated``: signed under the given secret."""

    root: Path
    manifest: Manifest
    authenticated: bool = False

    @property
    def source_dir(self) -> Path:
        """The unpacked source tree; the entry point runs here."""
        return self.root / SOURCE_DIR

    @property
    def entry_file(self) -> Path:
        return self.root / self.manifest.entry_point

    @property
    def conf_path(self) -> Path:
        return self.source_dir / self.manifest.conf_file


def default_workdir(run_id: str, rank: int) -> Path:
    """Where a package is unpacked when ``--workdir`` is not given: one folder per run and rank."""
    return Path.cwd() / ".unitedllm" / "packages" / run_id / f"rank_{rank}"


def _inside(base: Path, relative: str, *, what: str, package: str) -> Path:
    path = (base / relative).resolve()
    if PurePosixPath(relative).is_absolute() or not path.is_relative_to(base.resolve()):
        raise PackageError(f"package {package}: {what} {relative!r} points outside the package")
    return path


def _verify(package: str, unpacked: list[UnpackedFile], staging: Path) -> Manifest:
    roots = {PurePosixPath(f.name).parts[0] for f in unpacked}
    if len(roots) != 1:
        raise PackageError(f"package {package} must hold exactly one top folder, found {sorted(roots)}")
    (root,) = roots
    manifest_path = staging / root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(
            f"package {package} has no {root}/{MANIFEST_NAME}: only packages built by unitedllm-build"
            " can be verified and run"
        )
    try:
        manifest = decode_manifest(manifest_path.read_bytes())
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TamperedPackage(package, MANIFEST_NAME, f"not a valid manifest ({exc})") from exc
    if manifest.root != root:
        raise TamperedPackage(package, MANIFEST_NAME, f"names root {manifest.root!r}, the zip holds {root!r}")
    actual = {f.name.removeprefix(f"{root}/"): f for f in unpacked}
    actual.pop(MANIFEST_NAME)
    for entry in manifest.files:
        got = actual.pop(entry.path, None)
        if got is None:
            raise TamperedPackage(package, entry.path, "listed in the manifest but missing from the zip")
        if got.size != entry.size:
            raise TamperedPackage(package, entry.path, f"size {got.size} bytes, manifest says {entry.size}")
        if got.sha256 != entry.sha256:
            raise TamperedPackage(package, entry.path, f"sha256 {got.sha256}, manifest says {entry.sha256}")
    if actual:
        extra = min(actual)
        raise TamperedPackage(package, extra, "in the zip but not in the manifest")
    return manifest


def _authenticate(
    package: str, manifest: Manifest, secret: bytes | None, allow_unauthenticated: bool
) -> bool:
    """Whether the manifest is signed under ``secret``; raise unless it is or the caller opted out."""
    if secret is not None:
        if not signature_matches(manifest, secret):
            state = "is not signed" if manifest.signature is None else "has a signature that does not match"
            raise TamperedPackage(package, MANIFEST_NAME, f"{state} under the given package secret")
        return True
    if not allow_unauthenticated:
        raise UnauthenticatedPackage(package, signed=manifest.signature is not None)
    log.warning(
        "package %s is UNAUTHENTICATED (%s): its files match its manifest, but anyone could have"
        " rewritten both; running it because --allow-unauthenticated was given",
        package,
        "signed, but no package secret was given" if manifest.signature else "not signed",
    )
    return False


def _package_folder(workdir: Path, root: str, package: str) -> Path:
    """``workdir/root``, refused when it is a link or not a folder (never followed, never removed through)."""
    final = workdir / root
    if final.is_symlink():
        raise PackageError(
            f"package {package}: {final} is a symbolic link; refusing to replace it (remove the link or"
            " choose another --workdir)"
        )
    if final.exists() and not final.is_dir():
        raise PackageError(f"package {package}: {final} exists and is not a folder; remove it first")
    return final


def prepare_package(
    zip_path: Path,
    workdir: Path,
    *,
    secret: bytes | None = None,
    allow_unauthenticated: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PreparedPackage:
    """Unpack ``zip_path`` into ``workdir`` and check every file against the manifest.

    Nothing lands in ``workdir/<type>-package`` unless every check passes. The manifest must carry
    a valid signature under ``secret``; without a secret the package is unauthenticated (its files
    and manifest could both have been rewritten) and is refused unless ``allow_unauthenticated``.
    """
    package = str(zip_path)
    if workdir.is_symlink() and not workdir.is_dir():
        raise PackageError(f"--workdir {workdir} is a dangling symbolic link")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackageError(f"--workdir {workdir}: cannot create it ({exc.strerror or exc})") from None
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=workdir))
    try:
        unpacked = unpack(zip_path, staging, max_bytes=max_bytes)
        if not unpacked:
            raise PackageError(f"package {package} is empty")
        manifest = _verify(package, unpacked, staging)
        authenticated = _authenticate(package, manifest, secret, allow_unauthenticated)
        final = _package_folder(workdir, manifest.root, package)
        try:
            if final.exists():
                shutil.rmtree(final)  # a previous unpack of this run/rank; never mix old and new files
            (staging / manifest.root).rename(final)
        except OSError as exc:
            raise PackageError(f"package {package}: cannot replace {final} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prepared = PreparedPackage(final, manifest, authenticated)
    _inside(final, manifest.entry_point, what="entry point", package=package)
    return prepared


def _read_yaml(path: Path, package: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PackageError(f"package {package}: cannot read {path.name}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _bootstrap_script(prepared: PreparedPackage) -> Path | None:
    config = _read_yaml(prepared.conf_path, str(prepared.root))
    env_args = config.get("environment_args") or {}
    script = env_args.get("bootstrap") if isinstance(env_args, dict) else None
    if not script:
        return None
    path = _inside(
        prepared.source_dir, str(script), what="environment_args.bootstrap", package=str(prepared.root)
    )
    if not path.is_file():
        raise PackageError(
            f"environment_args.bootstrap: {script!r} is not in the package (looked for {path})"
        )
    return path


def _role_env(prepared: PreparedPackage, rank: int, run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    # bootstrap and entry point use the Python (and its packages) that runs unitedllm
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = python_dir + os.pathsep + env.get("PATH", "")
    env.update(
        UNITEDLLM_PYTHON=sys.executable,
        UNITEDLLM_RANK=str(rank),
        UNITEDLLM_RUN_ID=run_id,
        UNITEDLLM_CONFIG=str(prepared.conf_path),
    )
    env[node_processes.PACKAGE_DIR_ENV] = str(prepared.root)  # the client's bootstrap has run
    return env


def run_bootstrap(prepared: PreparedPackage, *, rank: int, run_id: str) -> None:
    """Run ``environment_args.bootstrap`` (if any) in the source folder; raise BootstrapFailed on a non-zero exit."""
    script = _bootstrap_script(prepared)
    if script is None:
        return
    try:
        node_processes.run_bootstrap(script, cwd=prepared.source_dir, env=_role_env(prepared, rank, run_id))
    except node_processes.BootstrapError as exc:
        raise BootstrapFailed(str(script.relative_to(prepared.source_dir)), exc.returncode) from exc


def launch_command(
    prepared: PreparedPackage, *, rank: int, run_id: str, extra_args: Sequence[str] = ()
) -> list[str]:
    """The command line that starts the entry point with the dynamic args filled in."""
    entry = prepared.entry_file
    flags = ["--cf", prepared.manifest.conf_file, "--rank", str(rank), "--run_id", run_id, *extra_args]
    if entry.suffix == ".py":
        return [sys.executable, str(entry), *flags]
    if entry.suffix == ".sh":
        return ["bash", str(entry), *flags]
    raise PackageError(
        f"entry point {prepared.manifest.entry_point!r}: only .py and .sh entry points can be started"
    )


def _set_options(extra_args: Sequence[str]) -> list[str]:
    """The ``--set KEY=VALUE`` overrides among the entry point's arguments."""
    found: list[str] = []
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--set="):
            found.append(arg.removeprefix("--set="))
    return found


def preflight(prepared: PreparedPackage, *, extra_args: Sequence[str] = ()) -> None:
    """Check, before the entry point starts, what would only fail inside it with a traceback.

    The package's config (with the ``--set`` overrides) must load, and a run over MQTT_S3 must find
    its broker and store settings (config, ``comm_args.*_config_path`` files or ``UNITEDLLM_*``
    variables on this node). Problems raise one :class:`ConfigError` listing each.
    """
    from unitedllm.comm.settings import resolve_mqtt, resolve_s3
    from unitedllm.config import load_config

    cfg = load_config(prepared.conf_path, overrides=_set_options(extra_args))
    if cfg.comm_args.backend != "MQTT_S3":
        return
    problems: list[ConfigProblem] = []
    for resolve in (resolve_mqtt, resolve_s3):
        try:
            resolve(cfg, base_dir=prepared.source_dir)  # the entry point runs there
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, source=f"{prepared.manifest.conf_file} (in the package)")


def _check_role(manifest: Manifest, rank: int, package: str) -> None:
    if rank < 0:
        raise PackageError(f"--rank {rank}: ranks are 0 (aggregator) or 1..N (clients)")
    if manifest.package_type == "server" and rank != 0:
        raise PackageError(f"{package} is a server package: it runs as rank 0, not --rank {rank}")
    if manifest.package_type == "client" and rank == 0:
        raise PackageError(f"{package} is a client package: rank 0 is the aggregator, give --rank 1..N")


def run_package(
    zip_path: Path,
    *,
    rank: int,
    run_id: str,
    workdir: Path | None = None,
    extra_args: Sequence[str] = (),
    secret: bytes | None = None,
    allow_unauthenticated: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Verify, unpack, bootstrap and start the package; return the entry point's exit code."""
    from unitedllm.config.loader import check_run_id

    if not run_id or not run_id.strip():
        raise PackageError("--run-id must not be empty: every node of a run uses the same run id")
    check_run_id(run_id, where="--run-id")  # it names the default work dir: no '..', no '/'
    workdir = workdir if workdir is not None else default_workdir(run_id, rank)
    prepared = prepare_package(
        zip_path, workdir, secret=secret, allow_unauthenticated=allow_unauthenticated, max_bytes=max_bytes
    )
    _check_role(prepared.manifest, rank, str(zip_path))
    preflight(prepared, extra_args=extra_args)
    run_bootstrap(prepared, rank=rank, run_id=run_id)
    command = launch_command(prepared, rank=rank, run_id=run_id, extra_args=extra_args)
    log.info("starting %s", " ".join(command))
    process = subprocess.Popen(command, cwd=prepared.source_dir, env=_role_env(prepared, rank, run_id))
    return node_processes.wait_forwarding_signals(process)
