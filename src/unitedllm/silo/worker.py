"""The process that torchrun or the DeepSpeed launcher starts for each rank of a silo.

``python -m unitedllm.silo.worker CONFIG --rank N --run-id ID --engine torch|deepspeed``
(``unitedllm client`` and ``unitedllm server`` build this command; see
:mod:`unitedllm.silo.launcher`). Silo rank 0 runs the client (rank N >= 1) or the aggregator
(rank 0), the silo's only connection to the rest of the run, with the configured trackers;
the other ranks follow its trainer calls (:mod:`unitedllm.silo.group`). Exit codes: 0
finished, 1 failed, 2 bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from unitedllm.errors import ConfigError, UnitedLLMError

__all__ = ["main"]

log = logging.getLogger("unitedllm.silo")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m unitedllm.silo.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config")
    parser.add_argument("--rank", type=int, required=True, help="the rank in the run: 0 aggregator, N client")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--engine", choices=["torch", "deepspeed"], required=True)
    parser.add_argument("--deepspeed", default=None, help="resolved path of train_args.deepspeed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="the aggregator continues its run")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def _setup_logging(verbose: bool, silo_rank: int) -> None:
    from unitedllm.log_setup import line_handler, setup_logging

    handler = line_handler(f"[silo rank {silo_rank}] %(message)s")
    # The leader tells the story; followers speak up only when something is wrong.
    setup_logging(verbose, handler=handler, level=logging.INFO if silo_rank == 0 else logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from unitedllm.config import load_config
    from unitedllm.launch import serve_in_process
    from unitedllm.silo.distributed import open_silo
    from unitedllm.silo.execution import execution_for
    from unitedllm.silo.group import check_same_model, follow, leader_for
    from unitedllm.silo.launcher import role_name
    from unitedllm.training.hf import HFLocalTrainer

    ctx = open_silo(args.engine, deepspeed_config=args.deepspeed)
    _setup_logging(args.verbose, ctx.rank)
    who = role_name(args.rank)
    cfg = load_config(args.config, overrides=args.overrides, run_id=args.run_id)
    trainer = HFLocalTrainer(cfg, args.rank, execution=execution_for(ctx))
    check_same_model(trainer, ctx)
    if not ctx.is_leader:
        if follow(trainer, ctx):
            return 0
        log.error(
            "%s: silo rank 0 stopped with an error (see its output); silo rank %d stops too", who, ctx.rank
        )
        return 1
    log.info("%s: silo of %d processes (%s)", who, ctx.world_size, args.engine)
    leader = leader_for(trainer, ctx)
    failed = True
    try:
        reason = serve_in_process(cfg, rank=args.rank, run_id=args.run_id, resume=args.resume, trainer=leader)
        failed = False
    finally:
        leader.close(failed=failed)
    log.info("%s: run %s finished (%s)", who, args.run_id, reason)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one rank of a client silo; returns the process exit code."""
    args = _parse(argv)
    _setup_logging(args.verbose, -1)
    from unitedllm.silo.distributed import close_silo

    try:
        return _serve(args)
    except ConfigError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except UnitedLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_silo()


if __name__ == "__main__":
    sys.exit(main())
