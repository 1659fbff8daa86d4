"""Entry point of this project's packages: starts the aggregator (rank 0) or a client (rank 1..N).

`unitedllm package run` (or an MLOps platform) starts it with FedML's dynamic args:
    python launch.py --cf config/fedml_config.yaml --rank 1 --run_id RUN_ID [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os

import unitedllm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cf", default=os.environ.get("UNITEDLLM_CONFIG", "config/fedml_config.yaml"), help="run config file"
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=int(os.environ.get("UNITEDLLM_RANK", "0")),
        help="0 = aggregator, 1..N = client",
    )
    parser.add_argument(
        "--run_id",
        "--run-id",
        dest="run_id",
        default=os.environ.get("UNITEDLLM_RUN_ID"),
        help="run id shared by every node",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train_args.comm_round=3",
    )
    # an MLOps platform may pass more dynamic args (client_id_list, ...): they are not needed here
    args, _unknown = parser.parse_known_args()
    if not args.run_id:
        parser.error("--run_id is required (the same on every node of the run)")
    unitedllm.launch(args.cf, rank=args.rank, run_id=args.run_id, overrides=args.overrides)


if __name__ == "__main__":
    main()
