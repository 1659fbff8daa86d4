"""The controller's HTTP answers as seen by its callers (the agent's link, the CLI's client): one
``send`` that turns a dropped connection or a refusal into a :class:`PlatformError` naming the call."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from unitedllm.platform.errors import PlatformError

__all__ = ["send"]


def send(url: str, call: str, request: Callable[[], httpx.Response]) -> httpx.Response:
    """``request()``'s answer when it is 200; otherwise a PlatformError (``call`` names the request).

    The controller's refusals carry ``{"error": {"message": ...}}``; anything else (a proxy's page)
    is quoted, cut at 200 characters.
    """
    try:
        response = request()
    except httpx.HTTPError as exc:
        raise PlatformError(f"cannot reach the platform at {url}: {exc}") from None
    if response.status_code == 200:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    raise PlatformError(f"{call}: {message} (HTTP {response.status_code})", status=response.status_code)
