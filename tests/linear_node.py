"""One node of a run as its own process, with the plain-PyTorch trainer (fast to start and to train).

``python tests/linear_node.py server|client CONFIG --run-id ID [--rank N] [--resume] [--gates DIR]``

Broker, store and run secret come from the ``UNITEDLLM_*`` environment, as for ``unitedllm
server``/``client``. With ``--gates`` a client marks ``DIR/entered-<rank>-<round>`` when it
starts training a round and trains only once ``DIR/open-<round>`` exists, so a test can kill
it (or the aggregator) at a known point of the run instead of guessing with sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_trainer import LinearTrainer  # noqa: E402

from unitedllm.training.base import FitResult  # noqa: E402

GATE_POLL_S = 0.02


class GatedTrainer(LinearTrainer):
    """The linear trainer, holding each round until the test opens its gate."""

    def __init__(self, rank: int, gates: Path) -> None:
        super().__init__(rank)
        self.gates = gates

    def fit(self, weights: Mapping[str, torch.Tensor], **kwargs: Any) -> FitResult:
        round_idx = kwargs["round_idx"]
        (self.gates / f"entered-{self.rank}-{round_idx}").touch()
        while not (self.gates / f"open-{round_idx}").exists():
            time.sleep(GATE_POLL_S)
        return super().fit(weights, **kwargs)


async def serve(args: argparse.Namespace) -> None:
    import unitedllm

    cfg = unitedllm.load_config(args.config)
    if args.role == "server":
        async with unitedllm.Aggregator(
            cfg, run_id=args.run_id, trainer=LinearTrainer(0), resume=args.resume
        ) as aggregator:
            await aggregator.run()
        return
    trainer = LinearTrainer(args.rank) if args.gates is None else GatedTrainer(args.rank, args.gates)
    async with unitedllm.Client(cfg, rank=args.rank, run_id=args.run_id, trainer=trainer) as client:
        await client.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("config", type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--gates", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
