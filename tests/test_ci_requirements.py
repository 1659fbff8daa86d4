"""Under CI a missing service, browser or data set fails the run; elsewhere the test skips, saying why."""

from __future__ import annotations

import pytest
import services


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CI": "TRUE"}, {"UNITEDLLM_REQUIRE_SERVICES": "1"}])
def test_a_missing_requirement_fails_under_ci(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("UNITEDLLM_REQUIRE_SERVICES", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(pytest.fail.Exception, match="mosquitto is not installed"):
        services.require("mosquitto is not installed")
    monkeypatch.setattr(services, "missing_service_binaries", lambda: "weed is not installed")
    with pytest.raises(pytest.fail.Exception, match="real MQTT/S3 services unavailable: weed"):
        services.skip_without_services()
    with pytest.raises(pytest.fail.Exception, match="no-such-set/file.jsonl absent from the shared data"):
        services.require_shared_data("no-such-set/file.jsonl")


def test_elsewhere_a_missing_requirement_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("UNITEDLLM_REQUIRE_SERVICES", "0")
    with pytest.raises(pytest.skip.Exception, match="no headless browser"):
        services.require("no headless browser at /usr/bin/chromium")
    services.require(None)  # nothing missing: the test goes on
