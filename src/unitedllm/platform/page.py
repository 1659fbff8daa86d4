"""The controller's web page, rendered on the server (Jinja2): log in, devices, packages, configs,
launch, and a run's live page (states, rounds, device load, logs), with a stop button.

Logins are sessions (a signed cookie, ``SameSite=Strict``) opened with an API token; every form
carries the session's CSRF token, and a form without the right one is refused. Read-only logins
see everything but get no forms, and their posts are refused.
"""

from __future__ import annotations

import hmac
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.middleware.sessions import SessionMiddleware

from unitedllm.platform.api import launch_from
from unitedllm.platform.auth import ADMIN
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.final_model import serve_command
from unitedllm.platform.plot import line_plot, loss_plot
from unitedllm.platform.states import TERMINAL

if TYPE_CHECKING:
    from unitedllm.platform.controller import Controller
    from unitedllm.platform.server import Platform

__all__ = ["add_page"]

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
LOG_TAIL_CHARS = 20_000


def _csrf(request: Request) -> str:
    session = request.session
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return str(session["csrf"])


def _render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("error", None)
    html = TEMPLATES.get_template(template).render(
        role=request.session.get("role"), csrf=_csrf(request), refresh=values.pop("refresh", None), **values
    )
    return HTMLResponse(html, status_code=status)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def report_html(batches: list[dict[str, Any]]) -> str:
    """Render ``unitedllm report``'s page (table and plots, images inline) from metrics.jsonl batches."""
    import tempfile

    from unitedllm.report.data import load_run
    from unitedllm.report.html import render_html
    from unitedllm.report.plots import render_plots

    with tempfile.TemporaryDirectory(prefix="unitedllm-report-") as tmp:
        (Path(tmp) / "metrics.jsonl").write_text("".join(b["text"] for b in batches))
        run = load_run(Path(tmp))
        return render_html(run, render_plots(run))


def _load_plot(controller: Controller, device_id: str, since: float) -> str | None:
    """CPU, memory and GPU utilisation (%) of one device since the run started."""
    series: dict[str, list[tuple[float, float]]] = {"CPU %": [], "memory %": []}
    for sample in controller.device_samples(device_id, since):
        x, metrics = sample["at"] - since, sample["metrics"]
        for name, key in (("CPU %", "cpu_percent"), ("memory %", "memory_percent")):
            if isinstance(metrics.get(key), int | float):
                series[name].append((x, float(metrics[key])))
        for gpu in metrics.get("gpus") or []:
            series.setdefault(f"GPU {gpu.get('index')} %", []).append((x, float(gpu.get("utilisation", 0))))
            series.setdefault(f"GPU {gpu.get('index')} memory GiB", []).append(
                (x, float(gpu.get("memory_used", 0)) / 2**30)
            )
    return line_plot(
        series, x_label="s", element_id=f"load-{device_id}", label="device load", x_format="{:.0f}"
    )


