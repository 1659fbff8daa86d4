"""A silo's process layout: which launcher starts rank N, with how many processes, and starting them.

:func:`unitedllm.launch.launch` starts one role from a config file: it runs the node's
bootstrap, asks :func:`plan_for` how the role runs, and either serves it in its own process
or hands the plan to :func:`start_silo`.

``environment_args.launcher`` picks how ``unitedllm client`` runs a silo (and ``unitedllm server``
the aggregator, when it evaluates the global model: ``validation_args.is_aggregator_test``):

* ``torch``: ``torchrun`` starts ``nproc_per_node`` processes per node (DDP);
* ``deepspeed``: the DeepSpeed launcher starts them, and Hugging Face's ``Trainer`` runs
  DeepSpeed with ``train_args.deepspeed`` (ZeRO-2/3);
* ``auto``: deepspeed when a GPU is present and ``train_args.deepspeed`` is set, torchrun
  when more than one process is asked for (or more than one GPU is present), else the
  client runs right here in this process. The choice and its reason are logged.

Both launchers start :mod:`unitedllm.silo.worker` in every process. Relative paths in
``environment_args.bootstrap`` and ``train_args.deepspeed`` are looked up next to the config
file first, then in the current directory (FedML's convention: packages run from their
source folder, and the seed names ``configs/deepspeed/...`` from the project root).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from unitedllm.errors import ConfigError, ConfigProblem, MissingDependency, UnitedLLMError
from unitedllm.node_processes import wait_forwarding_signals

if TYPE_CHECKING:
    from unitedllm.config.types import Config, EnvironmentArgs

__all__ = [
    "LaunchPlan",
    "SiloFailed",
    "choose_launcher",
    "launcher_command",
    "local_gpu_count",
    "plan_for",
    "resolve_config_path",
    "role_name",
    "start_silo",
]

log = logging.getLogger(__name__)

LauncherKind = Literal["python", "torch", "deepspeed"]
WORKER_MODULE = "unitedllm.silo.worker"
DEFAULT_MULTI_NODE_PORT = 29500


def role_name(rank: int) -> str:
    """How the log names rank ``rank`` of a run: ``aggregator`` or ``client N``."""
    return "aggregator" if rank == 0 else f"client {rank}"


class SiloFailed(UnitedLLMError):
    """A silo's launcher (and so at least one of its processes) exited with an error."""

    def __init__(self, rank: int, launcher: str, returncode: int):
        self.rank = rank
        self.launcher = launcher
        self.returncode = returncode
        super().__init__(
            f"{role_name(rank)}: the {launcher} silo exited with code {returncode}; the failing process's error "
            "is in the output above"
        )


@dataclass(frozen=True)
class LaunchPlan:
    """How a client silo starts: ``launcher`` with ``nproc_per_node`` processes per node, and why."""

    launcher: LauncherKind
    nproc_per_node: int
    reason: str


def local_gpu_count(cfg: Config) -> int:
    """GPUs this node may train on: none when the config asks for the CPU."""
    if not cfg.device_args.using_gpu or cfg.train_args.use_cpu:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def choose_launcher(
    env: EnvironmentArgs, *, gpus: int, deepspeed_config: bool, deepspeed_installed: bool | None = None
) -> LaunchPlan:
    """The launcher for a silo with ``gpus`` local GPUs; explicit choices are checked, ``auto`` is decided."""
    if deepspeed_installed is None:
        deepspeed_installed = _installed("deepspeed")
    nproc = env.nproc_per_node or max(gpus, 1)
    processes = nproc * env.nnodes
    if env.launcher == "torch":
        ignored = "; train_args.deepspeed is ignored under torchrun" if deepspeed_config else ""
        return LaunchPlan("torch", nproc, "environment_args.launcher is torch" + ignored)
    if env.launcher == "deepspeed":
        if not deepspeed_config:
            raise ConfigError(
                ConfigProblem(
                    "environment_args.launcher",
                    "deepspeed needs train_args.deepspeed (a DeepSpeed JSON "
                    "config, e.g. configs/deepspeed/ds_z3_bf16_config.json)",
                )
            )
        if not deepspeed_installed:
            raise MissingDependency("deepspeed", "deepspeed", "environment_args.launcher: deepspeed")
        return LaunchPlan("deepspeed", nproc, "environment_args.launcher is deepspeed")
    notes: list[str] = []
    if deepspeed_config and gpus > 0:
        if deepspeed_installed:
            return LaunchPlan("deepspeed", nproc, f"auto: {gpus} GPU(s) and train_args.deepspeed is set")
        notes.append(
            "train_args.deepspeed is set but deepspeed is not installed (pip install 'unitedllm[deepspeed]')"
        )
    elif deepspeed_config:
        notes.append("train_args.deepspeed is ignored without a GPU")
    if processes > 1:
        what = f"{gpus} GPUs" if gpus > 1 and env.nproc_per_node is None else f"{processes} processes"
        return LaunchPlan("torch", nproc, "; ".join([f"auto: {what}", *notes]))
    device = "one GPU" if gpus == 1 else "no GPU, one process"
    return LaunchPlan("python", 1, "; ".join([f"auto: {device}", *notes]))


