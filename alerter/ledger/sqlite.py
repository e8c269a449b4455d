"""STATE_STORE=sqlite: the embedded ledger for local runs, the demo and replays.

Atomicity comes from SQLite's write lock (`BEGIN IMMEDIATE`): a device is inserted and its
deliveries created in one transaction, and a claim is a conditional UPDATE, so two processes
sharing the file neither create a device twice nor send a delivery twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from alerter.ledger import (
    DeviceRecord,
    Failure,
    KnownDevice,
    LedgerError,
    iso,
    sighting_from_json,
    sighting_to_json,
)
from alerter.model import Delivery, DeliveryStatus, Sighting
from alerter.settings import Settings
from alerter.sightings import as_utc

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    detection_id TEXT NOT NULL,
    device_key TEXT NOT NULL,
    sighting TEXT NOT NULL,
    first_reported_at TEXT NOT NULL,
    PRIMARY KEY (detection_id, device_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    detection_id TEXT NOT NULL,
    device_key TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    sent_at TEXT,
    last_error TEXT NOT NULL DEFAULT '',
    lease_owner TEXT,
    lease_until REAL,
    PRIMARY KEY (detection_id, device_key, channel),
    FOREIGN KEY (detection_id, device_key) REFERENCES devices ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_status ON deliveries (channel, status, next_attempt_at);
"""

_DELIVERY_COLUMNS = (
    "v.detection_id, v.device_key, v.channel, v.status, v.attempts, v.created_at, v.next_attempt_at, "
    "v.sent_at, v.last_error, d.sighting"
)


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        detection_id=row["detection_id"],
        device_key=row["device_key"],
        channel=row["channel"],
        status=DeliveryStatus(row["status"]),
        sighting=sighting_from_json(row["sighting"]),
        attempts=row["attempts"],
        created_at=as_utc(row["created_at"]),
        next_attempt_at=as_utc(row["next_attempt_at"]),
        sent_at=as_utc(row["sent_at"]),
        last_error=row["last_error"],
    )


