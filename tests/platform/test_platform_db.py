"""The controller's database: the migrations build exactly the tables the code expects."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from unitedllm.platform.db import Database
from unitedllm.platform.models import Base


def test_migrations_create_the_schema_the_models_describe(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'platform.db'}")
    db.upgrade()
    db.upgrade()  # a second start finds nothing to do
    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "models changed without a migration: add one under platform/migrations/versions"
    assert "runs" in inspect(db.engine).get_table_names()
    db.close()


def test_upgrading_a_database_keeps_its_rows(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import text

    db = Database(f"sqlite:///{tmp_path / 'platform.db'}")
    config = db.alembic_config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO devices (id, name, role, public_key, approved, hardware, metrics, state, last_seen,"
                " enrolled_at) VALUES ('d1', 'edge', 'client', 'k', 1, '{}', '{}', 'IDLE', 0, 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO packages VALUES ('p', 'server', 'p.zip', 1, 's', '{}', 0), ('q', 'client', 'q.zip', 1, 's', '{}', 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO runs (id, server_digest, client_digest, overrides, state, created_at) VALUES ('r', 'p', 'q', '[]', 'RUNNING', 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO log_batches (run_id, device_id, seq, text, created_at) VALUES ('r', 'd1', 0, 'hello', 0)"
            )
        )
    db.upgrade()
    from unitedllm.platform.controller import Controller
    from unitedllm.platform.runs import RunService
    from unitedllm.platform.signing import KeyPair

    runs = RunService(Controller(db, keys=KeyPair.generate(), master_secret=b"x", store=None))  # type: ignore[arg-type]
    assert [b["text"] for b in runs.logs("r")] == ["hello"]  # the old batch is the role's log stream
    runs.append_logs("d1", run_id="r", seq=0, text="round 0", stream="metrics")  # same seq, other stream
    assert [b["text"] for b in runs.logs("r", stream="metrics")] == ["round 0"]
    db.close()


def test_run_state_follows_its_members() -> None:
    from unitedllm.platform.states import run_state

    assert run_state("QUEUED", [(0, "QUEUED"), (1, "QUEUED")]) == "QUEUED"
    assert run_state("QUEUED", [(0, "INITIALIZING"), (1, "QUEUED")]) == "INITIALIZING"
    assert run_state("INITIALIZING", [(0, "RUNNING"), (1, "INITIALIZING")]) == "RUNNING"
    # A failed client does not end the run; the aggregator decides.
    assert run_state("RUNNING", [(0, "RUNNING"), (1, "FAILED")]) == "RUNNING"
    assert run_state("RUNNING", [(0, "FINISHED"), (1, "FAILED"), (2, "FINISHED")]) == "FINISHED"
    assert run_state("RUNNING", [(0, "FAILED"), (1, "FINISHED")]) == "FAILED"
    assert run_state("STOPPING", [(0, "KILLED"), (1, "FINISHED")]) == "KILLED"
    assert run_state("STOPPING", [(0, "RUNNING"), (1, "KILLED")]) == "STOPPING"
    assert run_state("FINISHED", [(0, "RUNNING")]) == "FINISHED"


def test_a_heartbeat_read_before_a_report_never_moves_a_role_back(tmp_path: Path) -> None:
    from unitedllm.platform.controller import Controller
    from unitedllm.platform.models import Device, Package
    from unitedllm.platform.runs import RunService
    from unitedllm.platform.signing import KeyPair

    db = Database(f"sqlite:///{tmp_path / 'platform.db'}")
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
    runs = RunService(Controller(db, keys=KeyPair.generate(), master_secret=b"x", store=None))  # type: ignore[arg-type]
    run_id = runs.launch(
        server_package="s" * 64, client_package="c" * 64, server_device="agg", client_devices=["edge"]
    )["id"]
    runs.report("edge", run_id=run_id, state="INITIALIZING")
    runs.report("edge", run_id=run_id, state="RUNNING")
    runs.report("edge", run_id=run_id, state="INITIALIZING", resync=True)  # a heartbeat that lost the race
    assert runs.run(run_id)["members"][1]["state"] == "RUNNING"
    assert [e["state"] for e in runs.events(run_id) if e["rank"] == 1] == ["INITIALIZING", "RUNNING"]
    runs.report("edge", run_id=run_id, state="FINISHED", resync=True)  # forward is fine
    assert runs.run(run_id)["members"][1]["state"] == "FINISHED"
    db.close()