def plan_for(cfg: Config, *, rank: int, gpus: int) -> LaunchPlan:
    """How rank ``rank`` starts: a client by :func:`choose_launcher`; the aggregator too, when it evaluates.

    An aggregator that does not evaluate (``validation_args.is_aggregator_test: false``) only
    aggregates and saves, which one process does as well as many: it runs here.
    """
    if rank == 0 and not cfg.validation_args.is_aggregator_test:
        return LaunchPlan(
            "python", 1, "validation_args.is_aggregator_test is false: the aggregator does not evaluate"
        )
    return choose_launcher(
        cfg.environment_args, gpus=gpus, deepspeed_config=cfg.train_args.deepspeed is not None
    )


def resolve_config_path(value: str, *, config_dir: Path | None, key: str) -> Path:
    """``value`` as an existing file: absolute, else next to the config file, else in the current directory."""
    from unitedllm.config.paths import beside_config

    found = Path(beside_config(value, config_dir) if config_dir else value).expanduser()
    if found.is_file():
        return found.resolve()
    path = Path(value).expanduser()
    candidates = (
        [path] if path.is_absolute() else [*([config_dir / path] if config_dir else []), Path.cwd() / path]
    )
    looked = " and ".join(str(c) for c in candidates)
    raise ConfigError(ConfigProblem(key, f"{value!r} is not a file (looked for {looked})"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rendezvous(env: EnvironmentArgs) -> tuple[str, int]:
    if env.nnodes > 1:
        if env.node_rank >= env.nnodes:
            raise ConfigError(
                ConfigProblem(
                    "environment_args.node_rank", f"{env.node_rank} is not below nnodes ({env.nnodes})"
                )
            )
        return env.master_addr, env.master_port or DEFAULT_MULTI_NODE_PORT
    return env.master_addr, env.master_port or _free_port()


def launcher_command(plan: LaunchPlan, env: EnvironmentArgs, worker_args: Sequence[str]) -> list[str]:
    """The command line that starts this node's processes of the silo, each running the silo worker."""
    addr, port = _rendezvous(env)
    if plan.launcher == "torch":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={plan.nproc_per_node}",
            f"--nnodes={env.nnodes}",
            f"--node-rank={env.node_rank}",
            f"--master-addr={addr}",
            f"--master-port={port}",
            *env.launcher_args,
            "-m",
            WORKER_MODULE,
            *worker_args,
        ]
    if plan.launcher == "deepspeed":
        if env.nnodes > 1 and "--hostfile" not in " ".join(env.launcher_args):
            raise ConfigError(
                ConfigProblem(
                    "environment_args.launcher_args",
                    "a DeepSpeed silo on several nodes needs "
                    "['--hostfile', PATH] (DeepSpeed's list of nodes and their slots)",
                )
            )
        multi = (
            ["--num_nodes", str(env.nnodes), "--no_ssh", f"--node_rank={env.node_rank}"]
            if env.nnodes > 1
            else []
        )
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={plan.nproc_per_node}",
            *multi,
            f"--master_addr={addr}",
            f"--master_port={port}",
            "--no_local_rank",
            *env.launcher_args,
            "--module",
            WORKER_MODULE,
            *worker_args,
        ]
    raise ValueError(f"no command for launcher {plan.launcher!r}")


def _override_args(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    else:
        items = list(overrides)
    return [x for item in items for x in ("--set", item)]


def start_silo(
    cfg: Config,
    plan: LaunchPlan,
    *,
    config: str | Path,
    rank: int,
    run_id: str,
    gpus: int,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> str:
    """Blocking: start this node's processes of rank ``rank``'s silo under ``plan`` and wait for them.

    Every process runs :mod:`unitedllm.silo.worker` on ``config``; SIGTERM and Ctrl-C reach the
    launcher. Returns the silo's shape in words; raises :class:`SiloFailed` when the launcher fails.
    """
    if plan.launcher == "python":
        raise ValueError("a 'python' plan runs the role in this process: there is no silo to start")
    env_args = cfg.environment_args
    config_path = Path(config).resolve()
    worker_args = [
        str(config_path),
        "--rank",
        str(rank),
        "--run-id",
        run_id,
        "--engine",
        plan.launcher,
        *_override_args(overrides),
        *(["--resume"] if resume else []),
        *(["--verbose"] if verbose else []),
    ]
    child_env = dict(os.environ)
    if plan.launcher == "deepspeed":
        from unitedllm.silo.deepspeed_config import read_deepspeed_config

        assert cfg.train_args.deepspeed is not None
        ds_path = resolve_config_path(
            cfg.train_args.deepspeed, config_dir=config_path.parent, key="train_args.deepspeed"
        )
        read_deepspeed_config(ds_path)
        worker_args += ["--deepspeed", str(ds_path)]
        if gpus == 0:
            # DeepSpeed's CPU accelerator; LOCAL_SIZE is how many "devices" its launcher may use here.
            child_env.setdefault("DS_ACCELERATOR", "cpu")
            child_env.setdefault("LOCAL_SIZE", str(plan.nproc_per_node))
    command = launcher_command(plan, env_args, worker_args)
    log.info("%s: %s", role_name(rank), " ".join(command))
    code = wait_forwarding_signals(subprocess.Popen(command, env=child_env))
    if code != 0:
        raise SiloFailed(rank, plan.launcher, code)
    return f"{plan.launcher} silo of {plan.nproc_per_node * env_args.nnodes} processes"
