"""Query rows to sightings: one per device, merged over every row the device produced."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from alerter.model import Sighting

# Result columns by meaning, most specific first. Hunting queries mostly use the first names;
# the others cover raw (unsummarized) queries and Sentinel's naming.
DEVICE_ID_COLUMNS = ("DeviceId",)
DEVICE_NAME_COLUMNS = ("DeviceName", "Computer")
FIRST_SEEN_COLUMNS = ("FirstSeen", "StartTime", "Timestamp", "TimeGenerated")
LAST_SEEN_COLUMNS = ("LastSeen", "EndTime", "Timestamp", "TimeGenerated")
REPORT_COLUMNS = ("Report", "ReportIds", "ReportId")
COUNT_COLUMNS = ("Count", "count_")


_ZERO = timedelta(0)
_SURROGATE = re.compile("[\ud800-\udfff]")


class ResultShapeError(ValueError):
    """The query result has no column that identifies a device."""


@dataclass(frozen=True)
class _Columns:
    """Which result column plays which part, resolved once per batch (all its rows share columns)."""

    device_id: str | None
    device_name: str | None
    first_seen: str | None
    last_seen: str | None
    report: str | None
    count: str | None

    @classmethod
    def of(cls, row: Row) -> _Columns:
        def pick(names: tuple[str, ...]) -> str | None:
            return next((name for name in names if name in row), None)

        columns = cls(pick(DEVICE_ID_COLUMNS), pick(DEVICE_NAME_COLUMNS), pick(FIRST_SEEN_COLUMNS),
                      pick(LAST_SEEN_COLUMNS), pick(REPORT_COLUMNS), pick(COUNT_COLUMNS))
        if columns.device_id is None and columns.device_name is None:
            raise ResultShapeError(
                "the query result has neither a DeviceId nor a DeviceName column; "
                f"columns were: {', '.join(row)}"
            )
        return columns


def as_utc(value: Any) -> datetime | None:
    """Datetimes from any source as aware UTC; ISO strings (7 fractional digits too) accepted."""
    if isinstance(value, datetime) and value.tzinfo is not None and value.utcoffset() == _ZERO:
        return value if value.tzinfo is timezone.utc else value.replace(tzinfo=timezone.utc)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        # Kusto writes 7 fractional digits; Python reads at most 6.
        if "." in text:
            head, _, tail = text.partition(".")
            digits = "".join(ch for ch in tail if ch.isdigit())
            zone = tail[len(digits):]
            text = f"{head}.{digits[:6]}{zone}"
        value = datetime.fromisoformat(text)
    if not isinstance(value, datetime):
        raise ValueError(f"not a datetime: {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _report_ids(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        value = decoded
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def _union(existing: list[Any], more: Iterable[Any]) -> list[Any]:
    """Append the items not yet present, keeping order (report ids are ints or strings)."""
    for item in more:
        if item not in existing:
            existing.append(item)
    return existing


DEVICE_KEY_CHARS_MAX = 256
"""Keys are stored and compared everywhere; an endpoint's absurdly long name must not make one
that a store cannot hold. Longer keys keep their start and a digest of the whole."""


def device_key(device_id: str, device_name: str) -> str:
    """DeviceId when there is one; otherwise the lower-cased name (interfaces.md), bounded."""
    key = device_id if device_id else device_name.lower()
    if len(key) <= DEVICE_KEY_CHARS_MAX:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{key[: DEVICE_KEY_CHARS_MAX - len(digest) - 1]}~{digest}"


Row = Mapping[str, Any]


@dataclass
class Merged:
    sightings: list[Sighting]
    rows: int
    skipped: int = 0
    """Distinct devices in `skip` that the rows named (counted, not merged)."""


def merge_rows(batches: Iterable[tuple[str, Iterable[Row]]], skip: Collection[str] = frozenset()) -> Merged:
    """Merge rows into one sighting per device. Each batch is (source label, rows): a device
    seen in two workspaces is one sighting naming both. Devices whose key is in `skip` (already
    reported, nothing to send) are only counted."""
    by_key: dict[str, Sighting] = {}
    name_seen_at: dict[str, datetime | None] = {}
    skipped: set[str] = set()
    row_count = 0
    for source, rows in batches:
        columns: _Columns | None = None
        for row in rows:
            row_count += 1
            columns = columns or _Columns.of(row)
            _merge_row(row, columns, source, by_key, name_seen_at, skip, skipped)
    sightings = list(by_key.values())
    for sighting in sightings:
        try:
            sighting.report_ids.sort()
        except TypeError:
            pass
    return Merged(sightings, row_count, len(skipped))


def to_sightings(batches: Iterable[tuple[str, Iterable[Row]]]) -> tuple[list[Sighting], int]:
    """Every device's sighting and the row count."""
    merged = merge_rows(batches)
    return merged.sightings, merged.rows


def _cell(row: Row, column: str | None) -> Any:
    return row.get(column) if column is not None else None


def _text(value: Any) -> str:
    """A cell as text. Lone surrogates (invalid UTF-16 from an endpoint) become U+FFFD: they
    cannot be stored or sent as UTF-8."""
    text = str(value or "").strip()
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub("\ufffd", text)


def _merge_row(
    row: Row,
    columns: _Columns,
    source: str,
    by_key: dict[str, Sighting],
    name_seen_at: dict[str, datetime | None],
    skip: Collection[str],
    skipped: set[str],
) -> None:
    device_id = _text(_cell(row, columns.device_id))
    device_name = _text(_cell(row, columns.device_name))
    if not device_id and not device_name:
        return
    key = device_key(device_id, device_name)
    if key in skip:
        skipped.add(key)
        return
    try:
        first = as_utc(_cell(row, columns.first_seen))
        last = as_utc(_cell(row, columns.last_seen))
    except ValueError:
        raise ResultShapeError(
            f"column {columns.first_seen}/{columns.last_seen} holds a value that is not a time "
            f"(device {device_id or device_name!r})"
        ) from None
    try:
        count = int(_cell(row, columns.count) or 1)
    except (TypeError, ValueError):
        raise ResultShapeError(f"column {columns.count} holds a value that is not a number") from None
    reports = _report_ids(_cell(row, columns.report))
    sighting = by_key.get(key)
    if sighting is None:
        by_key[key] = Sighting(
            device_key=key,
            device_id=device_id,
            device_name=device_name,
            first_seen=first,
            last_seen=last,
            count=count,
            report_ids=_union([], reports),
            source=source,
            device_names=[device_name] if device_name else [],
        )
        name_seen_at[key] = last
        return
    sighting.count += count
    _union(sighting.report_ids, reports)
    if source not in sighting.source.split(", "):
        sighting.source = f"{sighting.source}, {source}"
    if device_name and device_name not in sighting.device_names:
        sighting.device_names.append(device_name)
    if first is not None and (sighting.first_seen is None or first < sighting.first_seen):
        sighting.first_seen = first
    if last is not None and (sighting.last_seen is None or last > sighting.last_seen):
        sighting.last_seen = last
    # The display name is the one from the most recent row: a renamed device shows its new name.
    latest = name_seen_at[key]
    if device_name and last is not None and (latest is None or last >= latest):
        sighting.device_name, name_seen_at[key] = device_name, last
