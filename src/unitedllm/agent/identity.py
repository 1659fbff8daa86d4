"""What an agent keeps on disk: its key pair, its enrolment, the nonces it has seen, its running role."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitedllm.platform.signing import KeyPair

__all__ = ["AgentState"]


def _write_json(path: Path, value: Any) -> None:
    """Atomic and private (0600): a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out)
    os.replace(partial, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class AgentState:
    """The agent's folder (``~/.unitedllm/agent/<name>`` by default)."""

    root: Path

    def keys(self) -> KeyPair:
        pair, _created = KeyPair.load_or_create(self.root / "device_key.pem")
        return pair

    # -- enrolment -----------------------------------------------------------------------

    def enrolment(self) -> dict[str, Any] | None:
        """``{"platform", "device_id", "platform_public_key", "role", "name"}`` once enrolled."""
        value = _read_json(self.root / "enrolment.json")
        return value if isinstance(value, dict) else None

    def save_enrolment(self, value: dict[str, Any]) -> None:
        _write_json(self.root / "enrolment.json", value)

    # -- replay guard --------------------------------------------------------------------

    def seen(self, nonce: str) -> bool:
        nonces = _read_json(self.root / "nonces.json") or {}
        return nonce in nonces

    def remember(self, nonce: str, expires_at: float) -> None:
        """Keep a nonce until its command expires (an expired command is refused anyway)."""
        now = time.time()
        nonces = {n: e for n, e in (_read_json(self.root / "nonces.json") or {}).items() if e > now}
        nonces[nonce] = expires_at
        _write_json(self.root / "nonces.json", nonces)

    # -- the running role ----------------------------------------------------------------

    def role(self) -> dict[str, Any] | None:
        value = _read_json(self.root / "role.json")
        return value if isinstance(value, dict) else None

    def save_role(self, value: dict[str, Any] | None) -> None:
        if value is None:
            (self.root / "role.json").unlink(missing_ok=True)
        else:
            _write_json(self.root / "role.json", value)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id
