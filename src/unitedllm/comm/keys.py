"""Each rank's own HMAC key, resolved from the environment, a key file or the shared run secret.

Rank ``r``'s key comes from the environment variable ``UNITEDLLM_RANK_KEY_<r>``, else from the
YAML file named by ``comm_args.rank_keys_path`` (a mapping rank -> key). The aggregator needs
the key of every client rank; a client needs only its own, and a process never reads more than
it needs. A rank without a key of its own falls back to the shared run secret
(``UNITEDLLM_RUN_SECRET`` / ``comm_args.run_secret``), with a warning: one shared key lets any
client speak as any rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from unitedllm.comm.settings import ENV_RUN_SECRET, resolve_run_secret
from unitedllm.config.redaction import remember_secret
from unitedllm.config.types import Config
from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.protocol.signing import RankKeys

__all__ = ["ENV_RANK_KEY", "rank_key_env", "resolve_rank_keys"]

log = logging.getLogger(__name__)

ENV_RANK_KEY = "UNITEDLLM_RANK_KEY_"


def rank_key_env(rank: int) -> str:
    """The environment variable holding rank ``rank``'s key."""
    return f"{ENV_RANK_KEY}{rank}"


def _key_file(path: str, base_dir: Path | None, wanted: set[int]) -> dict[int, bytes]:
    """The keys of ``wanted`` ranks in the YAML file ``path`` (a mapping rank -> key)."""
    import yaml

    where = "comm_args.rank_keys_path"
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    try:
        if not resolved.is_file():
            raise ConfigError(ConfigProblem(where, f"not a file: {str(resolved)!r}"))
        raw = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(ConfigProblem(where, f"cannot read {str(resolved)!r}: {exc}")) from None
    if not isinstance(raw, Mapping):
        raise ConfigError(
            ConfigProblem(where, f"{str(resolved)!r} must map client ranks to keys, got {type(raw).__name__}")
        )
    keys: dict[int, bytes] = {}
    for rank_text, value in raw.items():
        try:
            rank = int(rank_text)
        except (TypeError, ValueError):
            raise ConfigError(
                ConfigProblem(where, f"{str(resolved)!r}: {rank_text!r} is not a client rank")
            ) from None
        if rank not in wanted:
            continue  # a process reads only the keys it needs
        if not isinstance(value, str) or not value:
            raise ConfigError(
                ConfigProblem(where, f"{str(resolved)!r}: the key of rank {rank} must be a non-empty string")
            )
        remember_secret(value)  # read from a file: mask it in this process's logs too
        keys[rank] = value.encode("utf-8")
    return keys


def resolve_rank_keys(
    cfg: Config,
    *,
    rank: int,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> RankKeys:
    """The keys process ``rank`` holds: every client's for the aggregator (rank 0), else its own.

    Raises :class:`ConfigError` naming every way to set a key when a needed one is missing and
    there is no run secret to fall back to.
    """
    environ = os.environ if env is None else env
    clients = set(range(1, cfg.train_args.client_num_in_total + 1))
    wanted = clients if rank == 0 else {rank}
    path = cfg.comm_args.rank_keys_path
    keys = _key_file(path, base_dir, wanted) if path else {}
    for r in wanted:
        value = environ.get(rank_key_env(r), "")
        if value:
            remember_secret(value)
            keys[r] = value.encode("utf-8")
    missing = sorted(wanted - set(keys))
    if not missing:
        return RankKeys(keys)
    shared = resolve_run_secret(cfg, required=False, env=environ)
    if shared is None:
        example = rank_key_env(missing[0])
        raise ConfigError(
            ConfigProblem(
                "comm_args.run_secret",
                f"the MQTT_S3 backend needs a key for client rank(s) {missing}: set {example} "
                f"(one per rank), a comm_args.rank_keys_path file, or the shared run secret "
                f"{ENV_RUN_SECRET} / comm_args.run_secret (the same on every rank)",
            )
        )
    if keys:
        log.warning(
            "client rank(s) %s have no key of their own (%s...); they share the run secret, "
            "so each of them can speak as the others",
            missing,
            ENV_RANK_KEY,
        )
    else:
        log.warning(
            "messages are signed with the shared run secret only: every client is trusted with "
            "every rank (give each rank its own key with %s<rank> to prevent that)",
            ENV_RANK_KEY,
        )
    return RankKeys(keys, shared=shared)
