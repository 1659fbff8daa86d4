"""``unitedllm agent``: enrol this machine once, then serve the platform's commands until stopped."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from unitedllm.errors import UnitedLLMError

__all__ = ["agent_command"]


def agent_command(
    platform: Annotated[
        str | None, typer.Option("--platform", help="Controller URL (needed to enrol).")
    ] = None,
    enrol_token: Annotated[
        str | None,
        typer.Option("--enrol", help="One-time enrol token (first start); without it, wait for approval."),
    ] = None,
    role: Annotated[str, typer.Option("--role", help="client or server (aggregator).")] = "client",
    name: Annotated[str | None, typer.Option("--name", help="Device name shown in the platform.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Keys and state (default ~/.unitedllm/agent/NAME).")
    ] = None,
    heartbeat_s: Annotated[float, typer.Option("--heartbeat-s", help="Seconds between heartbeats.")] = 5.0,
    stop_roles_on_exit: Annotated[
        bool, typer.Option("--stop-roles-on-exit", help="Stop the running role when the agent stops.")
    ] = False,
) -> None:
    """Run the device agent (FedML's `fedml login`): enrol, heartbeat, start and stop roles."""
    import socket

    from unitedllm.agent.agent import Agent, default_state_dir, enrol
    from unitedllm.agent.identity import AgentState

    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if role not in ("client", "server"):
        typer.echo(f"error: --role {role!r}: expected client or server", err=True)
        raise typer.Exit(2)
    name = name or socket.gethostname()
    state = AgentState(state_dir or default_state_dir(name))
    try:
        if state.enrolment() is None:
            if not platform:
                typer.echo(
                    f"error: {state.root} is not enrolled: give --platform URL [--enrol TOKEN]", err=True
                )
                raise typer.Exit(2)
            # Without a token the device waits until an admin approves it in the page.
            enrol(state, platform=platform, token=enrol_token, name=name, role=role)
        elif platform is not None:
            enrol(state, platform=platform, token=enrol_token, name=name, role=role)  # checks the URL
        agent = Agent(state, heartbeat_s=heartbeat_s, stop_roles_on_exit=stop_roles_on_exit)
    except UnitedLLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if getattr(exc, "status", None) in (401, 403, 409, 422) else 1) from None
    # SIGTERM ends the agent like Ctrl-C: at once, even inside a command poll.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.shutdown()