def add_page(app: FastAPI, platform: Platform) -> None:
    """Mount the page on the API app (sessions are signed with a key derived from the master secret)."""
    controller, runs, catalog = platform.controller, platform.runs, platform.catalog
    app.add_middleware(
        SessionMiddleware,
        secret_key=controller.derive("page-sessions"),
        session_cookie="unitedllm_session",
        same_site="strict",
        max_age=12 * 3600,
    )

    async def form(request: Request, *, admin: bool = True) -> dict[str, Any]:
        """The posted form after the CSRF and role checks (PlatformError otherwise)."""
        data = await request.form()
        sent = str(data.get("csrf", ""))
        if not sent or not hmac.compare_digest(sent, str(request.session.get("csrf", ""))):
            raise PlatformError("the form's CSRF token is missing or wrong; reload the page", status=403)
        if admin and request.session.get("role") != ADMIN:
            raise PlatformError("this needs an admin login (yours is read-only)", status=403)
        return {key: data.getlist(key) if key == "client_devices" else data.get(key) for key in data}

    def logged_in(request: Request) -> bool:
        return request.session.get("role") is not None

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        return _render(request, "login.html")

    @app.post("/login")
    async def login(request: Request) -> Response:
        try:
            data = await form(request, admin=False)
        except PlatformError as exc:
            return _render(request, "login.html", status=403, error=str(exc))
        role = controller.role_of(str(data.get("token") or ""))
        if role is None:
            return _render(request, "login.html", status=401, error="unknown token")
        request.session.clear()
        request.session.update(role=role, csrf=secrets.token_urlsafe(24))
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await form(request, admin=False)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    def overview(request: Request, error: str | None = None, status: int = 200) -> Response:
        return _render(
            request,
            "index.html",
            status=status,
            error=error,
            devices=controller.devices(),
            runs=list(reversed(runs.runs())),
            packages=controller.packages(),
            applications=catalog.applications(),
            projects=catalog.projects(),
            configs=catalog.configs(),
        )

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", status_code=303)
        return overview(request)

    @app.post("/runs")
    async def launch(request: Request) -> Response:
        try:
            data = await form(request)
            body = {
                "project": data.get("project") or None,
                "server_package": data.get("server_package"),
                "client_package": data.get("client_package"),
                "config": data.get("config") or None,
                "server_device": data.get("server_device"),
                "client_devices": data.get("client_devices") or [],
                "overrides": _lines(str(data.get("overrides") or "")),
            }
            run = launch_from(catalog, runs, body)
        except PlatformError as exc:
            return overview(request, error=str(exc), status=exc.status or 400)
        return RedirectResponse(f"/runs/{run['id']}", status_code=303)

    @app.post("/runs/{run_id}/stop")
    async def stop(request: Request, run_id: str) -> Response:
        data = await form(request)
        runs.stop(run_id, abort=data.get("abort") == "1")
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.post("/packages")
    async def push(request: Request) -> Response:
        try:
            await form(request)
            upload = (await request.form()).get("file")
            if upload is None or isinstance(upload, str):
                raise PlatformError("choose a package file to push", status=422)
            controller.push_package(await upload.read(), upload.filename or "package.zip")
        except PlatformError as exc:
            return overview(request, error=str(exc), status=exc.status or 400)
        return RedirectResponse("/", status_code=303)

    @app.post("/devices/{device_id}/approve")
    async def approve(request: Request, device_id: str) -> Response:
        await form(request)
        controller.approve(device_id)
        runs.sync_broker()  # the device's broker login, for its presence
        return RedirectResponse("/", status_code=303)

    @app.post("/configs")
    async def save_config(request: Request) -> Response:
        from unitedllm.config.cli_support import parse_set_options
        from unitedllm.errors import ConfigError

        try:
            data = await form(request)
            overrides = parse_set_options(_lines(str(data.get("overrides") or "")))
            catalog.save_config(str(data.get("name") or ""), overrides)
        except ConfigError as exc:
            return overview(request, error=exc.render(), status=422)
        except PlatformError as exc:
            return overview(request, error=str(exc), status=exc.status or 400)
        return RedirectResponse("/", status_code=303)

    @app.post("/configs/{name}/delete")
    async def delete_config(request: Request, name: str) -> Response:
        await form(request)
        catalog.delete_config(name)
        return RedirectResponse("/", status_code=303)

    @app.get("/runs/{run_id}/report", response_class=HTMLResponse)
    def run_report(request: Request, run_id: str) -> Response:
        """The page ``unitedllm report`` makes, from the metrics the aggregator's agent streamed."""
        if not logged_in(request):
            return RedirectResponse("/login", status_code=303)
        runs.run(run_id)  # 404 for an unknown run
        return HTMLResponse(report_html(runs.logs(run_id, stream="metrics")))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> Response:
        if not logged_in(request):
            return RedirectResponse("/login", status_code=303)
        run = runs.run(run_id)
        devices = {d["id"]: d for d in controller.devices()}
        members = [
            {**m, "device": devices.get(m["device_id"], {"name": "?", "metrics": {}})} for m in run["members"]
        ]
        rounds = runs.rounds(run_id)
        texts: dict[str, str] = {}
        for batch in runs.logs(run_id):
            texts[batch["device_id"]] = texts.get(batch["device_id"], "") + batch["text"]
        logs = [(devices.get(d, {"name": d})["name"], text[-LOG_TAIL_CHARS:]) for d, text in texts.items()]
        events = [
            {**e, "at": time.strftime("%H:%M:%S", time.localtime(e["at"]))} for e in runs.events(run_id)
        ]
        final = next((e for e in runs.metrics(run_id) if e.get("event") == "run_end"), None)
        load_plots = [
            (m["device"]["name"], _load_plot(controller, m["device_id"], run["created_at"])) for m in members
        ]
        return _render(
            request,
            "run.html",
            run=run,
            members=members,
            rounds=rounds,
            plot=loss_plot(rounds),
            load_plots=[(name, svg) for name, svg in load_plots if svg],
            events=events,
            logs=logs,
            terminal=TERMINAL,
            final_dir=f"{final['output_dir']}/node_0/final" if final and final.get("output_dir") else None,
            output_dir=(final or {}).get("output_dir"),
            serve_command=serve_command(run_id),
            refresh=None if run["state"] in TERMINAL else 2,
        )

    @app.exception_handler(PlatformError)
    async def page_or_api_error(request: Request, exc: PlatformError) -> Response:
        from fastapi.responses import JSONResponse

        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": {"message": str(exc)}}, status_code=exc.status or 400)
        return _render(request, "base.html", status=exc.status or 400, error=str(exc))
