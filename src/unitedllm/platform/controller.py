"""What the controller does, apart from HTTP: logins, enrolment, devices, packages and their signatures.

Runs (launch, commands, states, logs) are in :mod:`unitedllm.platform.runs`; the HTTP layer
(:mod:`unitedllm.platform.api`) only translates requests into these calls.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import secrets
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import delete, func, select

from unitedllm.platform import signing
from unitedllm.platform.auth import ADMIN, ROLES, hash_token, new_token
from unitedllm.platform.broker import BrokerAccess, device_username
from unitedllm.platform.db import Database
from unitedllm.platform.errors import PackageRefused, PlatformError
from unitedllm.platform.models import ApiToken, Device, DeviceSample, EnrolToken, Package
from unitedllm.platform.presence import PRESENCE_OFFLINE, STATUS_ORDER, Presence, presence_topic
from unitedllm.platform.states import OFFLINE
from unitedllm.platform.store import PackageStore

__all__ = ["Controller", "PlatformFiles"]

DEVICE_ROLES = ("client", "server")
MAX_PACKAGE_BYTES = 512 * 2**20
SAMPLES_KEPT = 720  # an hour of heartbeats at the default interval


@dataclass(frozen=True)
class PlatformFiles:
    """The controller's data folder: its signing key, its master secret and (by default) its database."""

    root: Path

    @property
    def key(self) -> Path:
        return self.root / "platform_key.pem"

    @property
    def master_secret(self) -> Path:
        return self.root / "master.secret"

    def load_master_secret(self) -> bytes:
        """The secret every run's keys are derived from (created on first start, mode 0600)."""
        path = self.master_secret
        if not path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
        return path.read_bytes()


