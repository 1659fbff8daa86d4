"""Per-device broker identities: the controller writes mosquitto's password and ACL files.

Each device's agent and roles log in to the broker as ``device-<id>`` with a password derived
from the platform's master secret (handed out only to that device's signed requests and in its
signed start commands). The ACL lets every device publish its own presence
(``unitedllm/devices/<id>/presence``, see :mod:`unitedllm.platform.presence`), and rank r of run R
publish only on its own topics: its presence, its own inbox, and the inboxes it sends to (the
aggregator's, for a client; every client's, for the aggregator). Device A therefore cannot
publish as device B. Operator accounts live in ``passwd.static`` / ``acl.static`` beside the
generated files and are kept as they are. After each change mosquitto is told to reload (SIGHUP
to the pid in ``mosquitto.pid``); see ``docs/platform.md`` for the broker config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unitedllm.platform.errors import PlatformError

__all__ = ["BrokerAccess", "Grant", "device_username"]


def device_username(device_id: str) -> str:
    return f"device-{device_id}"


@dataclass(frozen=True)
class Grant:
    """One rank of one run on one device."""

    device_id: str
    run_id: str
    rank: int


def acl_lines(grants: Sequence[Grant], devices: Sequence[str] = ()) -> list[str]:
    """mosquitto ACL entries: each device's own presence topic, and the run topics of its grants."""
    lines: list[str] = []
    for device_id in sorted({g.device_id for g in grants} | set(devices)):
        lines.append(f"user {device_username(device_id)}")
        lines.append(f"topic write unitedllm/devices/{device_id}/presence")
        for g in (g for g in grants if g.device_id == device_id):
            base = f"unitedllm/{g.run_id}"
            lines += [
                f"topic readwrite {base}/to/{g.rank}",
                f"topic write {base}/to/{'+' if g.rank == 0 else 0}",
                f"topic readwrite {base}/presence/{g.rank}",
                f"topic read {base}/presence/+",
            ]
        lines.append("")
    return lines


class BrokerAccess:
    """The generated ``passwd`` and ``acl`` files in one folder, and the reload of mosquitto."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

    def write(self, passwords: dict[str, str], grants: Sequence[Grant]) -> None:
        """Rewrite both files (atomically) for these device passwords and grants, then reload."""
        self.directory.mkdir(parents=True, exist_ok=True)
        static_acl = self._read("acl.static")
        generated = "\n".join(acl_lines(grants, sorted(passwords)))
        self._replace("acl", static_acl + ("\n" if static_acl else "") + generated + "\n")
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            staged = Path(tmp) / "passwd"
            staged.write_text(self._read("passwd.static"))
            staged.chmod(0o600)
            for device_id, password in sorted(passwords.items()):
                try:
                    subprocess.run(
                        [self.tool, "-b", str(staged), device_username(device_id), password],
                        check=True,
                        capture_output=True,
                    )
                except (OSError, subprocess.CalledProcessError) as exc:
                    raise PlatformError(f"mosquitto_passwd failed ({exc}); install mosquitto") from None
            os.replace(staged, self.directory / "passwd")
        self.reload()

    def reload(self) -> None:
        """Ask mosquitto to re-read its password and ACL files (no-op without a pid file)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.directory / "mosquitto.pid").read_text().strip())
            os.kill(pid, signal.SIGHUP)

    def _read(self, name: str) -> str:
        path = self.directory / name
        return path.read_text() if path.is_file() else ""

    def _replace(self, name: str, text: str) -> None:
        partial = self.directory / f".{name}.tmp"
        partial.write_text(text)
        partial.chmod(0o600)
        os.replace(partial, self.directory / name)
