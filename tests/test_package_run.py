"""`unitedllm package run`: verify every digest, refuse unsafe archives, bootstrap, launch with dynamic args."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from services import service_env
from typer.testing import CliRunner

from unitedllm.packaging import PackageError, TamperedPackage, UnsafePackage
from unitedllm.packaging.archive import unpack
from unitedllm.packaging.cli import package_app
from unitedllm.packaging.runner import prepare_package
from unitedllm_build.cli import app as build_app

runner = CliRunner()
pytest_plugins = ["conftest_services"]  # mqtt_settings / s3_settings for the end-to-end run

# Stands in for launch.py: records how it was started, so tests see what a node would get.
RECORDER = """
import json, os, signal, sys, time
from pathlib import Path
if os.environ.get("STOPPED_TO"):  # run until SIGTERM, and say that it came
    def stop(signum, frame):
        Path(os.environ["STOPPED_TO"]).write_text(str(signum))
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
Path(os.environ["RECORD_TO"]).write_text(json.dumps({
    "argv": sys.argv[1:], "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("UNITEDLLM_")},
    "bootstrapped": Path("bootstrapped.txt").is_file(),
}))
while os.environ.get("STOPPED_TO"):
    time.sleep(0.05)
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
"""
BOOTSTRAP = 'echo "rank $UNITEDLLM_RANK" > bootstrapped.txt\nexit "${BOOTSTRAP_EXIT:-0}"\n'
# The fixture's packages are signed with this; run_cli gives it to every run.
PACKAGE_SECRET = "package-secret-for-tests"
# What each node sets for an MQTT_S3 run; nothing here is contacted (the recorder only records).
BROKER_ENV = {
    "UNITEDLLM_MQTT_HOST": "127.0.0.1",
    "UNITEDLLM_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    "UNITEDLLM_S3_BUCKET": "b",
    "UNITEDLLM_S3_ACCESS_KEY_ID": "test-key-id",
    "UNITEDLLM_S3_SECRET_ACCESS_KEY": "test-secret-key",
}


def invoke(app: Any, *args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Server and client packages of an `init` project whose entry point records its start."""
    base = tmp_path_factory.mktemp("pkg")
    project = base / "proj"
    assert invoke(build_app, "init", project)[0] == 0
    (project / "launch.py").write_text(RECORDER)
    (project / "config" / "bootstrap.sh").write_text(BOOTSTRAP)
    (base / "secret").write_text(PACKAGE_SECRET)
    built = {}
    for kind in ("server", "client"):
        code, out = invoke(
            build_app,
            "-t",
            kind,
            "-sf",
            project,
            "-ep",
            "launch.py",
            "-cf",
            project / "config",
            "-df",
            base / "build",
            "--secret-file",
            base / "secret",
        )
        assert code == 0, out
        built[kind] = base / "build" / "dist-packages" / f"{kind}-package.zip"
    return built