class Controller:
    """The platform's state and rules; every method opens its own short database session."""

    def __init__(
        self,
        db: Database,
        *,
        keys: signing.KeyPair,
        master_secret: bytes,
        store: PackageStore,
        heartbeat_s: float = 5.0,
        broker: BrokerAccess | None = None,
        samples_kept: int = SAMPLES_KEPT,
    ):
        self.db = db
        self.broker = broker
        self.keys = keys
        self.master_secret = master_secret
        self.store = store
        self.heartbeat_s = heartbeat_s
        # Each device's newest heartbeat metrics are kept in the database, for the load plots.
        self.samples_kept = samples_kept

    # -- secrets of a run (derived, never stored) ------------------------------------------

    def derive(self, purpose: str) -> str:
        digest = hmac.new(self.master_secret, purpose.encode(), hashlib.sha256).digest()
        return signing._b64(digest)

    # -- logins --------------------------------------------------------------------------

    def ensure_admin_token(self) -> str | None:
        """Create the first admin token when there is none; returns it (to print once) or ``None``."""
        with self.db.session() as s:
            if s.scalar(select(func.count()).select_from(ApiToken)):
                return None
            token = new_token("ulp_")
            s.add(ApiToken(name="admin", token_hash=hash_token(token), role=ADMIN))
            return token

    def create_api_token(self, name: str, role: str) -> str:
        if role not in ROLES:
            raise PlatformError(f"role {role!r}: expected one of {', '.join(ROLES)}", status=422)
        token = new_token("ulp_")
        with self.db.session() as s:
            s.add(ApiToken(name=name, token_hash=hash_token(token), role=role))
        return token

    def role_of(self, token: str) -> str | None:
        """The role a token logs in as, or ``None`` for an unknown token."""
        with self.db.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            return row.role if row is not None else None

    # -- enrolment -----------------------------------------------------------------------

    def create_enrol_token(self, role: str | None = None) -> str:
        if role is not None and role not in DEVICE_ROLES:
            raise PlatformError(f"role {role!r}: expected client or server", status=422)
        token = new_token("ule_")
        with self.db.session() as s:
            s.add(EnrolToken(token_hash=hash_token(token), role=role))
        return token

    def enrol(
        self, *, token: str | None, name: str, role: str, public_key: str, hardware: dict[str, Any]
    ) -> dict[str, Any]:
        """Enrol a new device: at once with a one-time token, or waiting for an admin's approval
        without one. Returns its id, whether it is approved, and the platform's public key."""
        if role not in DEVICE_ROLES:
            raise PlatformError(f"role {role!r}: expected client or server", status=422)
        try:
            signing.public_key_from_text(public_key)
        except ValueError as exc:
            raise PlatformError(f"public_key: {exc}", status=422) from None
        with self.db.session() as s:
            row = None
            if token:
                row = s.scalar(select(EnrolToken).where(EnrolToken.token_hash == hash_token(token)))
                if row is None or row.used_by is not None:
                    raise PlatformError("enrol token is unknown or already used", status=403)
                if row.role is not None and row.role != role:
                    raise PlatformError(f"this enrol token is for a {row.role}, not a {role}", status=403)
            if s.scalar(select(Device).where(Device.public_key == public_key)) is not None:
                raise PlatformError("a device with this public key is already enrolled", status=409)
            device = Device(
                id=uuid.uuid4().hex[:16],
                name=name,
                role=role,
                public_key=public_key,
                hardware=hardware,
                approved=row is not None,
                last_seen=time.time(),
            )
            s.add(device)
            if row is not None:
                row.used_by = device.id
            return {
                "device_id": device.id,
                "approved": device.approved,
                "platform_public_key": self.keys.public_text,
            }

    def approve(self, ref: str) -> dict[str, Any]:
        """Let a device that enrolled without a token take part (compare its key fingerprint first)."""
        with self.db.session() as s:
            device = s.get(Device, ref) or s.scalar(select(Device).where(Device.name == ref))
            if device is None:
                raise PlatformError(f"no device {ref!r}", status=404)
            device.approved = True
            return self.device_view(device)

    def authenticate_device(
        self, device_id: str, *, method: str, path: str, timestamp: str, body: bytes, signature: str
    ) -> None:
        """Check a device's signed request (its key, a fresh clock); raises PlatformError(401) otherwise."""
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            raise PlatformError("bad request timestamp", status=401) from None
        if skew > signing.REQUEST_SKEW_S:
            raise PlatformError(
                f"request timestamp is {skew:.0f} s away from the controller's clock", status=401
            )
        with self.db.session() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise PlatformError(f"device {device_id!r} is not enrolled", status=401)
            message = signing.request_message(method, path, timestamp, body)
            if not signing.verify(device.public_key, message, signature):
                raise PlatformError(f"request signature does not match device {device_id!r}", status=401)
            if not device.approved:
                raise PlatformError(f"device {device.name!r} is waiting for approval in the page", status=403)

    # -- devices -------------------------------------------------------------------------

    def heartbeat(self, device_id: str, metrics: dict[str, Any], hardware: dict[str, Any] | None) -> None:
        with self.db.session() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise PlatformError(f"device {device_id!r} is not enrolled", status=401)
            device.last_seen = time.time()
            device.metrics = metrics
            if hardware:
                device.hardware = hardware
            s.add(DeviceSample(device_id=device_id, at=device.last_seen, metrics=metrics))
            s.flush()
            # Keep the newest ``samples_kept``: drop everything older than the oldest of them.
            oldest_kept = s.scalar(
                select(DeviceSample.id)
                .where(DeviceSample.device_id == device_id)
                .order_by(DeviceSample.id.desc())
                .offset(self.samples_kept - 1)
                .limit(1)
            )
            if oldest_kept is not None:
                s.execute(
                    delete(DeviceSample).where(
                        DeviceSample.device_id == device_id, DeviceSample.id < oldest_kept
                    )
                )

    def device_samples(self, ref: str, since: float = 0.0) -> list[dict[str, Any]]:
        """A device's kept heartbeat metrics since ``since``, oldest first."""
        with self.db.session() as s:
            device = s.get(Device, ref) or s.scalar(select(Device).where(Device.name == ref))
            if device is None:
                raise PlatformError(f"no device {ref!r}", status=404)
            rows = s.scalars(
                select(DeviceSample)
                .where(DeviceSample.device_id == device.id, DeviceSample.at >= since)
                .order_by(DeviceSample.id)
            )
            return [{"at": row.at, "metrics": row.metrics} for row in rows]

    def public_key_of(self, device_id: str) -> str | None:
        """An enrolled device's public key (``None`` for an unknown device)."""
        with self.db.session() as s:
            device = s.get(Device, device_id)
            return device.public_key if device is not None else None

    def apply_presence(self, presence: Presence) -> bool:
        """Record a checked presence message unless a newer one is recorded; whether it applied."""
        with self.db.session() as s:
            device = s.get(Device, presence.device_id, with_for_update=True)
            if device is None:
                return False
            if device.presence is not None and device.presence_since is not None:
                if presence.order() <= (device.presence_since, STATUS_ORDER[device.presence]):
                    return False
            device.presence = presence.status
            device.presence_since = presence.since
            return True

    def broker_identity(self, device_id: str) -> dict[str, str]:
        """The device's own broker login and presence topic (empty when the platform manages no broker)."""
        if self.broker is None:
            return {}
        return {
            "username": device_username(device_id),
            "password": self.derive(f"mqtt:{device_id}"),
            "topic": presence_topic(device_id),
        }

    def device_view(self, device: Device) -> dict[str, Any]:
        # Offline as soon as the broker carried the agent's last will; otherwise (and without a
        # broker) when three heartbeat intervals passed without a heartbeat.
        heard = time.time() - device.last_seen <= 3 * self.heartbeat_s
        online = heard and device.presence != PRESENCE_OFFLINE
        return {
            "id": device.id,
            "name": device.name,
            "role": device.role,
            "state": device.state if online else OFFLINE,
            "online": online,
            "presence": device.presence,
            "run_id": device.run_id,
            "last_seen": device.last_seen,
            "hardware": device.hardware,
            "metrics": device.metrics,
            "fingerprint": signing.fingerprint(device.public_key),
            "approved": device.approved,
        }

    def devices(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [self.device_view(d) for d in s.scalars(select(Device).order_by(Device.enrolled_at))]

    def device(self, ref: str) -> dict[str, Any]:
        """A device by id or name."""
        with self.db.session() as s:
            device = s.get(Device, ref) or s.scalar(select(Device).where(Device.name == ref))
            if device is None:
                raise PlatformError(f"no device {ref!r}", status=404)
            return self.device_view(device)

    # -- packages ------------------------------------------------------------------------

    def push_package(self, data: bytes, filename: str) -> dict[str, Any]:
        """Verify a package's manifest and every file, store it by digest and sign the digest."""
        from unitedllm.packaging.errors import PackageError
        from unitedllm.packaging.runner import prepare_package

        if len(data) > MAX_PACKAGE_BYTES:
            raise PackageRefused(f"{filename}: {len(data)} bytes is over the {MAX_PACKAGE_BYTES} byte cap")
        with tempfile.TemporaryDirectory(prefix="unitedllm-push-") as tmp:
            zip_path = Path(tmp) / "package.zip"
            zip_path.write_bytes(data)
            try:
                # The platform authenticates packages by its own signature (below), not a package
                # secret: the manifest and every file are checked here, then the zip is signed.
                options: dict[str, Any] = (
                    {"allow_unauthenticated": True}
                    if "allow_unauthenticated" in inspect.signature(prepare_package).parameters
                    else {}
                )
                prepared = prepare_package(zip_path, Path(tmp) / "unpacked", **options)
            except (PackageError, zipfile.BadZipFile) as exc:
                raise PackageRefused(str(exc).replace(str(zip_path), filename), status=422) from None
            manifest = msgspec.to_builtins(prepared.manifest)
        digest = hashlib.sha256(data).hexdigest()
        with self.db.session() as s:
            existing = s.get(Package, digest)
            if existing is not None:
                return package_view(existing)
        stored = self.store.put_sync(data)
        if stored != digest:  # the store hashes what it uploaded; both must agree
            raise PackageRefused(f"{filename}: store digest {stored} differs from {digest}")
        signature = self.keys.sign(signing.package_statement(digest))
        with self.db.session() as s:
            package = Package(
                digest=digest,
                kind=manifest["package_type"],
                name=filename,
                size=len(data),
                signature=signature,
                manifest={k: v for k, v in manifest.items() if k != "files"},
            )
            s.add(package)
            return package_view(package)

    def packages(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [package_view(p) for p in s.scalars(select(Package).order_by(Package.created_at))]

    def package(self, digest: str) -> dict[str, Any]:
        with self.db.session() as s:
            package = s.get(Package, digest)
            if package is None:
                matches = list(s.scalars(select(Package).where(Package.digest.startswith(digest))))
                if len(matches) != 1:
                    raise PlatformError(f"no package {digest!r}", status=404)
                package = matches[0]
            return package_view(package)

    def package_bytes(self, digest: str) -> bytes:
        """The stored zip; bytes that no longer match the digest are refused, never served."""
        from unitedllm.errors import CommError, IntegrityError

        info = self.package(digest)
        try:
            return self.store.get_sync(info["digest"], info["size"])
        except IntegrityError as exc:
            raise PackageRefused(
                f"package {digest[:12]}: the stored bytes changed ({exc})", status=502
            ) from None
        except CommError as exc:
            raise PlatformError(f"package {digest[:12]}: the store failed: {exc}", status=502) from None


def package_view(package: Package) -> dict[str, Any]:
    return {
        "digest": package.digest,
        "kind": package.kind,
        "name": package.name,
        "size": package.size,
        "signature": package.signature,
        "entry_point": package.manifest.get("entry_point"),
        "unitedllm_version": package.manifest.get("unitedllm_version"),
        "created_at": package.created_at,
    }
