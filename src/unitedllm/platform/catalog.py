"""The seed's objects by their names: applications (versioned server + client package pairs),
projects (the runs of one application) and saved hyper-parameter configurations."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from unitedllm.platform.db import Database
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.models import Application, ApplicationVersion, HyperConfig, Package, Project

__all__ = ["Catalog", "check_overrides"]


def check_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """Problems of a set of overrides under the config schema, one line each (empty when fine).

    The overrides are applied to an all-defaults config, so a misspelt key, a value of the wrong
    type or out of range, and a cross-field conflict among the overridden keys are all caught.
    """
    from unitedllm.config.loader import build_config

    if not isinstance(overrides, Mapping) or not overrides:
        return ["a configuration holds at least one KEY: VALUE override"]
    _cfg, problems = build_config({}, overrides=dict(overrides))
    keys = [str(k) for k in overrides]
    related = [
        p for p in problems if not p.path or any(p.path.startswith(k) or k.startswith(p.path) for k in keys)
    ]
    return [str(p) for p in related]


def _name(value: Any, what: str) -> str:
    name = str(value or "").strip()
    if not name or len(name) > 100:
        raise PlatformError(f"{what} name {value!r}: give 1 to 100 characters", status=422)
    return name


class Catalog:
    """Applications, projects and saved configurations in the controller's database."""

    def __init__(self, db: Database):
        self.db = db

    # -- applications --------------------------------------------------------------------

    def save_application(self, name: str, *, server_package: str, client_package: str) -> dict[str, Any]:
        """Create the application, or add a new version of it when the packages differ."""
        name = _name(name, "application")
        with self.db.session() as s:
            server = self._package(s, server_package, "server")
            client = self._package(s, client_package, "client")
            app = s.scalar(select(Application).where(Application.name == name))
            if app is None:
                app = Application(name=name)
                s.add(app)
                s.flush()
            latest = self._latest(s, app.id)
            if latest is None or (latest.server_digest, latest.client_digest) != (
                server.digest,
                client.digest,
            ):
                version = (latest.version if latest else 0) + 1
                s.add(
                    ApplicationVersion(
                        application_id=app.id,
                        version=version,
                        server_digest=server.digest,
                        client_digest=client.digest,
                    )
                )
                s.flush()
            return self._application_view(s, app)

    def _package(self, s: Any, ref: str, kind: str) -> Package:
        matches = list(s.scalars(select(Package).where(Package.digest.startswith(ref)))) if ref else []
        if len(matches) != 1:
            raise PlatformError(f"no {kind} package {ref!r}", status=404)
        if matches[0].kind != kind:
            raise PlatformError(
                f"package {ref!r} is a {matches[0].kind} package, not a {kind} one", status=422
            )
        package: Package = matches[0]
        return package

    def _latest(self, s: Any, application_id: int) -> ApplicationVersion | None:
        latest: ApplicationVersion | None = s.scalar(
            select(ApplicationVersion)
            .where(ApplicationVersion.application_id == application_id)
            .order_by(ApplicationVersion.version.desc())
            .limit(1)
        )
        return latest

    def _application_view(self, s: Any, app: Application) -> dict[str, Any]:
        versions = s.scalars(
            select(ApplicationVersion)
            .where(ApplicationVersion.application_id == app.id)
            .order_by(ApplicationVersion.version)
        )
        return {
            "id": app.id,
            "name": app.name,
            "versions": [
                {"version": v.version, "server_package": v.server_digest, "client_package": v.client_digest}
                for v in versions
            ],
        }

    def applications(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [
                self._application_view(s, a)
                for a in s.scalars(select(Application).order_by(Application.name))
            ]

    def application_packages(self, name: str, version: int | None = None) -> tuple[str, str]:
        """(server, client) package digests of an application's given (or newest) version."""
        with self.db.session() as s:
            app = s.scalar(select(Application).where(Application.name == name))
            if app is None:
                raise PlatformError(f"no application {name!r}", status=404)
            query = select(ApplicationVersion).where(ApplicationVersion.application_id == app.id)
            row = (
                s.scalar(query.where(ApplicationVersion.version == version))
                if version is not None
                else self._latest(s, app.id)
            )
            if row is None:
                raise PlatformError(f"application {name!r} has no version {version}", status=404)
            return row.server_digest, row.client_digest

    # -- projects ------------------------------------------------------------------------

    def create_project(self, name: str, application: str) -> dict[str, Any]:
        name = _name(name, "project")
        with self.db.session() as s:
            app = s.scalar(select(Application).where(Application.name == application))
            if app is None:
                raise PlatformError(f"no application {application!r}", status=404)
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise PlatformError(f"project {name!r} already exists", status=409)
            project = Project(name=name, application_id=app.id)
            s.add(project)
            s.flush()
            return {"id": project.id, "name": name, "application": application}

    def projects(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.execute(
                select(Project.id, Project.name, Application.name).join(
                    Application, Project.application_id == Application.id
                )
            )
            return [{"id": i, "name": n, "application": a} for i, n, a in rows]

    def project(self, name: str) -> dict[str, Any]:
        for project in self.projects():
            if project["name"] == name:
                return project
        raise PlatformError(f"no project {name!r}", status=404)

    # -- saved hyper-parameter configurations --------------------------------------------

    def save_config(self, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Add or replace a named configuration; refused with every problem when it does not validate."""
        name = _name(name, "configuration")
        problems = check_overrides(overrides)
        if problems:
            raise PlatformError(f"configuration {name!r}: " + "; ".join(problems), status=422)
        with self.db.session() as s:
            row = s.scalar(select(HyperConfig).where(HyperConfig.name == name))
            if row is None:
                row = HyperConfig(name=name, overrides=dict(overrides))
                s.add(row)
            else:
                row.overrides = dict(overrides)
                row.updated_at = time.time()
            s.flush()
            return {"name": row.name, "overrides": row.overrides, "updated_at": row.updated_at}

    def delete_config(self, name: str) -> None:
        with self.db.session() as s:
            row = s.scalar(select(HyperConfig).where(HyperConfig.name == name))
            if row is None:
                raise PlatformError(f"no configuration {name!r}", status=404)
            s.delete(row)

    def configs(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [
                {"name": c.name, "overrides": c.overrides, "updated_at": c.updated_at}
                for c in s.scalars(select(HyperConfig).order_by(HyperConfig.name))
            ]

    def config_overrides(self, name: str) -> list[str]:
        """A saved configuration as ``KEY=VALUE`` overrides (values as YAML/JSON text)."""
        import json

        for config in self.configs():
            if config["name"] == name:
                return [f"{k}={json.dumps(v)}" for k, v in config["overrides"].items()]
        raise PlatformError(f"no configuration {name!r}", status=404)
