"""The wheel a user installs: it carries the root templates/ and `unitedllm-build init` works from it alone."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (built,) = out.glob("unitedllm-*.whl")
    return built


def test_the_wheel_carries_every_template_file(wheel: Path) -> None:
    template = ROOT / "templates"
    expected = {
        "unitedllm_build/templates/" + path.relative_to(template).as_posix()
        for path in template.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "unitedllm_build/templates/project/.gitignore" in expected
    assert "unitedllm_build/templates/project/models/tiny-gpt-neox/config.json" in expected
    names = set(zipfile.ZipFile(wheel).namelist())
    assert expected <= names, sorted(expected - names)


def test_init_runs_from_the_installed_wheel_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Dependencies come read-only from the test environment (a .pth entry, so its editable UnitedLLM
    # finder never loads); UnitedLLM itself only from the wheel.
    fresh_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(fresh_site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    where = subprocess.run(
        [python, "-c", "import unitedllm_build; print(unitedllm_build.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(fresh_site), where

    project = tmp_path / "project"
    done = subprocess.run(
        [env_dir / "bin" / "unitedllm-build", "init", str(project)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    made = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    shipped = {
        p.relative_to(ROOT / "templates" / "project").as_posix()
        for p in (ROOT / "templates" / "project").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert made == shipped
    assert (project / "config" / "fedml_config.yaml").read_bytes() == (
        ROOT / "templates" / "project" / "config" / "fedml_config.yaml"
    ).read_bytes()
    assert os.access(project / "scripts" / "run_local.sh", os.X_OK)