def run_cli(
    package: Path, workdir: Path, rank: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[int, str, dict[str, Any] | None]:
    record = workdir.parent / f"record-{workdir.name}.json"
    old = dict(os.environ)
    base = {"RECORD_TO": str(record), "UNITEDLLM_PACKAGE_SECRET": PACKAGE_SECRET, **BROKER_ENV}
    os.environ.update({**base, **(env or {})})
    for name, value in (env or {}).items():
        if value == "":  # an empty value in ``env`` unsets the variable
            os.environ.pop(name, None)
    try:
        code, out = invoke(
            package_app,
            "run",
            package,
            "--rank",
            str(rank),
            "--run-id",
            "run-7",
            "--workdir",
            workdir,
            *extra,
        )
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, out, json.loads(record.read_text()) if record.is_file() else None


def test_client_package_starts_with_dynamic_args_after_bootstrap(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    code, out, record = run_cli(
        packages["client"], tmp_path / "w", 2, "--", "--set", "train_args.comm_round=1"
    )
    assert code == 0, out
    assert record is not None, out
    assert record["argv"] == [
        "--cf",
        "config/fedml_config.yaml",
        "--rank",
        "2",
        "--run_id",
        "run-7",
        "--set",
        "train_args.comm_round=1",
    ]
    assert record["bootstrapped"], "bootstrap must run before the entry point, in the source folder"
    assert Path(record["cwd"]) == (tmp_path / "w" / "client-package" / "fedml").resolve()
    assert record["env"]["UNITEDLLM_RANK"] == "2" and record["env"]["UNITEDLLM_RUN_ID"] == "run-7"
    assert (tmp_path / "w" / "client-package" / "fedml" / "config" / "bootstrap.sh").is_file()


def test_server_package_runs_as_rank_0_only(packages: dict[str, Path], tmp_path: Path) -> None:
    code, out, record = run_cli(packages["server"], tmp_path / "s", 0)
    assert code == 0, out
    assert record is not None and record["argv"][3] == "0"
    code, out, record = run_cli(packages["server"], tmp_path / "s1", 1)
    assert code == 2 and "server package" in out and "rank 0" in out
    assert record is None
    code, out, _ = run_cli(packages["client"], tmp_path / "c0", 0)
    assert code == 2 and "client package" in out


def test_failing_bootstrap_stops_before_the_entry_point(packages: dict[str, Path], tmp_path: Path) -> None:
    code, out, record = run_cli(packages["client"], tmp_path / "b", 1, env={"BOOTSTRAP_EXIT": "3"})
    assert code == 2
    assert "bootstrap script config/bootstrap.sh exited with code 3" in out
    assert record is None


def test_entry_point_exit_code_is_passed_on(packages: dict[str, Path], tmp_path: Path) -> None:
    code, out, record = run_cli(packages["client"], tmp_path / "e", 1, env={"EXIT_WITH": "5"})
    assert code == 5 and record is not None
    assert "entry point exited with code 5" in out


def test_sigterm_to_package_run_stops_the_entry_point_too(packages: dict[str, Path], tmp_path: Path) -> None:
    """A node's supervisor stops ``unitedllm package run`` with SIGTERM: its role must not run on alone."""
    record, stopped = tmp_path / "record.json", tmp_path / "stopped"
    env = {
        **os.environ,
        **BROKER_ENV,
        "RECORD_TO": str(record),
        "STOPPED_TO": str(stopped),
        "UNITEDLLM_PACKAGE_SECRET": PACKAGE_SECRET,
    }
    command = [sys.executable, "-m", "unitedllm", "package", "run", str(packages["client"])]
    args = ["--rank", "1", "--run-id", "run-7", "--workdir", str(tmp_path / "w")]
    proc = subprocess.Popen([*command, *args], env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        while not record.is_file():  # the entry point is up
            assert proc.poll() is None, proc.communicate()[1].decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to package run alone, not to its process group
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop unitedllm package run")
        assert stopped.read_text() == str(int(signal.SIGTERM)), "the entry point was left running"
        assert proc.returncode == 143 and "entry point exited with code 143" in err.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rewrite(source: Path, target: Path, change: Any) -> Path:
    """Copy a zip entry by entry; ``change(info, data)`` returns new (info, data) or None to drop it."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            changed = change(info, src.read(info))
            if changed is not None:
                out.writestr(*changed)
    return target


def test_one_changed_byte_in_a_file_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    def flip(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if info.filename.endswith("fedml/launch.py"):
            data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
        return info, data

    bad = rewrite(packages["client"], tmp_path / "tampered.zip", flip)
    with pytest.raises(TamperedPackage, match=r"fedml/launch\.py: sha256 [0-9a-f]{64}, manifest says") as err:
        prepare_package(bad, tmp_path / "w", secret=PACKAGE_SECRET.encode())
    assert err.value.member == "fedml/launch.py"
    assert not (tmp_path / "w" / "client-package").exists(), "nothing unpacked may remain after a refusal"
    code, out, record = run_cli(bad, tmp_path / "cli", 1)
    assert code == 2 and "failed verification" in out and record is None


def test_one_flipped_byte_in_the_zip_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(packages["client"].read_bytes())
    with zipfile.ZipFile(packages["client"]) as archive:
        info = archive.getinfo("client-package/fedml/launch.py")
    # first byte of the member's compressed data: after the 30-byte local header, name and extra field
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[offset] ^= 0xFF
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        prepare_package(bad, tmp_path / "w", secret=PACKAGE_SECRET.encode())
    assert not (tmp_path / "w" / "client-package").exists()


def test_file_missing_from_manifest_or_zip_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    extra = rewrite(packages["client"], tmp_path / "extra.zip", lambda i, d: (i, d))
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("client-package/fedml/backdoor.py", "print('hi')\n")
    with pytest.raises(TamperedPackage, match="backdoor.py: in the zip but not in the manifest"):
        prepare_package(extra, tmp_path / "w1", secret=PACKAGE_SECRET.encode())
    missing = rewrite(
        packages["client"],
        tmp_path / "missing.zip",
        lambda i, d: None if i.filename.endswith("bootstrap.sh") else (i, d),
    )
    with pytest.raises(TamperedPackage, match="bootstrap.sh: listed in the manifest but missing"):
        prepare_package(missing, tmp_path / "w2", secret=PACKAGE_SECRET.encode())


def with_entry(package: Path, target: Path, info: zipfile.ZipInfo, data: bytes) -> Path:
    rewrite(package, target, lambda i, d: (i, d))
    with zipfile.ZipFile(target, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(info, data)
    return target


@pytest.mark.parametrize(
    "name, reason",
    [
        ("client-package/../../escaped.py", "contains '..'"),
        ("/tmp/unitedllm-absolute.py", "is an absolute path"),
        ("client-package\\..\\win.py", "backslash"),
    ],
)
def test_zip_slip_entries_are_refused(
    packages: dict[str, Path], tmp_path: Path, name: str, reason: str
) -> None:
    bad = with_entry(packages["client"], tmp_path / "slip.zip", zipfile.ZipInfo(name), b"print('pwned')\n")
    workdir = tmp_path / "deep" / "w"
    with pytest.raises(UnsafePackage, match=reason):
        prepare_package(bad, workdir, secret=PACKAGE_SECRET.encode())
    assert not (tmp_path / "escaped.py").exists() and not (tmp_path / "deep" / "escaped.py").exists()
    assert not Path("/tmp/unitedllm-absolute.py").exists()
    code, out, _ = run_cli(bad, tmp_path / "cli", 1)
    assert code == 2 and "refusing unsafe package" in out and "Traceback" not in out


def test_symlink_entry_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    link = zipfile.ZipInfo("client-package/fedml/passwd")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = with_entry(packages["client"], tmp_path / "link.zip", link, b"/etc/passwd")
    with pytest.raises(UnsafePackage, match="is a symbolic link"):
        prepare_package(bad, tmp_path / "w", secret=PACKAGE_SECRET.encode())
    assert not (tmp_path / "w" / "client-package").exists()


def test_oversized_entry_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    bad = with_entry(
        packages["client"],
        tmp_path / "big.zip",
        zipfile.ZipInfo("client-package/fedml/big.bin"),
        bytes(3 * 2**20),
    )
    code, out, record = run_cli(bad, tmp_path / "cli", 1, "--max-size-mb", "1")
    assert code == 2 and "big.bin" in out and "over the cap" in out and record is None
    assert not (tmp_path / "cli" / "client-package").exists()


def test_zip_bomb_ratio_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("client-package/fedml/zeros.bin", bytes(8 * 2**20))
    with pytest.raises(UnsafePackage, match="zip bomb"):
        unpack(bomb, tmp_path / "out", max_ratio=100)
    assert not (tmp_path / "out" / "client-package" / "zeros.bin").exists()


def test_not_a_package_is_a_clear_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("client-package/fedml/main.py", "print()\n")
    with pytest.raises(PackageError, match="no client-package/manifest.json"):
        prepare_package(plain, tmp_path / "w")
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    code, out = invoke(
        package_app,
        "run",
        tmp_path / "junk.zip",
        "--rank",
        "1",
        "--run-id",
        "r",
        "--workdir",
        tmp_path / "w2",
    )
    assert code == 2 and "not a readable zip" in out
    code, out = invoke(
        package_app,
        "run",
        tmp_path / "absent.zip",
        "--rank",
        "1",
        "--run-id",
        "r",
        "--workdir",
        tmp_path / "w3",
    )
    assert code == 2 and "package not found" in out


def test_signature_is_checked_when_a_secret_is_given(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    assert invoke(build_app, "init", project)[0] == 0
    (tmp_path / "right").write_text("right-secret")
    (tmp_path / "wrong").write_text("wrong-secret")
    code, out = invoke(
        build_app,
        "-t",
        "client",
        "-sf",
        project,
        "-ep",
        "launch.py",
        "-cf",
        project / "config",
        "-df",
        tmp_path / "build",
        "--secret-file",
        tmp_path / "right",
    )
    assert code == 0, out
    package = tmp_path / "build" / "dist-packages" / "client-package.zip"
    assert prepare_package(package, tmp_path / "ok", secret=b"right-secret").manifest.signature
    with pytest.raises(TamperedPackage, match="signature that does not match"):
        prepare_package(package, tmp_path / "bad", secret=b"wrong-secret")
    code, out = invoke(package_app, "verify", package, "--secret-file", tmp_path / "wrong")
    assert code == 2 and "signature" in out
    code, out = invoke(package_app, "verify", package, "--secret-file", tmp_path / "right")
    assert code == 0 and "verified client package" in out


def test_rerun_replaces_the_previous_unpack(packages: dict[str, Path], tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    prepare_package(packages["client"], workdir, secret=PACKAGE_SECRET.encode())
    stale = workdir / "client-package" / "fedml" / "stale.py"
    stale.write_text("left over")
    prepare_package(packages["client"], workdir, secret=PACKAGE_SECRET.encode())
    assert not stale.exists()


# ---- end to end: real roles over MQTT_S3, one process per package -------------------------------------


@pytest.mark.slow
@pytest.mark.services
def test_server_and_two_client_packages_finish_a_two_round_run(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    try:
        mqtt = request.getfixturevalue("mqtt_settings")
        s3 = request.getfixturevalue("s3_settings")
    except pytest.FixtureLookupError:
        pytest.skip("needs the mqtt_settings and s3_settings fixtures (tests/conftest_services.py)")
    project = tmp_path / "proj"
    assert invoke(build_app, "init", project)[0] == 0
    assert subprocess.run(["bash", "scripts/build.sh"], cwd=project, check=False).returncode == 0
    dist = project / "build" / "dist-packages"
    env = {
        **os.environ,
        **service_env(mqtt, s3),
        "UNITEDLLM_RUN_SECRET": "e2e-run-secret",
        "UNITEDLLM_CACHE": str(tmp_path / "cache"),
    }
    overrides = [
        "--",
        "--set",
        "train_args.comm_round=2",
        "--set",
        f"train_args.output_dir={tmp_path}/out/{{run_id}}",
    ]

    def start(package: str, rank: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "unitedllm.packaging",
            "run",
            str(dist / package),
            "--rank",
            str(rank),
            "--run-id",
            "e2e-run",
            "--workdir",
            str(tmp_path / f"node{rank}"),
            "--allow-unauthenticated",  # scripts/build.sh signs nothing
            *overrides,
        ]
        return subprocess.Popen(command, env=env, cwd=tmp_path)

    nodes = [start("server-package.zip", 0), start("client-package.zip", 1), start("client-package.zip", 2)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert codes == [0, 0, 0]
    final = tmp_path / "out" / "e2e-run" / "node_0" / "final"
    assert final.is_dir() and any(final.iterdir()), "the aggregator saves the final global model"
    metrics = tmp_path / "out" / "e2e-run" / "metrics.jsonl"
    assert metrics.is_file(), "the aggregator records its rounds in metrics.jsonl"
    rounds = [e for e in map(json.loads, metrics.read_text().splitlines()) if e.get("event") == "round"]
    assert [e["round"] for e in rounds] == [0, 1]
