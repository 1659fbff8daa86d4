"""One role of a run on this device: fetch and verify the package, start it, stream its log, report.

The package must carry the platform's signature over its sha256; only then is it started with
``unitedllm package run`` (which checks every file against the manifest again).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unitedllm.agent.identity import AgentState
from unitedllm.agent.launcher import Launcher, RoleHandle, RoleSpec
from unitedllm.agent.link import PlatformLink
from unitedllm.platform import signing
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.states import FAILED, FINISHED, INITIALIZING, KILLED, RUNNING, STOPPING

__all__ = ["RoleRunner", "package_run_command"]

log = logging.getLogger(__name__)

LOG_BATCH_BYTES = 64 * 1024


def _package_run_accepts_unauthenticated() -> bool:
    """Whether ``unitedllm package run`` has ``--allow-unauthenticated`` (packages unsigned by a package secret)."""
    from unitedllm.packaging import cli

    return "allow_unauthenticated" in inspect.signature(cli.run_command).parameters


def package_run_command(
    zip_path: Path, *, rank: int, run_id: str, workdir: Path, overrides: list[str]
) -> list[str]:
    command = [
        sys.executable, "-m", "unitedllm.packaging", "run", str(zip_path),
        "--rank", str(rank), "--run-id", run_id, "--workdir", str(workdir),
    ]  # fmt: skip
    if _package_run_accepts_unauthenticated():
        command.append("--allow-unauthenticated")  # authenticated by the platform's signature instead
    sets = [part for override in overrides for part in ("--set", override)]
    return [*command, "--", *sets] if sets else command


def metrics_path(package_dir: Path, run_id: str, overrides: list[str]) -> Path | None:
    """Where the role writes metrics.jsonl: ``train_args.output_dir`` of the unpacked config, or of
    the last override that sets it, with ``{run_id}`` filled in, relative to the source folder."""
    import yaml

    manifests = sorted(package_dir.glob("*-package/manifest.json"))
    if not manifests:
        return None
    try:
        conf_file = json.loads(manifests[0].read_text())["conf_file"]
        source = manifests[0].parent / "fedml"
        config = yaml.safe_load((source / conf_file).read_text()) or {}
    except (OSError, ValueError, KeyError, yaml.YAMLError):
        return None
    output = str((config.get("train_args") or {}).get("output_dir") or ".logs/UnitedLLM/{run_id}")
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "train_args.output_dir":
            output = str(yaml.safe_load(value))
    path = Path(output.replace("{run_id}", run_id))
    return (path if path.is_absolute() else source / path) / "metrics.jsonl"


class RoleRunner:
    """Runs one role in a thread of its own and tells the controller every state change."""

    def __init__(
        self,
        *,
        link: PlatformLink,
        state: AgentState,
        launcher: Launcher,
        platform_public: str,
        stopping: threading.Event,
        on_done: Callable[[RoleRunner], None],
    ):
        self.link = link
        self.state = state
        self.launcher = launcher
        self.platform_public = platform_public
        self.agent_stopping = stopping
        self.on_done = on_done
        self.stop_requested = threading.Event()
        self.stop_grace_s = 20.0  # 0 when aborted: killed at once
        self.run_id = ""
        self.rank = -1
        self.overrides: list[str] = []
        self.current = INITIALIZING
        self.handle: RoleHandle | None = None
        self.record: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    # -- starting and re-attaching --------------------------------------------------------

    def start(self, command: dict[str, Any]) -> None:
        self.run_id, self.rank = str(command["run_id"]), int(command["rank"])
        self.overrides = [str(o) for o in command.get("overrides") or []]
        self._thread = threading.Thread(
            target=self._start_and_watch, args=(command,), name=f"role-{self.run_id}", daemon=True
        )
        self._thread.start()

    def reattach(self, record: dict[str, Any]) -> None:
        """Follow a role a previous agent process started; FAILED if it vanished without a trace."""
        self.run_id, self.rank, self.record = str(record["run_id"]), int(record["rank"]), record
        self.overrides = [str(o) for o in record.get("overrides") or []]
        self.handle = self.launcher.attach(record["handle"])
        self._thread = threading.Thread(target=self._reattached, name=f"role-{self.run_id}", daemon=True)
        self._thread.start()

    def _reattached(self) -> None:
        if self.handle is None:
            self._finish(FAILED, None, "the role ended while its agent was down, leaving no exit code")
            return
        self.current = RUNNING
        log.info("run %s: re-attached to rank %d's running role", self.run_id, self.rank)
        self._report(RUNNING, detail="agent restarted and re-attached to the running role")
        self._watch()

    def _start_and_watch(self, command: dict[str, Any]) -> None:
        self._report(INITIALIZING, detail="downloading and verifying the package")
        try:
            zip_path = self._fetch(command["package"])
        except PlatformError as exc:
            self._finish(FAILED, None, str(exc))
            return
        if self.stop_requested.is_set():
            self._finish(KILLED, None, "stopped before the role started")
            return
        run_dir = self.state.run_dir(self.run_id)
        spec = RoleSpec(
            run_id=self.run_id,
            rank=self.rank,
            command=package_run_command(
                zip_path,
                rank=self.rank,
                run_id=self.run_id,
                workdir=run_dir / "package",
                overrides=list(command.get("overrides") or []),
            ),
            workdir=run_dir,
            log_path=run_dir / "role.log",
            env={str(k): str(v) for k, v in (command.get("env") or {}).items()},
        )
        note = f"package {command['package']['digest'][:12]} authenticated by the platform's signature\n"
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.write_text(note)
        try:
            self.handle = self.launcher.start(spec)
        except PlatformError as exc:  # e.g. kubectl apply or sbatch refused it
            self._finish(FAILED, None, f"the {self.launcher.name} launcher could not start the role: {exc}")
            return
        self.record = {
            "run_id": self.run_id,
            "rank": self.rank,
            "handle": self.handle.record(),
            "log": str(spec.log_path),
            "offset": 0,
            "seq": 0,
        }
        self.state.save_role(self.record)
        log.info("run %s: rank %d started (%s)", self.run_id, self.rank, self.launcher.name)
        self.current = RUNNING
        self._report(RUNNING)
        self._watch()

    def _fetch(self, package: dict[str, Any]) -> Path:
        digest, signature = str(package["digest"]), str(package["signature"])
        if not signing.verify(self.platform_public, signing.package_statement(digest), signature):
            raise PlatformError(f"package {digest[:12]}: not signed by this agent's platform; refused")
        data = self.link.signed("/api/agent/package", {"digest": digest}, timeout_s=300).content
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise PlatformError(f"package {digest[:12]}: downloaded bytes have sha256 {actual[:12]}; refused")
        path = self.state.run_dir(self.run_id) / "package.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        log.info("run %s: package %s authenticated by the platform's signature", self.run_id, digest[:12])
        return path

    # -- watching ------------------------------------------------------------------------

    def _watch(self) -> None:
        assert self.handle is not None
        while True:
            code = self.handle.poll()
            self._ship_logs(final=code is not None)
            if code is not None:
                break
            if self.stop_requested.wait(1.0):
                self._report(STOPPING)
                self.handle.stop(self.stop_grace_s)
                self._ship_logs(final=True)
                self._finish(KILLED, self.handle.poll(), "aborted" if self.stop_grace_s == 0 else "stopped")
                return
        detail = f"exit code {code}"
        if code == 0 and self.rank == 0:
            detail += self._upload_final_model()  # before FINISHED: a finished run offers its model
        self._finish(FINISHED if code == 0 else FAILED, code, detail)

    def _upload_final_model(self) -> str:
        """Export the run's final model and upload it to the platform; a note for the state's detail."""
        from unitedllm.agent.final_model import exported_model_zip

        metrics = self.record.get("metrics") or self._find_metrics()
        if not metrics:
            return ""
        try:
            data = exported_model_zip(Path(metrics).parent, self.run_id)
        except Exception as exc:  # the role has finished; a failed export must not hide that
            log.warning("run %s: the final model could not be exported: %s", self.run_id, exc)
            return f"; the final model could not be exported ({type(exc).__name__})"
        if data is None:
            return ""
        path = f"/api/agent/runs/{self.run_id}/model"
        for attempt in range(30):
            try:
                record = self.link.signed_bytes(path, data, "application/zip", timeout_s=600).json()
                log.info("run %s: final model uploaded (%s)", self.run_id, record["digest"][:12])
                return f"; final model uploaded ({record['digest'][:12]})"
            except PlatformError as exc:
                if (exc.status is not None and 400 <= exc.status < 500) or attempt == 29:
                    log.warning("run %s: the final model upload failed: %s", self.run_id, exc)
                    return "; the final model upload failed"
                time.sleep(min(5.0, 0.5 * (attempt + 1)))
        return ""

    def _ship_logs(self, *, final: bool) -> None:
        self._ship("log", Path(self.record.get("log", "")), final=final)
        if self.rank == 0:  # the aggregator's metrics.jsonl holds every round of the run
            metrics = self.record.get("metrics") or self._find_metrics()
            if metrics:
                self._ship("metrics", Path(metrics), final=final)

    def _find_metrics(self) -> str | None:
        path = metrics_path(self.state.run_dir(self.run_id) / "package", self.run_id, self.overrides)
        if path is not None and path.is_file():
            self.record["metrics"] = str(path)
            return str(path)
        return None

    def _ship(self, stream: str, path: Path, *, final: bool) -> None:
        """Send what the file gained since last time, in whole lines, each batch under its own seq."""
        if not path.is_file():
            return
        offset_key, seq_key = ("offset", "seq") if stream == "log" else (f"{stream}_offset", f"{stream}_seq")
        with path.open("rb") as fh:
            while True:
                fh.seek(self.record.get(offset_key, 0))
                chunk = fh.read(LOG_BATCH_BYTES)
                if not final and len(chunk) < LOG_BATCH_BYTES:
                    chunk = chunk[: chunk.rfind(b"\n") + 1]  # whole lines only while the role writes
                if not chunk:
                    return
                body = {
                    "run_id": self.run_id,
                    "stream": stream,
                    "seq": self.record.get(seq_key, 0),
                    "text": chunk.decode(errors="replace"),
                }
                if not self._deliver("/api/agent/logs", body, attempts=1 if not final else 30):
                    return  # sent again next time, under the same seq
                self.record[offset_key] = self.record.get(offset_key, 0) + len(chunk)
                self.record[seq_key] = self.record.get(seq_key, 0) + 1
                self.state.save_role(self.record)

    def _finish(self, state: str, code: int | None, detail: str) -> None:
        self.current = state
        self.state.save_role(None)
        log.info("run %s: rank %d %s (%s)", self.run_id, self.rank, state, detail)
        # The device is free once the role has ended: a start for the next run may arrive before
        # the controller has answered this last report.
        self.on_done(self)
        self._report(state, exit_code=code, detail=detail)

    # -- reporting -----------------------------------------------------------------------

    def _report(self, state: str, *, exit_code: int | None = None, detail: str = "") -> None:
        body = {"run_id": self.run_id, "state": state, "exit_code": exit_code, "detail": detail}
        self._deliver("/api/agent/state", body, attempts=120)

    def _deliver(self, path: str, body: dict[str, Any], *, attempts: int) -> bool:
        """Send until the controller has it (it may be restarting); False after ``attempts`` tries."""
        for attempt in range(attempts):
            try:
                self.link.post(path, body)
                return True
            except PlatformError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    log.warning("run %s: %s refused: %s", self.run_id, path, exc)
                    return True  # refused for good; sending again will not help
                if attempt + 1 < attempts:
                    time.sleep(min(5.0, 0.5 * (attempt + 1)))
        return False

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
