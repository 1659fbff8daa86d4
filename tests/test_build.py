"""unitedllm-build: FedML-layout packages from an `init` project, reproducible bytes, manifest, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from unitedllm.packaging.manifest import decode_manifest, render_schema, signature_matches
from unitedllm_build.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str]:
    """Run unitedllm-build in-process; exit code and stdout+stderr."""
    result = runner.invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        result.output
    )
    return result.exit_code, result.output


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    code, out = cli("init", tmp_path / "proj")
    assert code == 0, out
    return tmp_path / "proj"


def build(project: Path, kind: str = "client", dest: Path | None = None, *extra: str) -> tuple[int, str]:
    return cli(
        "-t",
        kind,
        "-sf",
        project,
        "-ep",
        "launch.py",
        "-cf",
        project / "config",
        "-df",
        dest or project / "build",
        *extra,
    )


def names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.namelist()


def read(zip_path: Path, name: str) -> bytes:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(name)


@pytest.mark.parametrize("kind, rank", [("server", 0), ("client", "${FEDSYS.CLIENT_INDEX}")])
def test_init_project_builds_packages_in_fedml_layout(project: Path, kind: str, rank: object) -> None:
    code, out = build(project, kind)
    assert code == 0, out
    zip_path = project / "build" / "dist-packages" / f"{kind}-package.zip"
    assert f"sha256:  {hashlib.sha256(zip_path.read_bytes()).hexdigest()}" in out
    entries = names(zip_path)
    root = f"{kind}-package/"
    assert all(n.startswith(root) for n in entries)
    assert f"{root}fedml/launch.py" in entries
    assert f"{root}fedml/config/fedml_config.yaml" in entries
    assert f"{root}fedml/config/bootstrap.sh" in entries
    assert f"{root}manifest.json" in entries
    # the destination folder inside the source is never packaged into itself
    assert not any("/build/" in n for n in entries)
    conf = yaml.safe_load(read(zip_path, f"{root}conf/fedml.yaml"))
    assert conf["entry_config"] == {"entry_file": "fedml/launch.py", "conf_file": "config/fedml_config.yaml"}
    assert conf["dynamic_args"]["rank"] == rank
    assert conf["dynamic_args"]["run_id"] == "${FEDSYS.RUN_ID}"
    assert conf["dynamic_args"]["client_num_in_total"] == "${FEDSYS.CLIENT_NUM}"
    with zipfile.ZipFile(zip_path) as archive:
        bootstrap = archive.getinfo(f"{root}fedml/config/bootstrap.sh")
        assert bootstrap.external_attr >> 16 & 0o111, "bootstrap.sh must stay executable"


def test_building_twice_gives_identical_bytes(project: Path, tmp_path: Path) -> None:
    assert build(project, "server", tmp_path / "a")[0] == 0
    # new mtimes and a different destination must not change a single byte
    for path in project.rglob("*"):
        os.utime(path, (1_900_000_000, 1_900_000_000))
    assert build(project, "server", tmp_path / "b")[0] == 0
    first = (tmp_path / "a" / "dist-packages" / "server-package.zip").read_bytes()
    second = (tmp_path / "b" / "dist-packages" / "server-package.zip").read_bytes()
    assert first == second
    assert names(tmp_path / "a" / "dist-packages" / "server-package.zip") == sorted(
        names(tmp_path / "a" / "dist-packages" / "server-package.zip")
    )


def test_every_manifest_digest_is_right(project: Path) -> None:
    assert build(project, "client")[0] == 0
    zip_path = project / "build" / "dist-packages" / "client-package.zip"
    raw = read(zip_path, "client-package/manifest.json")
    jsonschema.validate(
        json.loads(raw), json.loads((ROOT / "schemas" / "package-manifest.schema.json").read_text())
    )
    manifest = decode_manifest(raw)
    assert manifest.package_type == "client"
    assert manifest.entry_point == "fedml/launch.py"
    listed = {e.path for e in manifest.files}
    in_zip = {n.removeprefix("client-package/") for n in names(zip_path)} - {"manifest.json"}
    assert listed == in_zip
    for entry in manifest.files:
        data = read(zip_path, f"client-package/{entry.path}")
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry.sha256, entry.size), entry.path
    config = (project / "config" / "fedml_config.yaml").read_bytes()
    assert manifest.config_sha256 == hashlib.sha256(config).hexdigest()
    assert manifest.total_size == sum(e.size for e in manifest.files)


def test_committed_manifest_schema_is_generated_from_the_types() -> None:
    committed = (ROOT / "schemas" / "package-manifest.schema.json").read_text()
    assert committed == render_schema(), "regenerate it: see unitedllm.packaging.manifest.render_schema"


def test_signed_manifest_verifies_with_the_secret(project: Path, tmp_path: Path) -> None:
    secret = tmp_path / "package.secret"
    secret.write_text("s3cr3t-for-this-project\n")
    assert build(project, "server", None, "--secret-file", str(secret))[0] == 0
    manifest = decode_manifest(
        read(project / "build" / "dist-packages" / "server-package.zip", "server-package/manifest.json")
    )
    assert signature_matches(manifest, b"s3cr3t-for-this-project")
    assert not signature_matches(manifest, b"another secret")


def no_package(project: Path) -> bool:
    dist = project / "build" / "dist-packages"
    return not dist.exists() or not any(dist.glob("*.zip"))


def test_invalid_config_is_refused_with_its_yaml_path(project: Path) -> None:
    config = project / "config" / "fedml_config.yaml"
    config.write_text(config.read_text().replace("comm_round: 2", 'comm_round: "five"'))
    code, out = build(project)
    assert code == 2
    assert "train_args.comm_round" in out and "five" in out
    assert "Traceback" not in out
    assert no_package(project)


def test_missing_config_file_is_named(project: Path) -> None:
    (project / "config" / "fedml_config.yaml").rename(project / "config" / "other.yaml")
    code, out = build(project)
    assert code == 2 and "no fedml_config.yaml" in out and "other.yaml" in out
    assert no_package(project)


def test_missing_entry_point_is_refused(project: Path) -> None:
    code, out = cli(
        "-t",
        "server",
        "-sf",
        project,
        "-ep",
        "train_nowhere.py",
        "-cf",
        project / "config",
        "-df",
        project / "build",
    )
    assert code == 2
    assert "train_nowhere.py" in out and "entry point not found" in out
    assert no_package(project)


def test_entry_point_excluded_by_ignore_is_refused(project: Path) -> None:
    code, out = build(project, "client", None, "-ig", "launch.py")
    assert code == 2 and "excluded by the ignore rules" in out
    assert no_package(project)


@pytest.mark.parametrize(
    "secret_path", [".env", "config/mqtt_config.yaml", "keys/deploy.pem", "notes/id_ed25519"]
)
def test_secret_file_is_refused(project: Path, secret_path: str) -> None:
    (project / ".gitignore").unlink()  # the template's .gitignore would keep these out already
    path = project / secret_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("BROKER_PASSWORD=hunter2\n")
    code, out = build(project)
    assert code == 2
    assert "refusing to package credentials" in out and path.name in out
    assert no_package(project)


def test_private_key_content_is_refused_whatever_the_name(project: Path) -> None:
    (project / "notes.txt").write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    code, out = build(project)
    assert code == 2 and "notes.txt" in out and "private key" in out.lower()
    assert no_package(project)


def test_inline_credentials_in_config_are_refused(project: Path) -> None:
    config = project / "config" / "fedml_config.yaml"
    config.write_text(config.read_text() + "")
    data = yaml.safe_load(config.read_text())
    data["comm_args"]["mqtt"] = {"host": "broker", "password": "hunter2"}
    config.write_text(yaml.safe_dump(data))
    code, out = build(project)
    assert code == 2 and "comm_args.mqtt.password" in out
    assert no_package(project)


def test_gitignored_secrets_stay_out_silently(project: Path) -> None:
    (project / ".env").write_text("TOKEN=1\n")
    (project / "config" / "s3_config.yaml").write_text("CN_S3_SAK: secret\n")
    code, out = build(project)
    assert code == 0, out
    entries = names(project / "build" / "dist-packages" / "client-package.zip")
    assert not any(n.endswith((".env", "s3_config.yaml")) for n in entries)


def test_secrets_can_be_ignored_or_dropped_with_a_warning(project: Path, tmp_path: Path) -> None:
    (project / ".gitignore").unlink()
    (project / ".env").write_text("TOKEN=1\n")
    code, out = build(project, "client", tmp_path / "ig", "-ig", ".env")
    assert code == 0, out
    assert not any(
        n.endswith(".env") for n in names(tmp_path / "ig" / "dist-packages" / "client-package.zip")
    )
    code, out = build(project, "client", tmp_path / "drop", "--drop-secrets")
    assert code == 0, out
    assert "dropped:" in out and ".env" in out
    assert not any(
        n.endswith(".env") for n in names(tmp_path / "drop" / "dist-packages" / "client-package.zip")
    )


def test_ignore_globs_and_defaults(project: Path, tmp_path: Path) -> None:
    for rel in [
        "weights/model.ckpt",
        "data/big.bin",
        "__pycache__/launch.cpython-311.pyc",
        ".git/HEAD",
        "old/dist-packages/client-package.zip",
        "keep/notes.md",
    ]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    code, out = build(project, "client", tmp_path / "out", "-ig", "*.ckpt, data")
    assert code == 0, out
    entries = names(tmp_path / "out" / "dist-packages" / "client-package.zip")
    assert "client-package/fedml/keep/notes.md" in entries
    for dropped in ["model.ckpt", "big.bin", ".pyc", ".git/", "dist-packages"]:
        assert not any(dropped in n for n in entries), dropped


def test_bootstrap_missing_from_package_is_refused(project: Path) -> None:
    (project / "config" / "bootstrap.sh").unlink()
    code, out = build(project)
    assert code == 2 and "environment_args.bootstrap" in out and "config/bootstrap.sh" in out
    assert no_package(project)


def test_validate_prints_ok_or_each_problem(project: Path) -> None:
    config = project / "config" / "fedml_config.yaml"
    code, out = cli("validate", config)
    assert code == 0 and f"OK: {config} is a valid UnitedLLM config" in out
    code, out = cli(
        "validate", config, "--set", "train_args.comm_round=0", "--set", "train_args.learning_rate=-1"
    )
    assert code == 2
    lines = [line for line in out.splitlines() if line.startswith("train_args.")]
    assert any(line.startswith("train_args.comm_round: ") for line in lines), out
    assert any(line.startswith("train_args.learning_rate: ") for line in lines), out
    assert "Traceback" not in out


def test_validate_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    code, out = cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml" in out and "Traceback" not in out


def test_validate_accepts_the_seed_config() -> None:
    seed = (
        ROOT / "tests" / "fixtures" / "fedml_config.yaml"
    )  # the seed, unchanged (test_config checks the copy)
    code, out = cli("validate", seed)
    assert code == 0, out


def test_init_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    code, out = cli("init", tmp_path / "taken")
    assert code == 2 and "not empty" in out
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_init_project_trains_in_one_process(project: Path, tmp_path: Path) -> None:
    """The template config really trains: a 2-round offline run of the project as `init` wrote it."""
    env = {**os.environ, "UNITEDLLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", "scripts/run_local.sh", "-q", "--run-id", "tpl"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (
        "finished: 2 rounds" in done.stdout + done.stderr
    )  # the run summary goes to stderr, beside the live display
    assert (project / ".logs" / "UnitedLLM" / "tpl" / "metrics.jsonl").is_file()


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['unitedllm-build', '--help']\n"
        "from unitedllm_build.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "-sf, --source_folder" in out
    assert out.strip().endswith("LIGHT")


def test_gitignore_negation_follows_git(project: Path) -> None:
    (project / ".gitignore").write_text(
        "*.bin\n!weights/keep.bin\nlogs/\n!logs/keep.txt\n/notes.md\ncache\n!cache\n\\!literal.txt\n"
    )
    files = [
        "weights/keep.bin",
        "weights/drop.bin",
        "logs/keep.txt",
        "notes.md",
        "docs/notes.md",
        "cache/data.txt",
        "!literal.txt",
    ]
    for rel in files:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x\n")
    code, out = build(project)
    assert code == 0, out
    packaged = {
        n.split("/fedml/", 1)[-1] for n in names(project / "build" / "dist-packages" / "client-package.zip")
    }
    tracked = {rel for rel in files if rel in packaged}
    # What `git add .` would take: a re-included file comes back, but not from inside an ignored folder.
    assert tracked == {"weights/keep.bin", "docs/notes.md", "cache/data.txt"}, sorted(packaged)
