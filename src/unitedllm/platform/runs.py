"""Runs on the controller: launch on chosen devices, commands to agents, reported states and logs.

A run's secrets (the shared run secret and one key per rank) are derived from the platform's
master secret when a start command is handed out, so they are never written to the database.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from unitedllm.platform import signing
from unitedllm.platform.broker import Grant, device_username
from unitedllm.platform.controller import Controller
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.models import Command, Device, Package, Run, RunMember, StateEvent
from unitedllm.platform.run_logs import RunLogs
from unitedllm.platform.states import (
    IDLE,
    KILLED,
    PROGRESS,
    QUEUED,
    REPORTABLE,
    STOPPING,
    TERMINAL,
    run_state,
)

__all__ = ["RunService"]

COMMAND_TTL_S = 600.0  # a start command not picked up within this is refused by the agent


class RunService:
    """Launches, stops and follows runs; ``notify(device_id)`` wakes that device's waiting poll."""

    def __init__(self, controller: Controller, *, notify: Callable[[str], None] = lambda _d: None):
        self.controller = controller
        self.db = controller.db
        self.notify = notify
        # One writer at a time decides a run's next state (two reports at once must not both see
        # the old state); the row lock does the same across controller processes on PostgreSQL.
        self._lock = threading.RLock()
        self.logbook = RunLogs(controller)
        self.append_logs = self.logbook.append_logs
        self.logs = self.logbook.logs
        self.metrics = self.logbook.metrics
        self.rounds = self.logbook.rounds
        self.archive_logs = self.logbook.archive_logs

    # -- launch --------------------------------------------------------------------------

    def launch(
        self,
        *,
        server_package: str,
        client_package: str,
        server_device: str,
        client_devices: Sequence[str],
        overrides: Sequence[str] = (),
        project_id: int | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Create a run, bind its devices (rank 0 the aggregator, 1..N clients) and queue start commands."""
        if not client_devices:
            raise PlatformError("a run needs at least one client device", status=422)
        server_pkg = self.controller.package(server_package)
        client_pkg = self.controller.package(client_package)
        if server_pkg["kind"] != "server" or client_pkg["kind"] != "client":
            raise PlatformError(
                f"packages: {server_pkg['name']} is a {server_pkg['kind']} package and "
                f"{client_pkg['name']} a {client_pkg['kind']} one; need a server and a client",
                status=422,
            )
        run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        ranked = [(0, server_device), *((r, d) for r, d in enumerate(client_devices, start=1))]
        with self._lock, self.db.session() as s:
            if s.get(Run, run_id) is not None:
                raise PlatformError(f"run {run_id!r} already exists", status=409)
            devices: list[Device] = []
            for rank, ref in ranked:
                device = s.get(Device, ref) or s.scalar(select(Device).where(Device.name == ref))
                if device is None:
                    raise PlatformError(f"no device {ref!r}", status=404)
                want = "server" if rank == 0 else "client"
                if device.role != want:
                    raise PlatformError(
                        f"device {device.name!r} is a {device.role}, rank {rank} needs a {want}", status=422
                    )
                if not device.approved:
                    raise PlatformError(f"device {device.name!r} is waiting for approval", status=422)
                if device.run_id is not None:
                    raise PlatformError(
                        f"device {device.name!r} is busy with run {device.run_id}", status=409
                    )
                if device in devices:
                    raise PlatformError(f"device {device.name!r} is chosen twice", status=422)
                devices.append(device)
            s.add(
                Run(
                    id=run_id,
                    project_id=project_id,
                    server_digest=server_pkg["digest"],
                    client_digest=client_pkg["digest"],
                    overrides=list(overrides),
                )
            )
            s.flush()
            for (rank, _ref), device in zip(ranked, devices, strict=True):
                device.run_id = run_id
                device.state = QUEUED
                s.add(RunMember(run_id=run_id, device_id=device.id, rank=rank))
                s.add(self._command(device.id, run_id, "start"))
            s.add(StateEvent(run_id=run_id, state=QUEUED, detail=f"{len(devices)} devices"))
        self.sync_broker()  # the devices' broker identities may use the run's topics before they start
        for device in devices:
            self.notify(device.id)
        return self.run(run_id)

    def _command(self, device_id: str, run_id: str, kind: str) -> Command:
        return Command(
            device_id=device_id,
            run_id=run_id,
            kind=kind,
            nonce=secrets.token_hex(16),
            expires_at=time.time() + COMMAND_TTL_S,
        )

    def stop(self, run_id: str, *, abort: bool = False) -> dict[str, Any]:
        """Ask every device of the run to stop its role (``abort``: kill it at once, no grace period);
        the run ends KILLED when all have stopped."""
        with self._lock, self.db.session() as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run is None:
                raise PlatformError(f"no run {run_id!r}", status=404)
            if run.state in TERMINAL:
                return self._view(s, run)
            run.state = STOPPING
            s.add(
                StateEvent(
                    run_id=run_id, state=STOPPING, detail="abort requested" if abort else "stop requested"
                )
            )
            members = list(s.scalars(select(RunMember).where(RunMember.run_id == run_id)))
            targets = []
            for member in members:
                if member.state in TERMINAL:
                    continue
                if member.state == QUEUED and self._withdraw_start(s, member.device_id, run_id):
                    # Never picked up: nothing runs, so the member ends now.
                    member.state = KILLED
                    s.add(
                        StateEvent(run_id=run_id, device_id=member.device_id, rank=member.rank, state=KILLED)
                    )
                    self._release(s, member.device_id)
                # Always sent, even after a withdrawal: the agent may hold the start command already.
                s.add(self._command(member.device_id, run_id, "abort" if abort else "stop"))
                targets.append(member.device_id)
            run_ended = self._settle(s, run)
        if run_ended:
            self._archive_later(run_id)
        for device_id in targets:
            self.notify(device_id)
        return self.run(run_id)

    def _withdraw_start(self, s: Any, device_id: str, run_id: str) -> bool:
        """Withdraw a start command not yet acknowledged; whether there was one."""
        pending = list(
            s.scalars(
                select(Command).where(
                    Command.device_id == device_id,
                    Command.run_id == run_id,
                    Command.kind == "start",
                    Command.acked_at.is_(None),
                )
            )
        )
        for command in pending:
            command.acked_at = time.time()
        return bool(pending)

    # -- the agent's side ----------------------------------------------------------------

    def pending_commands(self, device_id: str) -> list[dict[str, Any]]:
        """Signed, unacknowledged, unexpired commands for a device (re-sent until acknowledged)."""
        now = time.time()
        with self.db.session() as s:
            rows = list(
                s.scalars(
                    select(Command)
                    .where(
                        Command.device_id == device_id, Command.acked_at.is_(None), Command.expires_at > now
                    )
                    .order_by(Command.id)
                )
            )
            return [self._sealed(s, row) for row in rows]

    def _sealed(self, s: Any, command: Command) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "kind": command.kind,
            "device_id": command.device_id,
            "run_id": command.run_id,
            "nonce": command.nonce,
            "issued_at": command.created_at,
            "expires_at": command.expires_at,
        }
        if command.kind == "start":
            run = s.get(Run, command.run_id)
            member = s.scalar(
                select(RunMember).where(RunMember.run_id == run.id, RunMember.device_id == command.device_id)
            )
            package = s.get(Package, run.client_digest if member.rank else run.server_digest)
            ranks = [m.rank for m in s.scalars(select(RunMember).where(RunMember.run_id == run.id))]
            payload.update(
                rank=member.rank,
                package={"digest": package.digest, "size": package.size, "signature": package.signature},
                overrides=list(run.overrides),
                env=self._role_env(run.id, member.rank, ranks, command.device_id),
            )
        return signing.seal_command(self.controller.keys, payload)

    def _role_env(self, run_id: str, rank: int, ranks: list[int], device_id: str) -> dict[str, str]:
        # The aggregator holds every client's key; a client only its own.
        key_ranks = [r for r in ranks if r != 0] if rank == 0 else [rank]
        env = {f"UNITEDLLM_RANK_KEY_{r}": self.controller.derive(f"rank:{run_id}:{r}") for r in key_ranks}
        env["UNITEDLLM_RUN_SECRET"] = self.controller.derive(f"run:{run_id}")
        if self.controller.broker is not None:  # the device's own broker identity
            env["UNITEDLLM_MQTT_USERNAME"] = device_username(device_id)
            env["UNITEDLLM_MQTT_PASSWORD"] = self.controller.derive(f"mqtt:{device_id}")
        return env

    def sync_broker(self) -> None:
        """Rewrite the broker's passwords and ACLs for the approved devices and the runs under way
        (when the platform manages them)."""
        broker = self.controller.broker
        if broker is None:
            return
        with self.db.session() as s:
            live = s.scalars(select(RunMember).where(RunMember.state.not_in(list(TERMINAL))))
            grants = [Grant(m.device_id, m.run_id, m.rank) for m in live]
            # Every approved device has a login, for its agent's presence on the broker.
            approved = list(s.scalars(select(Device.id).where(Device.approved.is_(True))))
        device_ids = {g.device_id for g in grants} | set(approved)
        passwords = {d: self.controller.derive(f"mqtt:{d}") for d in device_ids}
        broker.write(passwords, grants)

    def ack(self, device_id: str, nonce: str) -> None:
        with self.db.session() as s:
            row = s.scalar(select(Command).where(Command.nonce == nonce, Command.device_id == device_id))
            if row is not None and row.acked_at is None:
                row.acked_at = time.time()

    def report(
        self,
        device_id: str,
        *,
        run_id: str,
        state: str,
        exit_code: int | None = None,
        detail: str = "",
        resync: bool = False,
    ) -> dict[str, Any]:
        """A device's report of its role's state; moves the run along and frees the device at the end.

        ``resync`` marks the state a heartbeat carries: it may only move the role forward (it was
        read before a report that may have overtaken it).
        """
        if state not in REPORTABLE:
            raise PlatformError(f"state {state!r}: an agent reports one of {sorted(REPORTABLE)}", status=422)
        ended = False
        with self._lock, self.db.session() as s:
            member = s.scalar(
                select(RunMember).where(RunMember.run_id == run_id, RunMember.device_id == device_id)
            )
            run = s.get(Run, run_id, with_for_update=True)
            if member is None or run is None:
                raise PlatformError(f"device {device_id} has no place in run {run_id!r}", status=404)
            behind = resync and PROGRESS[state] <= PROGRESS.get(member.state, 0)
            if member.state != state and member.state not in TERMINAL and not behind:
                member.state = state
                member.exit_code = exit_code
                member.updated_at = time.time()
                s.add(
                    StateEvent(
                        run_id=run_id, device_id=device_id, rank=member.rank, state=state, detail=detail[:500]
                    )
                )
                device = s.get(Device, device_id)
                if device is not None and device.run_id == run_id:
                    device.state = state
                if state in TERMINAL:
                    self._release(s, device_id)
                    ended = True
            run_ended = self._settle(s, run)
            view = self._view(s, run)
        if ended:
            self.sync_broker()  # an ended role's broker identity loses the run's topics
        if run_ended:
            self._archive_later(run_id)
        return view

    def _release(self, s: Any, device_id: str) -> None:
        device = s.get(Device, device_id)
        if device is not None:
            device.run_id = None
            device.state = IDLE

    def _settle(self, s: Any, run: Run) -> bool:
        """Move the run to the state its members imply; whether it has just ended."""
        members = [(m.rank, m.state) for m in s.scalars(select(RunMember).where(RunMember.run_id == run.id))]
        new = run_state(run.state, members)
        if new == run.state:
            return False
        run.state = new
        s.add(StateEvent(run_id=run.id, state=new))
        if new in TERMINAL:
            run.finished_at = time.time()
            return True
        return False

    def _archive_later(self, run_id: str) -> None:
        # Not in the request that ended the run: S3 may be slow, and the agent waits for the answer.
        threading.Thread(
            target=self.archive_logs, args=(run_id,), name=f"archive-{run_id}", daemon=True
        ).start()

    # -- reading -------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise PlatformError(f"no run {run_id!r}", status=404)
            return self._view(s, run)

    def runs(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [self._view(s, r) for r in s.scalars(select(Run).order_by(Run.created_at))]

    def _view(self, s: Any, run: Run) -> dict[str, Any]:
        members = s.scalars(select(RunMember).where(RunMember.run_id == run.id).order_by(RunMember.rank))
        return {
            "id": run.id,
            "state": run.state,
            "project_id": run.project_id,
            "server_package": run.server_digest,
            "client_package": run.client_digest,
            "overrides": run.overrides,
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "log_archive": run.log_archive,
            "model": run.model,
            "members": [
                {"rank": m.rank, "device_id": m.device_id, "state": m.state, "exit_code": m.exit_code}
                for m in members
            ],
        }

    def events(self, run_id: str, after: int = 0) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(
                select(StateEvent)
                .where(StateEvent.run_id == run_id, StateEvent.id > after)
                .order_by(StateEvent.id)
            )
            return [
                {
                    "id": e.id,
                    "device_id": e.device_id,
                    "rank": e.rank,
                    "state": e.state,
                    "detail": e.detail,
                    "at": e.at,
                }
                for e in rows
            ]
