"""The final model from the page: after the quickstart runs to FINISHED through the platform, its
exported model downloads through the API and through the run page's link (headless Chromium, with
a login), unzips and loads with ``PeftModel.from_pretrained`` over the base; the page names the
exact serve command; strangers and other ranks get nothing in or out (slow: it trains)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM, Browser
from platform_helpers import (
    AgentProcess,
    Controller,
    assert_loads_over_its_base,
    build_quickstart_packages,
    wait_for_state,
)
from services import require

from unitedllm.agent.identity import AgentState
from unitedllm.agent.link import PlatformLink
from unitedllm.platform.errors import PlatformError

pytestmark = [pytest.mark.services, pytest.mark.slow]


async def test_the_finished_runs_model_downloads_from_the_api_and_the_page_and_loads_over_its_base(
    tmp_path: Path, controller: Controller, agents: dict[str, AgentProcess]
) -> None:
    require(None if CHROMIUM.exists() else f"no headless browser at {CHROMIUM} (scripts/test.sh installs it)")
    _, server_zip, client_zip = build_quickstart_packages(tmp_path)
    with controller.client() as client:
        server, client_pkg = client.push(server_zip)["digest"], client.push(client_zip)["digest"]
        run_id = client.launch(
            server_package=server,
            client_package=client_pkg,
            server_device="agg",
            client_devices=["c1", "c2"],
            overrides=[f"train_args.output_dir={tmp_path}/out/{{run_id}}", "train_args.comm_round=2"],
        )["id"]
        run = wait_for_state(client, run_id, "FINISHED", "FAILED", "KILLED", timeout=600)
        assert run["state"] == "FINISHED", client.events(run_id)
        assert run["model"]["filename"] == f"{run_id}-model.zip"
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        zip_path = client.download_model(run_id, downloads)
    assert zip_path.name == f"{run_id}-model.zip"
    assert hashlib.sha256(zip_path.read_bytes()).hexdigest() == run["model"]["digest"]
    folder = assert_loads_over_its_base(zip_path, tmp_path / "unzipped")
    final = tmp_path / "out" / run_id / "node_0" / "final" / "adapter_model.safetensors"
    assert (folder / "adapter_model.safetensors").read_bytes() == final.read_bytes()

    # The command line mirrors the page.
    cli = subprocess.run(
        [sys.executable, "-m", "unitedllm", "platform", "runs", "model", run_id, "--out", str(tmp_path),
         "--platform", controller.url, "--token", controller.token],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip().endswith(
        f"serve it with: unzip {run_id}-model.zip && unitedllm serve {run_id}-model"
    )
    assert (tmp_path / zip_path.name).read_bytes() == zip_path.read_bytes()

    # Login required; only the run's aggregator may upload its model.
    assert httpx.get(f"{controller.url}/api/runs/{run_id}/model").status_code == 401
    c1 = agents["c1"]
    with PlatformLink(controller.url, keys=AgentState(c1.state_dir).keys(), device_id=c1.device_id) as link:
        with pytest.raises(PlatformError, match="only run .* aggregator may upload") as refused:
            link.signed_bytes(f"/api/agent/runs/{run_id}/model", zip_path.read_bytes(), "application/zip")
    assert refused.value.status == 403

    async with Browser(tmp_path / "profile") as page:
        await page.goto(f"{controller.url}/login")
        await page.submit("#login", {"#token": controller.token})
        await page.goto(f"{controller.url}/runs/{run_id}")
        serve = await page.text("#serve-command")
        assert serve == f"unzip {run_id}-model.zip && unitedllm serve {run_id}-model"
        assert await page.evaluate("document.querySelector('#model-download').download") == zip_path.name
        # The link, followed with the page's login, gives the same bytes.
        digest = await page.evaluate(
            "fetch(document.querySelector('#model-download').href, {credentials: 'same-origin'})"
            ".then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))"
            ".then(d => Array.from(new Uint8Array(d)).map(x => x.toString(16).padStart(2, '0')).join(''))"
        )
    assert digest == run["model"]["digest"]
