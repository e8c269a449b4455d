"""The data that flows through one cycle. Plain dataclasses; imports nothing of the project."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class Detection:
    """One Sentinel-style hunting query, as loaded from a YAML file."""

    id: str
    name: str
    query: str
    path: str
    description: str = ""
    tactics: tuple[str, ...] = ()
    techniques: tuple[str, ...] = ()
    required_data_connectors: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Link:
    """An investigation link built from trusted parts (ids, the detection's own query)."""

    title: str
    url: str


@dataclass
class Sighting:
    """One device seen by one detection in one run, merged over all its result rows."""

    device_key: str
    device_id: str
    device_name: str
    first_seen: datetime | None
    last_seen: datetime | None
    count: int
    report_ids: list[Any]
    source: str
    device_names: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    realert: bool = False


class DeliveryStatus(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass
class Delivery:
    """The ledger's record of one sighting owed to one channel."""

    detection_id: str
    device_key: str
    channel: str
    status: DeliveryStatus
    sighting: Sighting
    attempts: int = 0
    created_at: datetime | None = None
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None
    last_error: str = ""


@dataclass(frozen=True)
class RunInfo:
    id: str
    at: datetime


@dataclass
class Message:
    """What one notifier call delivers: a chunk of one detection's due sightings."""

    detection: Detection
    run: RunInfo
    sightings: list[Sighting]
    total: int
    chunk_index: int = 1
    chunk_count: int = 1

    @property
    def realert_count(self) -> int:
        return sum(1 for s in self.sightings if s.realert)


@dataclass
class ChannelOutcome:
    sent: int = 0
    failed: int = 0
    gave_up: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class DetectionReport:
    """What happened to one detection in one run."""

    detection_id: str
    detection_name: str
    rows: int = 0
    devices: int = 0
    new: int = 0
    known: int = 0
    suppressed: int = 0
    realerts: int = 0
    query_error: str = ""
    incomplete: list[str] = field(default_factory=list)
    """Why the query result may be partial (partial error, row limit): rows are used, run exits 1."""
    channels: dict[str, ChannelOutcome] = field(default_factory=dict)

    def channel(self, name: str) -> ChannelOutcome:
        return self.channels.setdefault(name, ChannelOutcome())


@dataclass
class Digest:
    """The daily "still alive" message: what this run checked, also when nothing was new."""

    run: RunInfo
    detections: list[DetectionReport]
    pending: int
    failed: int

    @property
    def new_total(self) -> int:
        return sum(d.new + d.realerts for d in self.detections)


@dataclass
class RunReport:
    run: RunInfo
    dry_run: bool = False
    detections: list[DetectionReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Detection files that did not load, ledger errors: anything that makes the run fail."""
    pending_carried_over: int = 0
    failed_total: int = 0
    """Deliveries that gave up retrying (status failed) and are still unsent."""
    would_send: dict[str, list[Message]] = field(default_factory=dict)
    digest: Digest | None = None
    """Set when this run is the day's digest run (DIGEST_AT)."""
    seconds: float = 0.0
    """How long the cycle took (wall clock, without interpreter start-up)."""
    notes: list[str] = field(default_factory=list)
    """Things a person should know that do not fail the run."""

    @property
    def ok(self) -> bool:
        if self.problems or self.failed_total:
            return False
        for d in self.detections:
            if d.query_error or d.incomplete:
                return False
            if any(c.failed or c.gave_up for c in d.channels.values()):
                return False
        return True
