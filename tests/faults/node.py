"""One node of a fault-test run as its own process: ``python -m faults.node CONFIG RANK RUN_ID [--resume]``.

It serves rank ``RANK`` exactly as ``unitedllm server``/``unitedllm client`` do (same backend,
signing, retries, exit codes), with the fast plain-PyTorch :class:`LinearTrainer` instead of a
Hugging Face model. ``FAULT_FIT_SLEEP_S`` makes each local round take that much longer, so a
test can land a kill while the node trains.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from linear_trainer import LinearTrainer


class PacedTrainer(LinearTrainer):
    """A LinearTrainer whose rounds take ``FAULT_FIT_SLEEP_S`` seconds more."""

    def fit(self, weights: Any, **kwargs: Any) -> Any:
        time.sleep(float(os.environ.get("FAULT_FIT_SLEEP_S", "0")))
        return super().fit(weights, **kwargs)


def main(argv: list[str]) -> int:
    from unitedllm.config import load_config
    from unitedllm.errors import UnitedLLMError
    from unitedllm.launch import serve_in_process

    config, rank, run_id = argv[0], int(argv[1]), argv[2]
    try:
        cfg = load_config(config, run_id=run_id)
        how = serve_in_process(
            cfg, rank=rank, run_id=run_id, resume="--resume" in argv, trainer=PacedTrainer(rank)
        )
    except UnitedLLMError as exc:  # the CLI's rule: one line, exit 1 for a failed run
        print(f"error: {exc}", flush=True)
        return 1
    print(f"rank {rank} finished: {how}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
