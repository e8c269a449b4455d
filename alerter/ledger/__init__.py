"""The delivery ledger: which devices were reported, and what is still owed to which channel.

One contract, several stores (SQLite embedded, Azure Table Storage), one shared test suite.
The ledger knows the sighting model; it never sends and never queries.

Clocks: times that describe the product's history (first reported, next attempt, sent) use the
run's clock, so a replay with --now is consistent. Claim leases protect live processes from each
other and use the wall clock (`time.time()`), whatever --now says.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from alerter.model import Delivery, DeliveryStatus, Link, Sighting
from alerter.settings import Settings
from alerter.sightings import as_utc

LEASE_SECONDS = 60.0
"""A claim lasts this long unless renewed; a run renews its claims while a send is under way."""
LEASE_RENEW_EVERY = LEASE_SECONDS / 3
MIN_ATTEMPTS_BEFORE_GIVING_UP = 2
"""A delivery that waited (app stopped, channel away) is not given up on its first failure."""
REPORT_IDS_KEPT = 200
"""The ledger keeps a device's first report ids, not thousands: the count says how many there were."""


class LedgerError(Exception):
    """The ledger cannot be read or written. A run that meets it sends nothing it cannot record."""


@dataclass(frozen=True)
class KnownDevice:
    device_key: str
    last_notified_at: datetime | None
    """The latest `sent_at` over its channels; re-alerting counts from here."""
    owed_channels: frozenset[str] = frozenset()
    """Channels with a delivery for it still pending: no re-alert is queued on top of those."""

    @property
    def owed(self) -> bool:
        return bool(self.owed_channels)


@dataclass
class DeviceRecord:
    """A device as `alerter state list` shows it."""

    detection_id: str
    sighting: Sighting
    first_reported_at: datetime | None
    deliveries: list[Delivery] = field(default_factory=list)


class Store(Protocol):
    def known(self, detection_id: str) -> dict[str, KnownDevice]:
        """Every device of the detection the ledger holds, read in one paged pass."""
        ...

    def add_new(
        self, detection_id: str, sightings: Sequence[Sighting], channels: Sequence[str], now: datetime
    ) -> list[str]:
        """Insert each device if absent, with a pending delivery per channel, atomically per device.
        Returns the keys this call created (a racing run that created one first wins it)."""
        ...

    def requeue(
        self,
        detection_id: str,
        sightings: Sequence[Sighting],
        channels: Sequence[str],
        now: datetime,
        *,
        sent_before: datetime | None = None,
    ) -> int:
        """Make a pending delivery per channel again (re-alert), refreshing the stored sighting.
        With `sent_before`, decided again under the store's own atomicity: only a device with no
        pending delivery on these channels whose last notification is not later than it, so two
        overlapping runs re-alert a device once. Returns how many devices were requeued."""
        ...

    def due(self, channel: str, now: datetime) -> list[Delivery]:
        """Pending deliveries of a channel whose next attempt time has come, unclaimed or with an
        expired claim, across detections."""
        ...

    def claim(
        self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> list[Delivery]:
        """Compare-and-set a lease on each pending, unleased delivery (and, given the run clock
        `now`, one whose next attempt time has come); returns the ones this owner now holds."""
        ...

    def renew(self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float) -> None:
        """Extend this owner's leases (a send is still under way); leases it lost stay lost."""
        ...

    def mark_sent(self, deliveries: Sequence[Delivery], now: datetime) -> None:
        """The channel answered 2xx: sent, whoever holds the lease now (a sent message is sent)."""
        ...

    def mark_failed(self, deliveries: Sequence[Delivery], failure: Failure, *, owner: str | None = None) -> int:
        """Record a failed attempt as `failure.next_state` decides. With `owner`, only deliveries
        that owner still holds: a run whose lease lapsed must not undo another run's success.
        Returns how many gave up."""
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """channel -> status -> number of deliveries."""
        ...

    def records(self, detection_id: str | None = None) -> list[DeviceRecord]: ...

    def forget(self, detection_id: str, device_key: str) -> bool:
        """Remove the device: it will be reported again when next seen."""
        ...

    def retry_failed(self, now: datetime, channel: str | None = None) -> int:
        """Make failed and backed-off pending deliveries due: their next attempt time becomes
        their creation time, so any later run (a replay with --now too) takes them. A failed one
        gets a fresh give-up window from `now`. A delivery a live run holds is left alone."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Failure:
    """One failed attempt to deliver, with the retry policy that decides what follows."""

    error: str
    """Already redacted: it is stored and shown."""
    at: datetime
    backoff_max: timedelta
    give_up_after: timedelta
    not_before: datetime | None = None
    """The channel's Retry-After: the next attempt is not earlier."""

    def next_state(self, delivery: Delivery) -> tuple[DeliveryStatus, int, datetime]:
        """Status, attempts and next attempt time after this failure."""
        attempts = delivery.attempts + 1
        status = DeliveryStatus.FAILED if gives_up(delivery, self.at, self.give_up_after) else DeliveryStatus.PENDING
        return status, attempts, next_attempt(attempts, self.at, self.backoff_max, self.not_before)


def next_attempt(attempts: int, now: datetime, backoff_max: timedelta, not_before: datetime | None = None) -> datetime:
    """Exponential backoff from one minute, capped: with a four-hour schedule every run retries,
    with a five-minute one a dead webhook is not hammered. Never before the channel's Retry-After."""
    at = now + min(timedelta(minutes=2 ** min(attempts - 1, 20)), backoff_max)
    return max(at, not_before) if not_before is not None else at


def gives_up(delivery: Delivery, now: datetime, give_up_after: timedelta) -> bool:
    """Whether the failed attempt being recorded now is the last: owed for long enough, and
    tried at least MIN_ATTEMPTS_BEFORE_GIVING_UP times (this attempt included)."""
    if delivery.attempts + 1 < MIN_ATTEMPTS_BEFORE_GIVING_UP or delivery.created_at is None:
        return False
    return now - delivery.created_at >= give_up_after


# Sightings are stored as JSON so a delivery can go out after the device left the query window.
def sighting_to_json(sighting: Sighting) -> str:
    data = asdict(sighting)
    data["report_ids"] = data["report_ids"][:REPORT_IDS_KEPT]
    for key in ("first_seen", "last_seen"):
        data[key] = data[key].isoformat() if data[key] else None
    return json.dumps(data, separators=(",", ":"), default=str)


def sighting_from_json(text: str) -> Sighting:
    data: dict[str, Any] = json.loads(text)
    data["first_seen"] = as_utc(data.get("first_seen"))
    data["last_seen"] = as_utc(data.get("last_seen"))
    data["links"] = [Link(**link) for link in data.get("links", [])]
    return Sighting(**data)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


STORES: dict[str, str] = {
    "sqlite": "alerter.ledger.sqlite:SqliteStore",
    "table": "alerter.ledger.table:TableStore",
}


def open_store(settings: Settings, *, read_only: bool = False) -> Store:
    """`read_only` (dry runs) creates nothing: no SQLite file or schema, no table."""
    module_name, _, class_name = STORES[settings.state_store].partition(":")
    store_class = getattr(importlib.import_module(module_name), class_name)
    return store_class(settings, read_only=read_only)
