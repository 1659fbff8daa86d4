"""The controller on PostgreSQL: the migrations and a run's whole life on a real server.

Needs the PostgreSQL server binaries (``scripts/test.sh`` installs Debian's ``postgresql``) and the
``psycopg`` driver (the ``test`` extra; teams that use PostgreSQL install it themselves); without them
the test is skipped, and under CI it fails.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import require, unique_name

from unitedllm.devservices import free_port
from unitedllm.platform.db import Database

PG_BIN = [Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def _pg(tool: str) -> str | None:
    return shutil.which(tool) or next((str(d / tool) for d in PG_BIN if (d / tool).exists()), None)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require("the psycopg driver is not installed (pip install 'psycopg[binary]')")
    initdb, pg_ctl = _pg("initdb"), _pg("pg_ctl")
    require(
        "PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install postgresql)"
        if initdb is None or pg_ctl is None
        else None
    )
    assert initdb is not None and pg_ctl is not None
    # PostgreSQL refuses to run as root: as root, run it as the 'postgres' user.
    as_user = ["runuser", "-u", "postgres", "--"] if getpass.getuser() == "root" else []
    # Outside pytest's folders, which only root may enter.
    data = Path(tempfile.mkdtemp(prefix="unitedllm-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(initdb, "-D", str(data), "-U", "platform", "--auth=trust")
    run(
        pg_ctl,
        "-D",
        str(data),
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        "-l",
        str(data / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql+psycopg://platform@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


class NoStore:
    """No S3 in this test: archiving the run's logs fails the way an unreachable store does."""

    def archive_sync(self, run_id: str, data: bytes) -> tuple[str, str]:
        from unitedllm.errors import CommError

        raise CommError("no S3 store in this test")


def test_the_controller_works_on_postgresql(postgres_url: str) -> None:
    from unitedllm.platform.catalog import Catalog
    from unitedllm.platform.controller import Controller
    from unitedllm.platform.models import Device, Package
    from unitedllm.platform.runs import RunService
    from unitedllm.platform.signing import KeyPair

    db = Database(postgres_url)
    db.upgrade()
    db.upgrade()
    with db.session() as s:
        s.add_all(
            [
                Package(digest=d, kind=k, name=f"{k}.zip", size=1, signature="s")
                for d, k in (("s" * 64, "server"), ("c" * 64, "client"))
            ]
        )
        s.add_all(
            [
                Device(id=i, name=i, role=r, public_key=f"key-{i}")
                for i, r in (("agg", "server"), ("edge", "client"))
            ]
        )
    controller = Controller(db, keys=KeyPair.generate(), master_secret=os.urandom(32), store=NoStore())  # type: ignore[arg-type]
    token = controller.ensure_admin_token()
    assert (
        token is not None and controller.role_of(token) == "admin" and controller.ensure_admin_token() is None
    )
    catalog = Catalog(db)
    catalog.save_config("short", {"train_args.comm_round": 2})
    catalog.save_application("app", server_package="s" * 16, client_package="c" * 16)
    runs = RunService(controller)
    run_id = runs.launch(
        server_package="s" * 64,
        client_package="c" * 64,
        server_device="agg",
        client_devices=["edge"],
        run_id=unique_name("run"),
    )["id"]
    assert [c["payload"]["kind"] for c in runs.pending_commands("edge")] == ["start"]
    runs.append_logs("edge", run_id=run_id, seq=0, text="hello\n")
    runs.append_logs("edge", run_id=run_id, seq=0, text="hello\n")  # sent twice, kept once
    for device in ("agg", "edge"):
        runs.report(device, run_id=run_id, state="RUNNING")
    runs.stop(run_id)
    for device in ("agg", "edge"):
        runs.report(device, run_id=run_id, state="KILLED")
    assert runs.run(run_id)["state"] == "KILLED"
    assert [b["text"] for b in runs.logs(run_id)] == ["hello\n"]
    assert all(d["run_id"] is None for d in controller.devices())
    db.close()
