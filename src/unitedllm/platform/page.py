"""The controller's web page (server-rendered): devices, packages and runs. Placeholder until the
full page lands: a read-only overview at ``/``."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from unitedllm.platform.controller import Controller
from unitedllm.platform.runs import RunService

__all__ = ["add_page"]


def add_page(app: FastAPI, controller: Controller, runs: RunService) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return (
            "<!doctype html><title>UnitedLLM platform</title><h1>UnitedLLM platform</h1><p>API: /api/docs</p>"
        )
