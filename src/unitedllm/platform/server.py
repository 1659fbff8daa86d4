"""``unitedllm platform serve``: open the data folder and database, then serve the API and page."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from unitedllm.platform.api import Notifier, create_app
from unitedllm.platform.broker import BrokerAccess
from unitedllm.platform.catalog import Catalog
from unitedllm.platform.controller import Controller, PlatformFiles
from unitedllm.platform.db import Database, default_url
from unitedllm.platform.presence import PresenceListener
from unitedllm.platform.runs import RunService
from unitedllm.platform.signing import KeyPair
from unitedllm.platform.store import PackageStore

__all__ = ["Platform", "open_platform", "serve"]

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE_ENV = "UNITEDLLM_PLATFORM_ADMIN_TOKEN_FILE"


@dataclass
class Platform:
    controller: Controller
    runs: RunService
    notifier: Notifier
    catalog: Catalog
    admin_token: str | None  # set only on the first start, to be shown once


def open_platform(
    data_dir: Path, db_url: str | None = None, *, heartbeat_s: float = 5.0, broker_dir: Path | None = None
) -> Platform:
    """Open (or create on first start) the platform key, master secret and database."""
    from unitedllm.comm.settings import resolve_s3
    from unitedllm.config.types import CommArgs

    files = PlatformFiles(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys, _created = KeyPair.load_or_create(files.key)
    db = Database(db_url or default_url(data_dir))
    db.upgrade()
    store = PackageStore(resolve_s3(CommArgs(backend="MQTT_S3")))
    controller = Controller(
        db,
        keys=keys,
        master_secret=files.load_master_secret(),
        store=store,
        heartbeat_s=heartbeat_s,
        broker=BrokerAccess(broker_dir) if broker_dir is not None else None,
    )
    notifier = Notifier()
    runs = RunService(controller, notify=notifier.notify)
    runs.sync_broker()
    return Platform(controller, runs, notifier, Catalog(db), controller.ensure_admin_token())


def serve(
    data_dir: Path,
    *,
    db_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8800,
    heartbeat_s: float = 5.0,
    broker_dir: Path | None = None,
    out: IO[str] | None = None,
) -> None:
    """Serve until interrupted. The first start prints the admin token once (or writes it to the
    file named by ``$UNITEDLLM_PLATFORM_ADMIN_TOKEN_FILE``, for scripts)."""
    import uvicorn

    from unitedllm.platform.page import add_page

    stream = out or sys.stdout
    platform = open_platform(data_dir, db_url, heartbeat_s=heartbeat_s, broker_dir=broker_dir)
    app = create_app(platform.controller, platform.runs, platform.notifier, platform.catalog)
    add_page(app, platform)
    if platform.admin_token is not None:
        token_file = os.environ.get(ADMIN_TOKEN_FILE_ENV)
        if token_file:
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(platform.admin_token)
            print(f"admin token written to {token_file} (shown nowhere else)", file=stream)
        else:
            print(f"admin token (shown once, store it now): {platform.admin_token}", file=stream)
    print(
        f"UnitedLLM platform on http://{host}:{port}/ (platform key {platform.controller.keys.fingerprint})",
        file=stream,
        flush=True,
    )
    listener = presence_listener(platform.controller) if broker_dir is not None else None
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if listener is not None:
            listener.stop()


def presence_listener(controller: Controller) -> PresenceListener | None:
    """Follow the devices' presence on the broker (``UNITEDLLM_MQTT_*``, the operator's login);
    without a broker setting, devices are found offline by the heartbeat window only."""
    from unitedllm.comm.settings import resolve_mqtt
    from unitedllm.config.types import CommArgs
    from unitedllm.errors import ConfigError

    try:
        settings = resolve_mqtt(CommArgs(backend="MQTT_S3"))
    except ConfigError as exc:
        log.warning("device presence by heartbeats only: no broker to follow (%s)", exc.render())
        return None
    listener = PresenceListener(
        settings, public_key_of=controller.public_key_of, apply=controller.apply_presence
    )
    listener.start()
    return listener
