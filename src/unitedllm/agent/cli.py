"""``unitedllm agent``: enrol this machine once, then serve the platform's commands until stopped."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from unitedllm.errors import UnitedLLMError

if TYPE_CHECKING:
    from unitedllm.agent.launcher import Launcher

__all__ = ["agent_command", "make_launcher"]

LAUNCHERS = ("local", "kubernetes", "slurm")


def make_launcher(
    name: str,
    *,
    k8s_image: str | None = None,
    k8s_namespace: str = "default",
    k8s_volume_claim: str | None = None,
    k8s_gpus: int = 0,
    slurm_partition: str | None = None,
    slurm_time: str | None = None,
    slurm_options: list[str] | None = None,
) -> Launcher:
    """The launcher ``--launcher`` names, set up from its flags; PlatformError (one line) otherwise."""
    from unitedllm.agent.launcher import LocalProcessLauncher
    from unitedllm.platform.errors import PlatformError

    if name == "local":
        return LocalProcessLauncher()
    if name == "kubernetes":
        from unitedllm.agent.kubernetes import KubernetesLauncher

        return KubernetesLauncher(
            image=k8s_image or "", namespace=k8s_namespace, volume_claim=k8s_volume_claim, gpus=k8s_gpus
        )
    if name == "slurm":
        from unitedllm.agent.slurm import SlurmLauncher

        return SlurmLauncher(partition=slurm_partition, time_limit=slurm_time, options=slurm_options or [])
    raise PlatformError(f"--launcher {name!r}: expected one of {', '.join(LAUNCHERS)}")


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
    launcher: Annotated[
        str,
        typer.Option("--launcher", help="How roles start: local (processes), kubernetes (Jobs) or slurm."),
    ] = "local",
    k8s_image: Annotated[
        str | None, typer.Option("--k8s-image", help="kubernetes: the image with UnitedLLM installed.")
    ] = None,
    k8s_namespace: Annotated[
        str, typer.Option("--k8s-namespace", help="kubernetes: the namespace.")
    ] = "default",
    k8s_volume_claim: Annotated[
        str | None,
        typer.Option(
            "--k8s-volume-claim", help="kubernetes: the claim holding STATE_DIR/runs, mounted there."
        ),
    ] = None,
    k8s_gpus: Annotated[
        int, typer.Option("--k8s-gpus", help="kubernetes: GPUs per role (nvidia.com/gpu).")
    ] = 0,
    slurm_partition: Annotated[
        str | None, typer.Option("--slurm-partition", help="slurm: the partition.")
    ] = None,
    slurm_time: Annotated[str | None, typer.Option("--slurm-time", help="slurm: the time limit.")] = None,
    slurm_option: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm-option", help="slurm: one more #SBATCH option, e.g. --gres=gpu:1 (repeatable)."
        ),
    ] = None,
) -> None:
    """Run the device agent (FedML's `fedml login`): enrol, heartbeat, start and stop roles."""
    import socket

    from unitedllm.agent.agent import Agent, default_state_dir, enrol
    from unitedllm.agent.identity import AgentState

    _setup_logging()
    if role not in ("client", "server"):
        typer.echo(f"error: --role {role!r}: expected client or server", err=True)
        raise typer.Exit(2)
    name = name or socket.gethostname()
    state = AgentState(state_dir or default_state_dir(name))
    try:
        role_launcher = make_launcher(
            launcher,
            k8s_image=k8s_image,
            k8s_namespace=k8s_namespace,
            k8s_volume_claim=k8s_volume_claim,
            k8s_gpus=k8s_gpus,
            slurm_partition=slurm_partition,
            slurm_time=slurm_time,
            slurm_options=slurm_option or [],
        )
    except UnitedLLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
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
        agent = Agent(
            state, heartbeat_s=heartbeat_s, launcher=role_launcher, stop_roles_on_exit=stop_roles_on_exit
        )
    except UnitedLLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if getattr(exc, "status", None) in (401, 403, 409, 422) else 1) from None
    # SIGTERM ends the agent like Ctrl-C: at once, even inside a command poll.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.shutdown()


def _setup_logging() -> None:
    """Timestamped ``agent`` lines (an agent runs for days); libraries quiet, secrets masked."""
    from unitedllm.log_setup import line_handler, setup_logging

    setup_logging(False, handler=line_handler("%(asctime)s agent %(levelname)s %(message)s"))
