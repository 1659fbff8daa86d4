"""Client silos with many devices: launcher choice, bootstrap, and the ranks of one silo working as one client.

A silo is one client (rank 1..N of the federation) that may span several processes: one per
local device under ``torchrun`` or the DeepSpeed launcher (``environment_args.launcher``),
possibly on several nodes. Only silo rank 0 talks to the aggregator; the other ranks get the
global weights by ``torch.distributed`` broadcast and train with it (docs/silos.md).
"""

from __future__ import annotations

from unitedllm.node_processes import BootstrapError, run_bootstrap
from unitedllm.silo.launcher import LaunchPlan, SiloFailed, choose_launcher, plan_for, start_silo

__all__ = [
    "BootstrapError",
    "LaunchPlan",
    "SiloFailed",
    "choose_launcher",
    "plan_for",
    "run_bootstrap",
    "start_silo",
]
