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
