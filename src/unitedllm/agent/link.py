"""The agent's line to the controller: every request signed with the device key, retried on drops."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from unitedllm.platform.errors import PlatformError
from unitedllm.platform.http import send
from unitedllm.platform.signing import KeyPair, request_message

__all__ = ["PlatformLink"]


class PlatformLink:
    """Signed JSON requests to one controller; a context manager that closes its connections."""

    def __init__(self, url: str, *, keys: KeyPair, device_id: str | None = None, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.keys = keys
        self.device_id = device_id
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> PlatformLink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def enrol(self, payload: dict[str, Any]) -> dict[str, Any]:
        path = "/api/agent/enrol"
        response = send(self.url, path, lambda: self._http.post(path, json=payload))
        return dict(response.json())

    def signed(self, path: str, body: dict[str, Any], *, timeout_s: float | None = None) -> httpx.Response:
        """POST ``body`` to ``path`` signed with the device key; raises PlatformError on refusal or drop."""
        return self.signed_bytes(path, json.dumps(body).encode(), "application/json", timeout_s=timeout_s)

    def signed_bytes(
        self, path: str, data: bytes, content_type: str, *, timeout_s: float | None = None
    ) -> httpx.Response:
        """POST raw ``data`` to ``path`` signed with the device key (the signature covers its sha256)."""
        if self.device_id is None:
            raise PlatformError("this agent is not enrolled yet")
        stamp = f"{time.time():.3f}"
        request = self._http.build_request(
            "POST",
            path,
            content=data,
            headers={"content-type": content_type, "x-device-id": self.device_id, "x-timestamp": stamp},
            timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
        )
        request.headers["x-signature"] = self.keys.sign(
            request_message("POST", request.url.path, stamp, data)
        )
        return send(self.url, request.url.path, lambda: self._http.send(request))

    def post(self, path: str, body: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        return dict(self.signed(path, body, timeout_s=timeout_s).json())
