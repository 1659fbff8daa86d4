"""The web page in headless Chromium: log in, see the devices, save a configuration, launch a run,
watch its rounds arrive, stop it; forms without the CSRF token and read-only logins are refused."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from browser import CHROMIUM, Browser
from platform_helpers import AgentProcess, Controller, wait_until
from services import require

pytestmark = pytest.mark.services


@pytest.fixture
def chromium() -> None:
    require(None if CHROMIUM.exists() else f"no headless browser at {CHROMIUM} (scripts/test.sh installs it)")


async def log_in(page: Browser, controller: Controller, token: str) -> None:
    await page.goto(f"{controller.url}/")
    await page.wait_for("location.pathname === '/login'")
    await page.submit("#login", {"#token": token})


async def test_log_in_launch_watch_rounds_and_stop(
    chromium: None,
    tmp_path: Path,
    controller: Controller,
    agents: dict[str, AgentProcess],
    sleeper_packages: dict[str, str],
    sleeper_zips: dict[str, Path],
) -> None:
    async with Browser(tmp_path / "profile") as page:
        await log_in(page, controller, "not-a-token")
        assert "unknown token" in await page.text("#error")
        await log_in(page, controller, controller.token)
        devices = await page.text("#devices")
        for name in ("agg", "c1", "c2"):
            assert name in devices
        assert controller.token not in await page.evaluate("document.documentElement.outerHTML")

        # A configuration is checked against the config schema when saved.
        # A package whose file no longer matches its manifest is refused at upload.
        broken = tmp_path / "broken-client.zip"
        with zipfile.ZipFile(sleeper_zips["client"]) as src, zipfile.ZipFile(broken, "w") as out:
            for info in src.infolist():
                data = src.read(info)
                out.writestr(info, data + b"# changed\n" if info.filename.endswith("launch.py") else data)
        await page.set_file("input[name=file]", broken)
        await page.submit("#push-button")
        assert "broken-client.zip failed verification: fedml/launch.py" in await page.text("#error")
        await page.set_file("input[name=file]", sleeper_zips["client"])
        await page.submit("#push-button")
        assert sleeper_packages["client"][:16] in await page.text("#packages")

        await page.submit(
            "#save-config-button", {"#config-name": "bad", "#config-overrides": "train_args.comm_rund=3"}
        )
        assert "did you mean 'comm_round'" in await page.text("#error")
        await page.submit(
            "#save-config-button",
            {"#config-name": "long", "#config-overrides": "train_args.local_max_steps=1500"},
        )
        assert "long" in await page.text("#configs")

        # Launch with the saved configuration on both clients.
        await page.evaluate("document.querySelector('#config').value = 'long'")
        await page.evaluate("document.querySelectorAll('input.client').forEach(box => box.checked = true)")
        await page.submit("#launch-button")
        run_id = await page.wait_for("location.pathname.startsWith('/runs/') && location.pathname.slice(6)")
        await page.wait_for("document.querySelectorAll('#rounds tr.round').length >= 2", timeout=90)
        assert await page.evaluate("!!document.querySelector('#loss-plot')")
        # Each device's CPU and memory since the run started, from its heartbeats.
        await page.wait_for("document.querySelectorAll('div.load svg').length === 3", timeout=30)
        assert "CPU %" in await page.text("div.load")
        assert "RUNNING" in await page.text("#members")
        assert "sleeper rank 1 started" in await page.text("body")
        await page.screenshot(tmp_path / "run.png")
        # The report `unitedllm report` makes, from the same streamed metrics.
        await page.submit("#report-link")
        await page.wait_for("document.querySelectorAll('img').length > 0", timeout=60)
        assert "train loss" in (await page.text()).lower()
        await page.goto(f"{controller.url}/runs/{run_id}")

        await page.submit("#stop")
        await page.wait_for("document.querySelector('#run-state').innerText === 'KILLED'", timeout=90)
        assert (await page.text("#members")).count("KILLED") == 3
        with controller.client() as client:
            assert client.run(run_id)["state"] == "KILLED"
            assert client.run(run_id)["overrides"] == ["train_args.local_max_steps=1500"]


async def test_forms_need_the_csrf_token_and_read_only_logins_get_no_forms(
    chromium: None, tmp_path: Path, controller: Controller, agents: dict[str, AgentProcess]
) -> None:
    from unitedllm.platform.auth import READ
    from unitedllm.platform.controller import Controller as Service
    from unitedllm.platform.db import Database
    from unitedllm.platform.signing import KeyPair

    db = Database(f"sqlite:///{controller.data_dir / 'platform.db'}")
    viewer = Service(db, keys=KeyPair.generate(), master_secret=b"x", store=None).create_api_token("v", READ)  # type: ignore[arg-type]
    db.close()
    async with Browser(tmp_path / "admin") as page:
        await log_in(page, controller, controller.token)
        # A cross-site form would post without the session's CSRF token.
        status = await page.evaluate(
            "fetch('/configs', {method: 'POST', body: new URLSearchParams({name: 'x', overrides: 'train_args.comm_round=2'})}).then(r => r.status)"
        )
        assert status == 403
        assert "x" not in json.dumps([c["name"] for c in controller.client().configs()])
    async with Browser(tmp_path / "viewer") as page:
        await log_in(page, controller, viewer)
        assert "logged in (read)" in await page.text("nav")
        assert "c1" in await page.text("#devices")
        assert not await page.evaluate("!!document.querySelector('#launch')")
        csrf = await page.evaluate("document.querySelector('input[name=csrf]').value")
        status = await page.evaluate(
            "fetch('/configs', {method: 'POST', body: new URLSearchParams({csrf: CSRF, name: 'y', "
            "overrides: 'train_args.comm_round=2'})}).then(r => r.status)".replace("CSRF", json.dumps(csrf))
        )
        assert status == 403


async def test_a_device_enrolled_without_a_token_waits_for_approval_in_the_page(
    chromium: None, tmp_path: Path, controller: Controller, platform_env: dict[str, str]
) -> None:
    pending = AgentProcess("newcomer", "client", tmp_path / "newcomer", platform_env, controller.url)
    pending.start(None)
    try:
        with controller.client() as client:
            device = wait_until(
                "the newcomer to enrol",
                lambda: next((d for d in client.devices() if d["name"] == "newcomer"), None),
            )
            assert device["approved"] is False
            wait_until(
                "the agent to say it waits",
                lambda: "waiting for approval in the page" in pending.log.read_text(),
            )
            assert device["fingerprint"] in pending.log.read_text(), "the admin compares this fingerprint"
            async with Browser(tmp_path / "profile") as page:
                await log_in(page, controller, controller.token)
                assert "waiting for approval" in await page.text("#devices")
                await page.submit("button.approve[data-name=newcomer]")
                await page.wait_for("!document.querySelector('button.approve[data-name=newcomer]')")
            wait_until("the newcomer online", lambda: client.device("newcomer")["state"] == "IDLE")
            assert client.device("newcomer")["approved"] is True
    finally:
        pending.stop()
