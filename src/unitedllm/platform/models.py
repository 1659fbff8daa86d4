"""The controller's database tables (SQLAlchemy 2): devices, packages, applications, runs and their logs.

Nothing secret is stored in clear: tokens are stored as sha256 hashes, and a run's secrets are
derived from the platform's master secret (a file beside the platform key), never written here.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiToken",
    "Application",
    "ApplicationVersion",
    "Base",
    "Command",
    "Device",
    "DeviceSample",
    "EnrolToken",
    "HyperConfig",
    "LogBatch",
    "Package",
    "Project",
    "Run",
    "RunMember",
    "StateEvent",
]


def _now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    """A login for the API and the page: ``admin`` may change things, ``read`` may only look."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class EnrolToken(Base):
    """A one-time token that lets one agent enrol (hash only); ``used_by`` is set when spent."""

    __tablename__ = "enrol_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str | None] = mapped_column(String(10), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    used_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Device(Base):
    """An enrolled machine: its public key, role, hardware, last heartbeat and the run it is bound to."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(10))
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    approved: Mapped[bool] = mapped_column(default=True)
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="IDLE")
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    # The last presence the broker carried ("online", or "offline" from the agent's last will) and
    # the start of the agent's broker connection it belongs to (presence applies in that order).
    presence: Mapped[str | None] = mapped_column(String(8), nullable=True)
    presence_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    enrolled_at: Mapped[float] = mapped_column(Float, default=_now)
    # The one run this device is bound to; a device is never bound to two runs.
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DeviceSample(Base):
    """One heartbeat's system metrics of a device (CPU, memory, GPUs, network), for the load plots;
    only the newest samples of each device are kept (``Controller.samples_kept``)."""

    __tablename__ = "device_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Package(Base):
    """A pushed package, stored in S3 under its zip's sha256, with the platform's signature over it."""

    __tablename__ = "packages"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    signature: Mapped[str] = mapped_column(String(120))
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class Application(Base):
    """A named pair of server and client packages; each change is a new version."""

    __tablename__ = "applications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class ApplicationVersion(Base):
    __tablename__ = "application_versions"
    __table_args__ = (UniqueConstraint("application_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    application_id: Mapped[int] = mapped_column(ForeignKey("applications.id"))
    version: Mapped[int] = mapped_column(Integer)
    server_digest: Mapped[str] = mapped_column(ForeignKey("packages.digest"))
    client_digest: Mapped[str] = mapped_column(ForeignKey("packages.digest"))
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class Project(Base):
    """Groups the runs of one application."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    application_id: Mapped[int] = mapped_column(ForeignKey("applications.id"))
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class HyperConfig(Base):
    """A saved, named set of config overrides (``train_args.comm_round: 3``), checked when saved."""

    __tablename__ = "hyper_configs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)


class Run(Base):
    """A federated run: its packages, overrides and state (FedML's state names)."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"), nullable=True)
    server_digest: Mapped[str] = mapped_column(ForeignKey("packages.digest"))
    client_digest: Mapped[str] = mapped_column(ForeignKey("packages.digest"))
    overrides: Mapped[list[Any]] = mapped_column(default=list)
    state: Mapped[str] = mapped_column(String(16), default="QUEUED")
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Where each device's whole log went in S3 once the run ended: {device_id: {"digest", "size"}}.
    log_archive: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The exported final model its aggregator's agent uploaded: {"digest", "size"} in S3 (models/).
    model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RunMember(Base):
    """One device's place in a run: its rank (0 = aggregator) and its last reported state."""

    __tablename__ = "run_members"
    __table_args__ = (UniqueConstraint("run_id", "rank"), UniqueConstraint("run_id", "device_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    rank: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="QUEUED")
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)


class Command(Base):
    """A command waiting for its device (start/stop); delivered until the agent acknowledges it.

    The signed payload is built when delivered, so the run's secrets are never stored.
    """

    __tablename__ = "commands"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    kind: Mapped[str] = mapped_column(String(10))
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float] = mapped_column(Float)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class LogBatch(Base):
    """A sequenced batch of a role's output lines (``stream`` "log") or of its metrics.jsonl lines
    (``stream`` "metrics"); a batch sent twice is stored once."""

    __tablename__ = "log_batches"
    __table_args__ = (UniqueConstraint("run_id", "device_id", "stream", "seq", name="uq_log_batch"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    stream: Mapped[str] = mapped_column(String(10), default="log", server_default="log")
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class StateEvent(Base):
    """One state change of a run or of a device in it, in the order they happened."""

    __tablename__ = "state_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    device_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[float] = mapped_column(Float, default=_now)
