"""The controller's HTTP API: FastAPI routes over :class:`Controller` and :class:`RunService`.

People and scripts log in with a bearer token (``admin`` or ``read``); agents sign every request
with their device key (headers ``X-Device-Id``, ``X-Timestamp``, ``X-Signature``). Errors come
back as ``{"error": {"message": ...}}`` with the HTTP status the :class:`PlatformError` carries.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from unitedllm.platform.auth import ADMIN
from unitedllm.platform.catalog import Catalog
from unitedllm.platform.controller import Controller
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.final_model import MAX_MODEL_BYTES, FinalModels
from unitedllm.platform.runs import RunService

__all__ = ["Notifier", "create_app", "launch_from"]

MAX_POLL_S = 30.0


class Notifier:
    """Wakes a device's waiting command poll; safe to call from the worker threads the API uses."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def event(self, device_id: str) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        return self._events.setdefault(device_id, asyncio.Event())

    def notify(self, device_id: str) -> None:
        loop, event = self._loop, self._events.get(device_id)
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def launch_from(catalog: Catalog, runs: RunService, body: dict[str, Any]) -> dict[str, Any]:
    """A launch from packages, or from a project (its application's packages) and a saved config."""
    try:
        overrides = [str(o) for o in body.get("overrides") or []]
        project_id = None
        if body.get("project"):
            project = catalog.project(str(body["project"]))
            project_id = project["id"]
            version = body.get("application_version")
            server_package, client_package = catalog.application_packages(
                project["application"], int(version) if version is not None else None
            )
        else:
            server_package, client_package = str(body["server_package"]), str(body["client_package"])
        if body.get("config"):
            overrides = [*catalog.config_overrides(str(body["config"])), *overrides]
        clients = body["client_devices"]
        if isinstance(clients, str):
            clients = [c.strip() for c in clients.split(",") if c.strip()]
        return runs.launch(
            server_package=server_package,
            client_package=client_package,
            server_device=str(body["server_device"]),
            client_devices=[str(d) for d in clients],
            overrides=overrides,
            project_id=project_id,
            run_id=body.get("run_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlatformError(f"run: missing or bad field {exc}", status=422) from None


def create_app(controller: Controller, runs: RunService, notifier: Notifier, catalog: Catalog) -> FastAPI:
    """The API app; :mod:`unitedllm.platform.page` adds the web page to it."""
    app = FastAPI(title="UnitedLLM platform", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.controller = controller
    app.state.runs = runs
    app.state.catalog = catalog
    models = FinalModels(controller)

    @app.exception_handler(PlatformError)
    async def platform_error(_request: Request, exc: PlatformError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc)}}, status_code=exc.status or 400)

    def login(request: Request) -> str:
        """The caller's role from a bearer token or a page session; 401 without either."""
        token = _bearer(request)
        role = controller.role_of(token) if token else request.scope.get("session", {}).get("role")
        if role is None:
            raise PlatformError("log in: send 'Authorization: Bearer <token>'", status=401)
        return str(role)

    def admin(role: Annotated[str, Depends(login)]) -> str:
        if role != ADMIN:
            raise PlatformError("this needs an admin token (yours is read-only)", status=403)
        return role

    async def signer(request: Request, body: bytes) -> str:
        """The id of the device that signed this request; PlatformError(401/403) otherwise."""
        device_id = request.headers.get("x-device-id", "")
        await asyncio.to_thread(
            controller.authenticate_device,
            device_id,
            method=request.method,
            path=request.url.path,
            timestamp=request.headers.get("x-timestamp", ""),
            body=body,
            signature=request.headers.get("x-signature", ""),
        )
        return device_id

    async def device(request: Request) -> tuple[str, dict[str, Any]]:
        """The signing device's id and the request's JSON body, after checking its signature."""
        body = await request.body()
        device_id = await signer(request, body)
        try:
            data = json.loads(body) if body else {}
        except json.JSONDecodeError:
            raise PlatformError("request body is not JSON", status=422) from None
        return device_id, data if isinstance(data, dict) else {}

    Read = Annotated[str, Depends(login)]
    Admin = Annotated[str, Depends(admin)]
    Signed = Annotated[tuple[str, dict[str, Any]], Depends(device)]

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return asyncio.to_thread(fn, *args, **kwargs)

    # -- public ------------------------------------------------------------------------------

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/platform-key")
    async def platform_key() -> dict[str, str]:
        return {"public_key": controller.keys.public_text, "fingerprint": controller.keys.fingerprint}

    # -- people and scripts -------------------------------------------------------------------

    @app.get("/api/devices")
    async def devices(_: Read) -> list[dict[str, Any]]:
        return await call(controller.devices)  # type: ignore[no-any-return]

    @app.get("/api/devices/{ref}")
    async def device_info(ref: str, _: Read) -> dict[str, Any]:
        return await call(controller.device, ref)  # type: ignore[no-any-return]

    @app.get("/api/devices/{ref}/metrics")
    async def device_metrics(ref: str, _: Read, since: float = 0.0) -> list[dict[str, Any]]:
        """The device's kept heartbeat metrics (the load plots' data), oldest first."""
        return await call(controller.device_samples, ref, since)  # type: ignore[no-any-return]

    @app.post("/api/devices/{ref}/approve")
    async def approve(ref: str, _: Admin) -> dict[str, Any]:
        device = await call(controller.approve, ref)
        await call(runs.sync_broker)  # the device's broker login, for its presence
        return device  # type: ignore[no-any-return]

    @app.post("/api/enrol-tokens")
    async def enrol_token(_: Admin, body: dict[str, Any] | None = None) -> dict[str, str]:
        role = (body or {}).get("role")
        return {"token": await call(controller.create_enrol_token, role)}

    @app.get("/api/packages")
    async def packages(_: Read) -> list[dict[str, Any]]:
        return await call(controller.packages)  # type: ignore[no-any-return]

    @app.post("/api/packages")
    async def push(_: Admin, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        data = await file.read()
        return await call(controller.push_package, data, file.filename or "package.zip")  # type: ignore[no-any-return]

    @app.get("/api/runs")
    async def list_runs(_: Read) -> list[dict[str, Any]]:
        return await call(runs.runs)  # type: ignore[no-any-return]

    @app.post("/api/runs")
    async def launch(_: Admin, body: dict[str, Any]) -> dict[str, Any]:
        return await call(launch_from, catalog, runs, body)  # type: ignore[no-any-return]

    @app.get("/api/applications")
    async def applications(_: Read) -> list[dict[str, Any]]:
        return await call(catalog.applications)  # type: ignore[no-any-return]

    @app.post("/api/applications")
    async def save_application(_: Admin, body: dict[str, Any]) -> dict[str, Any]:
        return await call(  # type: ignore[no-any-return]
            catalog.save_application,
            str(body.get("name", "")),
            server_package=str(body.get("server_package", "")),
            client_package=str(body.get("client_package", "")),
        )

    @app.get("/api/projects")
    async def projects(_: Read) -> list[dict[str, Any]]:
        return await call(catalog.projects)  # type: ignore[no-any-return]

    @app.post("/api/projects")
    async def create_project(_: Admin, body: dict[str, Any]) -> dict[str, Any]:
        return await call(catalog.create_project, str(body.get("name", "")), str(body.get("application", "")))  # type: ignore[no-any-return]

    @app.get("/api/configs")
    async def configs(_: Read) -> list[dict[str, Any]]:
        return await call(catalog.configs)  # type: ignore[no-any-return]

    @app.put("/api/configs/{name}")
    async def save_config(name: str, _: Admin, body: dict[str, Any]) -> dict[str, Any]:
        return await call(catalog.save_config, name, body.get("overrides") or {})  # type: ignore[no-any-return]

    @app.delete("/api/configs/{name}")
    async def delete_config(name: str, _: Admin) -> dict[str, bool]:
        await call(catalog.delete_config, name)
        return {"ok": True}

    @app.get("/api/runs/{run_id}")
    async def show_run(run_id: str, _: Read) -> dict[str, Any]:
        return await call(runs.run, run_id)  # type: ignore[no-any-return]

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(run_id: str, _: Admin) -> dict[str, Any]:
        return await call(runs.stop, run_id)  # type: ignore[no-any-return]

    @app.post("/api/runs/{run_id}/abort")
    async def abort_run(run_id: str, _: Admin) -> dict[str, Any]:
        return await call(runs.stop, run_id, abort=True)  # type: ignore[no-any-return]

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: str, _: Read, after: int = 0) -> list[dict[str, Any]]:
        return await call(runs.events, run_id, after)  # type: ignore[no-any-return]

    @app.get("/api/runs/{run_id}/logs")
    async def run_logs(
        run_id: str, _: Read, after: int = 0, device: str | None = None, stream: str = "log"
    ) -> list[dict[str, Any]]:
        return await call(runs.logs, run_id, device_id=device, after=after, stream=stream)  # type: ignore[no-any-return]

    @app.get("/api/runs/{run_id}/model")
    async def run_model(run_id: str, _: Read) -> Response:
        """The run's final model as ``unitedllm export`` writes it, zipped (404 until uploaded)."""
        filename, data = await call(models.download, run_id)
        return Response(
            data,
            media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    @app.get("/api/runs/{run_id}/rounds")
    async def run_rounds(run_id: str, _: Read) -> list[dict[str, Any]]:
        return await call(runs.rounds, run_id)  # type: ignore[no-any-return]

    # -- agents --------------------------------------------------------------------------------

    @app.post("/api/agent/enrol")
    async def enrol(body: dict[str, Any]) -> dict[str, Any]:
        try:
            fields = {k: body[k] for k in ("name", "role", "public_key")}
        except KeyError as exc:
            raise PlatformError(f"enrol: missing field {exc}", status=422) from None
        answer = await call(
            controller.enrol, token=body.get("token") or None, hardware=body.get("hardware") or {}, **fields
        )
        if answer["approved"]:
            await call(runs.sync_broker)  # the device's broker login, for its presence
        return answer  # type: ignore[no-any-return]

    @app.post("/api/agent/broker")
    async def broker_identity(signed: Signed) -> dict[str, str]:
        """The device's own broker login and presence topic; empty when no broker is managed."""
        device_id, _body = signed
        return controller.broker_identity(device_id)

    @app.post("/api/agent/heartbeat")
    async def heartbeat(signed: Signed) -> dict[str, Any]:
        device_id, body = signed
        await call(controller.heartbeat, device_id, body.get("metrics") or {}, body.get("hardware"))
        for role in body.get("roles") or []:  # re-sync after a controller restart
            try:
                await call(
                    runs.report, device_id, run_id=str(role["run_id"]), state=str(role["state"]), resync=True
                )
            except (KeyError, PlatformError):
                continue
        return {"ok": True}

    @app.post("/api/agent/commands")
    async def commands(signed: Signed) -> dict[str, Any]:
        device_id, body = signed
        wait = min(float(body.get("wait", 0) or 0), MAX_POLL_S)
        event = notifier.event(device_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event.clear()
            pending = await call(runs.pending_commands, device_id)
            remaining = deadline - loop.time()
            if pending or remaining <= 0:
                return {"commands": pending}
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass

    @app.post("/api/agent/ack")
    async def ack(signed: Signed) -> dict[str, bool]:
        device_id, body = signed
        await call(runs.ack, device_id, str(body.get("nonce", "")))
        return {"ok": True}

    @app.post("/api/agent/state")
    async def state(signed: Signed) -> dict[str, Any]:
        device_id, body = signed
        exit_code = body.get("exit_code")
        return await call(  # type: ignore[no-any-return]
            runs.report,
            device_id,
            run_id=str(body.get("run_id", "")),
            state=str(body.get("state", "")),
            exit_code=int(exit_code) if exit_code is not None else None,
            detail=str(body.get("detail", "")),
        )

    @app.post("/api/agent/logs")
    async def logs(signed: Signed) -> dict[str, bool]:
        device_id, body = signed
        await call(
            runs.append_logs,
            device_id,
            run_id=str(body.get("run_id", "")),
            seq=int(body.get("seq", 0)),
            text=str(body.get("text", "")),
            stream=str(body.get("stream", "log")),
        )
        return {"ok": True}

    @app.post("/api/agent/runs/{run_id}/model")
    async def upload_model(run_id: str, request: Request) -> dict[str, Any]:
        """The exported final model from the run's aggregator (raw zip, signed like every request)."""
        if int(request.headers.get("content-length") or 0) > MAX_MODEL_BYTES:
            raise PlatformError(f"run {run_id}: the model is over the {MAX_MODEL_BYTES} byte cap", status=413)
        data = await request.body()
        device_id = await signer(request, data)
        return await call(models.store, device_id, run_id, data)  # type: ignore[no-any-return]

    @app.post("/api/agent/package")
    async def package_content(signed: Signed) -> Response:
        _device_id, body = signed
        data = await call(controller.package_bytes, str(body.get("digest", "")))
        return Response(data, media_type="application/zip")

    return app