class SqliteStore:
    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        self.path = Path(settings.state_path)
        try:
            if read_only:
                target, uri = f"{self.path.resolve().as_uri()}?mode=ro", True
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                target, uri = str(self.path), False
            # Autocommit mode: every write below opens its own explicit transaction.
            self._db = sqlite3.connect(target, timeout=30, isolation_level=None, check_same_thread=False, uri=uri)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA synchronous = NORMAL")
        except (OSError, sqlite3.Error) as error:
            raise LedgerError(f"STATE_PATH {self.path}: cannot open the ledger ({error})") from None
        # One connection serves the run and its lease-renewing thread.
        self._lock = threading.RLock()
        if read_only:
            return
        with self._write() as db:  # waits for a concurrent run that is creating the schema
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        self._use_wal()

    def _use_wal(self) -> None:
        """WAL lets readers proceed while a run writes. The mode is stored in the file, so when a
        concurrent opener holds the lock, it is (being) set already and waiting is pointless."""
        try:
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._transaction() as db:
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            raise LedgerError(f"STATE_PATH {self.path}: {error}") from None

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise LedgerError(f"STATE_PATH {self.path}: {error}") from None

    def known(self, detection_id: str) -> dict[str, KnownDevice]:
        rows = self._read(
            "SELECT d.device_key, MAX(v.sent_at) AS last_sent, "
            "GROUP_CONCAT(CASE WHEN v.status = 'pending' THEN v.channel END) AS owed "
            "FROM devices d LEFT JOIN deliveries v USING (detection_id, device_key) "
            "WHERE d.detection_id = ? GROUP BY d.device_key",
            (detection_id,),
        )
        # Times were written by iso(): fromisoformat reads them back as aware datetimes, fast.
        parse = datetime.fromisoformat
        return {
            key: KnownDevice(key, parse(last_sent) if last_sent else None, frozenset((owed or "").split(",")) - {""})
            for key, last_sent, owed in rows
        }

    def add_new(
        self, detection_id: str, sightings: Sequence[Sighting], channels: Sequence[str], now: datetime
    ) -> list[str]:
        stamp = iso(now)
        with self._write() as db:
            # The write lock is held: what is absent now is ours to create.
            existing = {
                r[0]
                for r in db.execute("SELECT device_key FROM devices WHERE detection_id = ?", (detection_id,))
            }
            fresh = [s for s in sightings if s.device_key not in existing]
            db.executemany(
                "INSERT INTO devices (detection_id, device_key, sighting, first_reported_at) VALUES (?, ?, ?, ?)",
                [(detection_id, s.device_key, sighting_to_json(s), stamp) for s in fresh],
            )
            db.executemany(
                "INSERT INTO deliveries (detection_id, device_key, channel, status, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?)",
                [(detection_id, s.device_key, channel, stamp, stamp) for s in fresh for channel in channels],
            )
        return [s.device_key for s in fresh]

    def requeue(
        self,
        detection_id: str,
        sightings: Sequence[Sighting],
        channels: Sequence[str],
        now: datetime,
        *,
        sent_before: datetime | None = None,
    ) -> int:
        stamp = iso(now)
        with self._write() as db:
            if sent_before is not None:
                # Decided again under the write lock: a racing run may have re-alerted first.
                marks = ", ".join("?" * len(channels))
                eligible = {
                    r[0]
                    for r in db.execute(
                        "SELECT device_key FROM deliveries WHERE detection_id = ? GROUP BY device_key "
                        f"HAVING MAX(status = 'pending' AND channel IN ({marks})) = 0 "
                        "AND COALESCE(MAX(sent_at), '') <= ?",
                        (detection_id, *channels, iso(sent_before)),
                    )
                }
                sightings = [s for s in sightings if s.device_key in eligible]
            db.executemany(
                "UPDATE devices SET sighting = ? WHERE detection_id = ? AND device_key = ?",
                [(sighting_to_json(s), detection_id, s.device_key) for s in sightings],
            )
            db.executemany(
                "INSERT INTO deliveries (detection_id, device_key, channel, status, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?) ON CONFLICT DO UPDATE SET status = 'pending', attempts = 0, "
                "created_at = excluded.created_at, next_attempt_at = excluded.next_attempt_at, last_error = ''",
                [(detection_id, s.device_key, channel, stamp, stamp) for s in sightings for channel in channels],
            )
        return len(sightings)

    def due(self, channel: str, now: datetime) -> list[Delivery]:
        rows = self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries v JOIN devices d USING (detection_id, device_key) "
            "WHERE v.channel = ? AND v.status = 'pending' AND v.next_attempt_at <= ? "
            "AND (v.lease_until IS NULL OR v.lease_until < ?) ORDER BY v.detection_id, v.created_at, v.device_key",
            (channel, iso(now), time.time()),
        )
        return [_delivery(r) for r in rows]

    def claim(
        self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> list[Delivery]:
        wall = time.time()
        due_by = iso(now) if now is not None else None
        keys = [(d.detection_id, d.device_key, d.channel) for d in deliveries]
        with self._write() as db:
            db.executemany(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ? "
                "WHERE detection_id = ? AND device_key = ? AND channel = ? AND status = 'pending' "
                "AND (lease_until IS NULL OR lease_until < ?) AND (? IS NULL OR next_attempt_at <= ?)",
                [(owner, wall + lease_seconds, *key, wall, due_by, due_by) for key in keys],
            )
            held = {
                (r[0], r[1], r[2])
                for r in db.execute(
                    "SELECT detection_id, device_key, channel FROM deliveries WHERE lease_owner = ? AND lease_until > ?",
                    (owner, wall),
                )
            }
        return [d for d in deliveries if (d.detection_id, d.device_key, d.channel) in held]

    def renew(self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float) -> None:
        until = time.time() + lease_seconds
        with self._write() as db:
            db.executemany(
                "UPDATE deliveries SET lease_until = ? WHERE detection_id = ? AND device_key = ? AND channel = ? "
                "AND lease_owner = ? AND status = 'pending'",
                [(until, d.detection_id, d.device_key, d.channel, owner) for d in deliveries],
            )

    def mark_sent(self, deliveries: Sequence[Delivery], now: datetime) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE deliveries SET status = 'sent', sent_at = ?, attempts = attempts + 1, last_error = '', "
                "lease_owner = NULL, lease_until = NULL WHERE detection_id = ? AND device_key = ? AND channel = ?",
                [(iso(now), d.detection_id, d.device_key, d.channel) for d in deliveries],
            )

    def mark_failed(self, deliveries: Sequence[Delivery], failure: Failure, *, owner: str | None = None) -> int:
        gave_up = 0
        with self._write() as db:
            for d in deliveries:
                status, attempts, next_at = failure.next_state(d)
                cursor = db.execute(
                    "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                    "lease_owner = NULL, lease_until = NULL WHERE detection_id = ? AND device_key = ? AND channel = ? "
                    "AND status = 'pending' AND (? IS NULL OR lease_owner = ?)",
                    (status.value, attempts, iso(next_at), failure.error, d.detection_id, d.device_key, d.channel,
                     owner, owner),
                )
                gave_up += cursor.rowcount > 0 and status is DeliveryStatus.FAILED
        return gave_up

    def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for r in self._read("SELECT channel, status, COUNT(*) AS n FROM deliveries GROUP BY channel, status"):
            result.setdefault(r["channel"], {})[r["status"]] = r["n"]
        return result

    def records(self, detection_id: str | None = None) -> list[DeviceRecord]:
        where, params = ("WHERE detection_id = ?", (detection_id,)) if detection_id else ("", ())
        devices = self._read(
            f"SELECT detection_id, device_key, sighting, first_reported_at FROM devices {where} "
            "ORDER BY detection_id, first_reported_at, device_key",
            params,
        )
        deliveries: dict[tuple[str, str], list[Delivery]] = {}
        for row in self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries v JOIN devices d USING (detection_id, device_key) "
            + where.replace("detection_id", "v.detection_id")
            + " ORDER BY v.channel",
            params,
        ):
            deliveries.setdefault((row["detection_id"], row["device_key"]), []).append(_delivery(row))
        return [
            DeviceRecord(
                detection_id=r["detection_id"],
                sighting=sighting_from_json(r["sighting"]),
                first_reported_at=as_utc(r["first_reported_at"]),
                deliveries=deliveries.get((r["detection_id"], r["device_key"]), []),
            )
            for r in devices
        ]

    def forget(self, detection_id: str, device_key: str) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM devices WHERE detection_id = ? AND device_key = ?", (detection_id, device_key)
            )
        return cursor.rowcount > 0

    def retry_failed(self, now: datetime, channel: str | None = None) -> int:
        where, params = ("AND channel = ?", (channel,)) if channel else ("", ())
        with self._write() as db:
            cursor = db.execute(
                # Due from its creation time on; a failed one also gets a fresh give-up window.
                "UPDATE deliveries SET next_attempt_at = created_at, "
                "created_at = CASE WHEN status = 'failed' THEN ? ELSE created_at END, status = 'pending' "
                "WHERE (status = 'failed' OR (status = 'pending' AND (lease_until IS NULL OR lease_until < ?))) "
                f"{where}",
                (iso(now), time.time(), *params),
            )
        return cursor.rowcount

    def close(self) -> None:
        self._db.close()
