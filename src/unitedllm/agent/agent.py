"""The agent on each machine: enrol once, then heartbeats, presence, signed commands and one role at a time.

Commands arrive by HTTP long-poll from the controller (the controller keeps each command until
the agent acknowledges it, so none is lost to a dropped connection or a restart of either side).
Every command must carry the platform's signature, this device's id, an unexpired expiry and a
nonce never seen before; anything else is refused and logged. Where the platform manages the
broker's identities, the agent also stays online on the broker as its own device, with a last
will that marks it offline the moment its process dies (:mod:`unitedllm.agent.presence`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from unitedllm.agent.hardware import hardware_report, system_metrics
from unitedllm.agent.identity import AgentState
from unitedllm.agent.launcher import Launcher, LocalProcessLauncher
from unitedllm.agent.link import PlatformLink
from unitedllm.agent.presence import PresenceBeacon, broker_settings
from unitedllm.agent.role import RoleRunner
from unitedllm.platform import signing
from unitedllm.platform.errors import CommandRefused, PlatformError
from unitedllm.platform.states import FAILED

__all__ = ["Agent", "enrol"]

log = logging.getLogger(__name__)

POLL_WAIT_S = 20.0


def enrol(state: AgentState, *, platform: str, token: str | None, name: str, role: str) -> dict[str, Any]:
    """Enrol this machine (once): with a one-time token, or without one to wait for an admin's
    approval in the page. Returns the saved enrolment."""
    existing = state.enrolment()
    if existing is not None:
        if existing["platform"].rstrip("/") != platform.rstrip("/"):
            raise PlatformError(
                f"{state.root} is enrolled with {existing['platform']}, not {platform}; use another --state-dir"
            )
        return existing
    keys = state.keys()
    with PlatformLink(platform, keys=keys) as link:
        answer = link.enrol(
            {
                "token": token,
                "name": name,
                "role": role,
                "public_key": keys.public_text,
                "hardware": hardware_report(),
            }
        )
    enrolment = {
        "platform": platform,
        "device_id": answer["device_id"],
        "platform_public_key": answer["platform_public_key"],
        "name": name,
        "role": role,
    }
    state.save_enrolment(enrolment)
    log.info(
        "enrolled as %s (%s); platform key %s",
        name,
        answer["device_id"],
        signing.fingerprint(answer["platform_public_key"]),
    )
    if not answer.get("approved", True):
        log.info("waiting for approval in the page: this device's key fingerprint is %s", keys.fingerprint)
    return enrolment


class Agent:
    """Runs until :meth:`shutdown`: heartbeats in one thread, command polling in the caller's."""

    def __init__(
        self,
        state: AgentState,
        *,
        heartbeat_s: float = 5.0,
        launcher: Launcher | None = None,
        stop_roles_on_exit: bool = False,
    ):
        enrolment = state.enrolment()
        if enrolment is None:
            raise PlatformError(f"{state.root}: not enrolled; start the agent with --enrol TOKEN once")
        self.state = state
        self.device_id = str(enrolment["device_id"])
        self.platform_public = str(enrolment["platform_public_key"])
        self.link = PlatformLink(str(enrolment["platform"]), keys=state.keys(), device_id=self.device_id)
        self.heartbeat_s = heartbeat_s
        self.launcher = launcher or LocalProcessLauncher()
        self.stop_roles_on_exit = stop_roles_on_exit
        self.stopping = threading.Event()
        self.role: RoleRunner | None = None
        self._lock = threading.Lock()
        self._told_pending = False
        self.beacon: PresenceBeacon | None = None

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        record = self.state.role()
        if record is not None:
            self.role = self._runner()
            self.role.reattach(record)
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        threading.Thread(target=self._presence, name="presence", daemon=True).start()
        try:
            while not self.stopping.is_set():
                try:
                    commands = self.link.post(
                        "/api/agent/commands", {"wait": POLL_WAIT_S}, timeout_s=POLL_WAIT_S + 15
                    )
                except PlatformError as exc:
                    self._warn("command poll", exc)
                    self.stopping.wait(self.heartbeat_s if exc.status == 403 else 2.0)
                    continue
                for envelope in commands.get("commands", []):
                    self.handle(envelope)
        finally:
            self.stopping.set()
            if self.stop_roles_on_exit and self.role is not None:
                self.role.stop_requested.set()
                self.role.join(60)
            with self._lock:
                beacon, self.beacon = self.beacon, None
            if beacon is not None:
                beacon.stop()
            self.link.close()

    def shutdown(self) -> None:
        self.stopping.set()

    # -- commands ------------------------------------------------------------------------

    def handle(self, envelope: dict[str, Any]) -> None:
        """Check one command and carry it out; a refused command is logged and never run."""
        try:
            payload = signing.open_command(
                envelope, platform_public=self.platform_public, device_id=self.device_id
            )
        except CommandRefused as exc:
            log.warning("%s", exc)
            return
        nonce = str(payload["nonce"])
        if self.state.seen(nonce):
            log.warning("command refused: nonce %s was already used (replay)", nonce[:8])
            self._ack(nonce)  # the controller may be re-sending one we ran but whose ack it lost
            return
        self.state.remember(nonce, float(payload["expires_at"]))
        self._ack(nonce)
        match payload["kind"]:
            case "start":
                self._start(payload)
            case "stop":
                self._stop(str(payload["run_id"]))
            case "abort":
                self._stop(str(payload["run_id"]), grace_s=0.0)
            case other:
                log.warning("command refused: unknown kind %r", other)

    def _ack(self, nonce: str) -> None:
        try:
            self.link.post("/api/agent/ack", {"nonce": nonce})
        except PlatformError as exc:
            log.warning("could not acknowledge a command: %s", exc)

    def _start(self, payload: dict[str, Any]) -> None:
        busy = self.role
        if busy is not None and busy.run_id != payload["run_id"] and busy.stop_requested.is_set():
            # The controller frees a device whose start it withdrew, and the next run's start may
            # overtake the end of that role here: a stopping role ends in moments, so wait for it.
            deadline = time.monotonic() + busy.stop_grace_s + 15
            while self.role is busy and time.monotonic() < deadline:
                time.sleep(0.1)
        with self._lock:
            busy = self.role
            if busy is not None and busy.run_id != payload["run_id"]:
                # A device is never bound to two runs: refuse rather than start a second role.
                self.link.post(
                    "/api/agent/state",
                    {
                        "run_id": payload["run_id"],
                        "state": FAILED,
                        "detail": f"device busy with run {busy.run_id}",
                    },
                )
                return
            if busy is not None:
                return  # already running this run's role
            self.role = self._runner()
            self.role.start(payload)

    def _stop(self, run_id: str, *, grace_s: float | None = None) -> None:
        with self._lock:
            if self.role is not None and self.role.run_id == run_id:
                if grace_s is not None:
                    self.role.stop_grace_s = grace_s
                self.role.stop_requested.set()

    def _runner(self) -> RoleRunner:
        return RoleRunner(
            link=self.link,
            state=self.state,
            launcher=self.launcher,
            platform_public=self.platform_public,
            stopping=self.stopping,
            on_done=self._role_done,
        )

    def _role_done(self, runner: RoleRunner) -> None:
        with self._lock:
            if self.role is runner:
                self.role = None

    def _warn(self, what: str, exc: PlatformError) -> None:
        """Say once that the device waits for approval; warn about any other failure each time."""
        if exc.status == 403 and "waiting for approval" in str(exc):
            if not self._told_pending:
                log.info("waiting for approval in the page (key fingerprint %s)", self.link.keys.fingerprint)
                self._told_pending = True
            return
        log.warning("%s failed: %s", what, exc)

    # -- presence on the broker -----------------------------------------------------------

    def _presence(self) -> None:
        """Fetch this device's broker login (once approved) and stay online on the broker."""
        while not self.stopping.is_set():
            try:
                identity = self.link.post("/api/agent/broker", {})
                break
            except PlatformError as exc:
                self._warn("broker login", exc)
                self.stopping.wait(self.heartbeat_s)
        else:
            return
        if not identity:
            log.info("presence by heartbeats only: the platform manages no broker identities")
            return
        settings = broker_settings(identity)
        if settings is None:
            return
        beacon = PresenceBeacon(
            settings, device_id=self.device_id, topic=str(identity["topic"]), keys=self.link.keys
        )
        with self._lock:
            if self.stopping.is_set():
                return
            self.beacon = beacon
            beacon.start()

    # -- heartbeats ----------------------------------------------------------------------

    def _heartbeats(self) -> None:
        first = True
        while not self.stopping.is_set():
            role = self.role
            body: dict[str, Any] = {
                "metrics": system_metrics(),
                "roles": [{"run_id": role.run_id, "rank": role.rank, "state": role.current}]
                if role and role.run_id
                else [],
            }
            if first:
                body["hardware"] = hardware_report()
            try:
                self.link.post("/api/agent/heartbeat", body)
                first = False
            except PlatformError as exc:
                self._warn("heartbeat", exc)
            self.stopping.wait(self.heartbeat_s)


def default_state_dir(name: str) -> Path:
    return Path.home() / ".unitedllm" / "agent" / name
