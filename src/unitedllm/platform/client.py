"""A client of the controller's API for scripts, the CLI and ``unitedllm-build push`` (bearer token)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from unitedllm.platform.errors import PlatformError
from unitedllm.platform.http import send

__all__ = ["PlatformClient", "TOKEN_ENV", "URL_ENV"]

URL_ENV = "UNITEDLLM_PLATFORM_URL"
TOKEN_ENV = "UNITEDLLM_PLATFORM_TOKEN"


class PlatformClient:
    """JSON calls to one controller; errors come back as PlatformError naming the call and the reason."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 60.0):
        url = url or os.environ.get(URL_ENV)
        token = token or os.environ.get(TOKEN_ENV)
        if not url:
            raise PlatformError(f"no platform URL: give --platform URL or set {URL_ENV}")
        if not token:
            raise PlatformError(f"no login: give --token TOKEN or set {TOKEN_ENV}")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"authorization": f"Bearer {token}"}
        )

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return send(self.url, f"{method} {path}", lambda: self._http.request(method, path, **kwargs))

    def devices(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/devices"))

    def device(self, ref: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/devices/{ref}"))

    def device_metrics(self, ref: str, since: float = 0.0) -> list[dict[str, Any]]:
        """The device's kept heartbeat metrics, oldest first."""
        return list(self._call("GET", f"/api/devices/{ref}/metrics", params={"since": since}))

    def download_model(self, run_id: str, directory: Path) -> Path:
        """Save the run's exported final model (a zip) in ``directory``; returns its path."""
        response = self._send("GET", f"/api/runs/{run_id}/model", timeout=600)
        name = Path(response.headers.get("content-disposition", "").split('filename="')[-1].rstrip('"')).name
        path = directory / (name or f"{run_id}-model.zip")
        path.write_bytes(response.content)
        return path

    def approve(self, ref: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/devices/{ref}/approve"))

    def enrol_token(self, role: str | None = None) -> str:
        return str(self._call("POST", "/api/enrol-tokens", json={"role": role})["token"])

    def packages(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/packages"))

    def push(self, package: Path) -> dict[str, Any]:
        if not package.is_file():
            raise PlatformError(f"package not found: {package}")
        with package.open("rb") as fh:
            return dict(
                self._call("POST", "/api/packages", files={"file": (package.name, fh, "application/zip")})
            )

    def launch(self, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/api/runs", json=fields))

    def runs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/runs"))

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/runs/{run_id}"))

    def stop(self, run_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/runs/{run_id}/stop"))

    def abort(self, run_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/runs/{run_id}/abort"))

    def events(self, run_id: str, after: int = 0) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/runs/{run_id}/events", params={"after": after}))

    def logs(
        self, run_id: str, *, after: int = 0, device: str | None = None, stream: str = "log"
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"after": after, "stream": stream}
        if device:
            params["device"] = device
        return list(self._call("GET", f"/api/runs/{run_id}/logs", params=params))

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/runs/{run_id}/rounds"))

    def applications(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/applications"))

    def save_application(self, name: str, *, server_package: str, client_package: str) -> dict[str, Any]:
        body = {"name": name, "server_package": server_package, "client_package": client_package}
        return dict(self._call("POST", "/api/applications", json=body))

    def projects(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/projects"))

    def create_project(self, name: str, application: str) -> dict[str, Any]:
        return dict(self._call("POST", "/api/projects", json={"name": name, "application": application}))

    def configs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/configs"))

    def save_config(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("PUT", f"/api/configs/{name}", json={"overrides": overrides}))

    def delete_config(self, name: str) -> None:
        self._call("DELETE", f"/api/configs/{name}")
