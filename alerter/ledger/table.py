"""STATE_STORE=table: the ledger in Azure Table Storage, the default in Azure.

Layout: one entity per device, PartitionKey = detection id, RowKey = device key (both escaped,
see `escape_key`). The entity holds the sighting (JSON, split over `sighting`, `sighting_2`, ...
when it is long), `first_reported`, and for each channel the fields `<channel>_status`,
`_attempts`, `_created`, `_next`, `_sent`, `_error`, `_lease_owner`, `_lease_until`. Two derived
properties, rewritten with every change, let the cheap reads select a few small columns:
`statuses` ("email=pending;webhook=sent") and `last_sent` (the latest `_sent`).

Races: a device is created with insert-if-absent (a 409 means another run has it); every other
change is a read-modify-write guarded by the entity's ETag (a 412 means another run changed it
first: read again and decide again). A claim is such a write, so two runs never both hold a
delivery. Writes go in entity-group transactions of at most 100 operations within one
partition; a transaction that fails rolls back as a whole and its operations are redone one by
one, so one conflicting entity never blocks the others.

Cost per run, N devices in a detection, M in the table:
- known(): one partition query selecting four small properties, about N / 1,000 requests;
- add_new(): N_new / 100 transactions (more only when one conflicts);
- counts(): a scan of the table selecting one property, about M / 1,000 requests;
- due(channel): a filtered scan of the whole table (no index on the status; a query that names
  no PartitionKey visits every partition), paged, returning only due entities;
- claim / mark_sent / mark_failed: one transaction per 100 deliveries, using the ETags due()
  just read.
`records`, `retry_failed` and `forget` serve the operator's `alerter state` and read more.

Errors from the service become LedgerError naming the setting and the endpoint's host, never
the connection string, a key or a token.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from hashlib import sha256
from typing import Any
from urllib.parse import urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from alerter.ledger import (
    DeviceRecord,
    Failure,
    KnownDevice,
    LedgerError,
    sighting_from_json,
    sighting_to_json,
)
from alerter.model import Delivery, DeliveryStatus, Sighting
from alerter.redact import Redactor
from alerter.settings import Settings

BATCH_MAX = 100
"""Operations per entity-group transaction: the service's limit."""
BATCH_BYTES_MAX = 3_500_000
"""A transaction's body may not exceed 4 MiB; stay below with a margin for the multipart framing."""
PAGE_SIZE = 1_000
"""Entities per query page: the service's maximum."""
KEY_BYTES_MAX = 1_024
"""PartitionKey and RowKey: at most 1 KiB, counted in UTF-16."""
KEY_PREFIX_UNITS = 200
"""A key too long for the limit keeps this much of its escaped text, then a hash."""
PART_CHARS = 32_000
"""A string property holds at most 64 KiB (32,768 UTF-16 units); the sighting JSON is ASCII."""
SIGHTING_CHARS_MAX = 400_000
"""An entity holds at most 1 MiB: a sighting larger than this (hostile names) is trimmed."""
ERROR_CHARS_MAX = 4_000
EDIT_ATTEMPTS = 20
"""How often one entity is re-read and re-decided when other runs keep changing it."""

SIGHTING, SIGHTING_PARTS, FIRST_REPORTED = "sighting", "sighting_parts", "first_reported"
STATUSES, LAST_SENT = "statuses", "last_sent"
DEVICE_KEY, DETECTION_ID = "device_key", "detection_id"
"""Stored only when the escaped key was too long for the RowKey / PartitionKey and was hashed."""
_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,39}$")
NO_LEASE_OWNER, NO_LEASE = "", 0.0
"""A merge cannot remove a property, so "no lease" is an empty owner and a zero expiry."""

# --- keys -------------------------------------------------------------------------------------

ESCAPE = "!"
HASHED = "!~"
"""Marks a key that was hashed: an escape is always followed by two hex digits or `u`, never `~`."""
_MUST_ESCAPE = re.compile(r"[/\\#?%'!\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNESCAPE = re.compile(r"!([0-9A-F]{2})|!u([0-9A-F]{4})")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"{ESCAPE}u{code:04X}" if code > 0xFF else f"{ESCAPE}{code:02X}"


def escape_key(text: str) -> str:
    """A Table key for any text, reversible and readable: `fin-ws/01` -> `fin-ws!2F01`.

    Table keys forbid `/ \\ # ?` and the control characters U+0000-001F and U+007F-009F; those
    are written `!XX` (hex), and so is `!` itself. `%` and `'` are escaped too: some service
    operations that put the key in the URL have failed on a `%`, and the emulator on quotes.
    Lone surrogates (which UTF-8 cannot carry) become `!uXXXX`. Everything else stays as it is.
    """
    return _MUST_ESCAPE.sub(_escape_one, text)


def unescape_key(key: str) -> str:
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), key)


def _utf16_bytes(text: str) -> int:
    return 2 * (len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF))


def table_key(text: str) -> tuple[str, bool]:
    """(key, hashed): the escaped text, or for text too long for a key, a readable prefix, the
    marker and a SHA-256 of the whole text. A hashed key cannot be reversed: the entity then
    stores the original in a property."""
    escaped = escape_key(text)
    if _utf16_bytes(escaped) <= KEY_BYTES_MAX:
        return escaped, False
    prefix = escape_key(text[:KEY_PREFIX_UNITS])[:KEY_PREFIX_UNITS]
    prefix = prefix[: prefix.rfind(ESCAPE)] if ESCAPE in prefix[-6:] else prefix  # no half escape
    digest = sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}{HASHED}{digest}", True


def _original(key: str, entity: dict[str, Any], prop: str) -> str:
    """The text a stored key stands for: unescaped, or for a hashed key, from its property."""
    if HASHED not in key:
        return unescape_key(key)
    try:
        return str(json.loads(entity.get(prop) or '""'))
    except ValueError:
        return str(entity.get(prop))


def _original_property(text: str) -> str:
    """A hashed key's original text, as JSON: ASCII, so even lone surrogates come back exactly.
    Device keys are bounded (alerter.sightings.DEVICE_KEY_CHARS_MAX) and detection ids are the
    operator's; one that still does not fit is refused loudly, never cut (a cut key is a lost one)."""
    encoded = json.dumps(text)
    if len(encoded) > PART_CHARS:
        raise LedgerError(f"a key of {len(text)} characters is too long to store (starts {text[:40]!r})")
    return encoded


# --- values -----------------------------------------------------------------------------------


def _utc(value: Any) -> datetime | None:
    """The SDK returns its own datetime subclass; the ledger hands out plain aware UTC datetimes."""
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    value = value.astimezone(timezone.utc)
    return datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                    value.microsecond, tzinfo=timezone.utc)


TRIM_STEPS = ((64, 4_096, 65_536), (16, 4_096, 65_536), (4, 4_096, 16_384), (1, 1_024, 4_096), (1, 256, 1_024))
"""(names kept, characters per kept name, characters of the display name and id) per step."""


def _fitted_sighting_json(sighting: Sighting) -> str:
    """The sighting as JSON that fits the entity. Names and ids come from endpoints: a hostile
    device can carry thousands of long names. Only those strings are shortened, step by step;
    the key (bounded), report ids (capped) and links (ours) are kept whole."""
    text = sighting_to_json(sighting)
    for names, name_chars, text_chars in TRIM_STEPS:
        if len(text) <= SIGHTING_CHARS_MAX:
            break
        text = sighting_to_json(replace(
            sighting,
            device_id=sighting.device_id[:text_chars],
            device_name=sighting.device_name[:text_chars],
            device_names=[name[:name_chars] for name in sighting.device_names[:names]],
        ))
    return text


def _sighting_properties(sighting: Sighting) -> dict[str, Any]:
    text = _fitted_sighting_json(sighting)
    parts = [text[i : i + PART_CHARS] for i in range(0, len(text), PART_CHARS)] or [""]
    props: dict[str, Any] = {SIGHTING: parts[0], SIGHTING_PARTS: len(parts)}
    for index, part in enumerate(parts[1:], start=2):
        props[f"{SIGHTING}_{index}"] = part
    return props


def _sighting(entity: dict[str, Any]) -> Sighting:
    parts = int(entity.get(SIGHTING_PARTS) or 1)
    text = str(entity.get(SIGHTING, "")) + "".join(str(entity.get(f"{SIGHTING}_{i}", "")) for i in range(2, parts + 1))
    return sighting_from_json(text)


def _safe_text(text: str, limit: int) -> str:
    """Storable text: bounded, and without lone surrogates (which the wire's UTF-8 cannot carry)."""
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


def _channel_of(prop: str) -> str | None:
    return prop[: -len("_status")] if prop.endswith("_status") else None


def _channels(entity: dict[str, Any]) -> list[str]:
    return sorted(c for c in map(_channel_of, entity) if c)


def _field(channel: str, name: str) -> str:
    return f"{channel}_{name}"


def _check_channel(channel: str) -> str:
    if not _CHANNEL_NAME.match(channel):
        raise ValueError(f"channel name {channel!r} cannot be a Table property prefix")
    return channel


def _parse_statuses(text: Any) -> dict[str, str]:
    pairs = (item.partition("=") for item in str(text or "").split(";") if item)
    return {channel: status for channel, _, status in pairs}


def _derived(entity: dict[str, Any]) -> dict[str, Any]:
    """The properties computed from the channels: what known() and counts() read."""
    statuses = {c: str(entity[_field(c, "status")]) for c in _channels(entity)}
    derived: dict[str, Any] = {STATUSES: ";".join(f"{c}={s}" for c, s in sorted(statuses.items()))}
    sent = [t for t in (_utc(entity.get(_field(c, "sent"))) for c in statuses) if t is not None]
    if sent:
        derived[LAST_SENT] = max(sent)
    return derived


def known_device(key: str, entity: dict[str, Any]) -> KnownDevice:
    """What known() tells of a device, from its summary properties alone."""
    statuses = _parse_statuses(entity.get(STATUSES))
    owed = frozenset(c for c, status in statuses.items() if status == DeliveryStatus.PENDING.value)
    return KnownDevice(key, _utc(entity.get(LAST_SENT)), owed)


def _pending_fields(channel: str, now: datetime) -> dict[str, Any]:
    return {
        _field(channel, "status"): DeliveryStatus.PENDING.value,
        _field(channel, "attempts"): 0,
        _field(channel, "created"): now,
        _field(channel, "next"): now,
        _field(channel, "error"): "",
        _field(channel, "lease_owner"): NO_LEASE_OWNER,
        _field(channel, "lease_until"): NO_LEASE,
    }


def _delivery(detection_id: str, device_key: str, channel: str, entity: dict[str, Any], sighting: Sighting) -> Delivery:
    return Delivery(
        detection_id=detection_id,
        device_key=device_key,
        channel=channel,
        status=DeliveryStatus(entity[_field(channel, "status")]),
        sighting=sighting,
        attempts=int(entity.get(_field(channel, "attempts")) or 0),
        created_at=_utc(entity.get(_field(channel, "created"))),
        next_attempt_at=_utc(entity.get(_field(channel, "next"))),
        sent_at=_utc(entity.get(_field(channel, "sent"))),
        last_error=str(entity.get(_field(channel, "error")) or ""),
    )


def _chunks(items: Sequence[Any], size_of: Callable[[Any], int] = lambda _: 0) -> Iterator[list[Any]]:
    """At most BATCH_MAX items and about BATCH_BYTES_MAX bytes per chunk."""
    chunk: list[Any] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if chunk and (len(chunk) >= BATCH_MAX or size + item_size > BATCH_BYTES_MAX):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


Key = tuple[str, str]
"""(PartitionKey, RowKey) as stored."""
Edit = Callable[[dict[str, Any]], Any]
"""Changes an entity in place (a copy) and returns what the caller wants to know about it."""


@dataclass
class _Cached:
    entity: dict[str, Any]
    etag: str


class TableStore:
    """The ledger in one table. With STATE_TABLE_ENDPOINT (or AzureWebJobsStorage__accountName)
    it signs in with DefaultAzureCredential (the Function App's managed identity), so the account
    can disable shared keys; otherwise it uses the STATE_CONNECTION / AzureWebJobsStorage
    connection string (`UseDevelopmentStorage=true` included). The table is created if missing."""

    page_size = PAGE_SIZE

    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        self.table_name = settings.state_table_name
        self.request_count = 0
        """HTTP requests sent (retries included): the benchmark and the tests read it."""
        self._cache: dict[Key, _Cached] = {}
        # Messages are built from parts and never hold the connection string; masking its key and
        # SAS token covers a service error that would quote one. The account and endpoint stay
        # readable: they are where to look, not secrets.
        self._redact = Redactor(_connection_secrets(settings.state_connection))
        options: dict[str, Any] = {
            "retry_total": settings.http_retries,
            "connection_timeout": settings.http_timeout,
            "read_timeout": settings.http_timeout,
            "raw_response_hook": self._count,
        }
        if settings.state_table_endpoint:
            from azure.identity import DefaultAzureCredential

            endpoint = settings.state_table_endpoint
            self.where = f"STATE_TABLE_ENDPOINT {_describe_endpoint(endpoint)}, table {self.table_name}"
            self._credential: Any = DefaultAzureCredential()
            service = TableServiceClient(endpoint=endpoint, credential=self._credential, **options)
        elif settings.state_connection:
            self._credential = None
            try:
                service = TableServiceClient.from_connection_string(settings.state_connection, **options)
            except (ValueError, TypeError, AzureError):
                raise LedgerError(
                    "STATE_CONNECTION (or AzureWebJobsStorage) is not a storage connection string "
                    "with a table endpoint"
                ) from None
            self.where = f"STATE_CONNECTION: Table Storage at {_describe_endpoint(service.url)}, table {self.table_name}"
        else:
            raise LedgerError("STATE_STORE is table, but neither STATE_CONNECTION nor STATE_TABLE_ENDPOINT is set")
        self._service = service
        self._table: TableClient = service.get_table_client(self.table_name)
        # The lease-renewing thread and the run share the entity cache.
        self._lock = threading.RLock()
        self.read_only = read_only
        if read_only:
            return  # a dry run creates nothing; a missing table reads as an empty ledger
        try:
            with self._calling("create the table"):
                try:
                    self._service.create_table(self.table_name)
                except ResourceExistsError:
                    pass
        except LedgerError:
            self.close()
            raise

    # --- plumbing ------------------------------------------------------------------------------

    def _count(self, response: Any) -> None:
        self.request_count += 1

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except LedgerError:
            raise
        except ClientAuthenticationError as error:
            if error.response is None:  # raised by the credential: no token to send
                reason = f"no token from DefaultAzureCredential ({type(error).__name__})"
            else:
                code = f" {error.error_code}" if getattr(error, "error_code", None) else ""
                reason = f"not authorized (HTTP {error.status_code}{code})"
            raise LedgerError(self._message(what, reason)) from None
        except HttpResponseError as error:
            code = f" {error.error_code}" if getattr(error, "error_code", None) else ""
            hint = ""
            if error.status_code == 403 and self._credential is not None:
                hint = "; the identity needs the Storage Table Data Contributor role on the account"
            raise LedgerError(self._message(what, f"HTTP {error.status_code}{code}{hint}")) from None
        except ServiceRequestError:
            raise LedgerError(self._message(what, "cannot connect")) from None
        except ServiceResponseError:
            raise LedgerError(self._message(what, "the connection broke before an answer")) from None
        except AzureError as error:
            raise LedgerError(self._message(what, type(error).__name__)) from None

    def _message(self, what: str, reason: str) -> str:
        return self._redact(f"{self.where}: cannot {what}: {reason}")

    def _query(self, what: str, query_filter: str | None, parameters: dict[str, Any] | None = None,
               select: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every entity matching, page by page (an empty filter reads the whole table)."""
        with self._calling(what):
            if query_filter:
                pages = self._table.query_entities(
                    query_filter, parameters=parameters, select=select, results_per_page=self.page_size
                )
            else:
                pages = self._table.list_entities(select=select, results_per_page=self.page_size)
            try:
                for entity in pages:
                    etag = (entity.metadata or {}).get("etag")
                    item = dict(entity)
                    if etag:
                        item["__etag"] = etag
                    yield item
            except ResourceNotFoundError:
                if not self.read_only:
                    raise
                # A dry run before the first real run: no table yet, so nothing is known.

    def _remember(self, entity: dict[str, Any]) -> dict[str, Any]:
        """Keep a full entity and its ETag so the next change can be a batched conditional write."""
        etag = entity.pop("__etag", None)
        if etag:
            self._cache[(entity["PartitionKey"], entity["RowKey"])] = _Cached(entity, etag)
        return entity

    def _get(self, key: Key) -> _Cached | None:
        with self._calling("read an entity"):
            try:
                entity = self._table.get_entity(*key)
            except ResourceNotFoundError:
                self._cache.pop(key, None)
                return None
        cached = _Cached(dict(entity), entity.metadata["etag"])
        self._cache[key] = cached
        return cached

    @staticmethod
    def _keys(detection_id: str, device_key: str) -> Key:
        return table_key(detection_id)[0], table_key(device_key)[0]

    def _writable(self) -> None:
        if self.read_only:
            raise LedgerError(self._message("write", "the ledger was opened read-only (a dry run)"))

    def _edit(self, edits: dict[Key, list[Edit]]) -> dict[Key, list[Any] | None]:
        self._writable()
        with self._lock:
            return self._edit_unlocked(edits)

    def _edit_unlocked(self, edits: dict[Key, list[Edit]]) -> dict[Key, list[Any] | None]:
        """Apply the edits to each entity with ETag-conditional merges. From cached copies the
        writes go in transactions; when one fails (another run changed an entity, or one is
        gone) each of its entities is read again, decided again and written alone, until its
        ETag holds. Returns each edit's outcome, or None for an entity that does not exist."""
        outcomes: dict[Key, list[Any] | None] = {}
        alone: list[Key] = []
        by_partition: dict[str, list[Key]] = {}
        for key in edits:
            (by_partition.setdefault(key[0], []) if key in self._cache else alone).append(key)
        for keys in by_partition.values():
            planned: list[tuple[Key, dict[str, Any], dict[str, Any], str]] = []
            for key in keys:
                cached = self._cache[key]
                updated = dict(cached.entity)
                outcomes[key] = [edit(updated) for edit in edits[key]]
                patch = _patch(cached.entity, updated)
                updated.update(patch)  # the derived properties too, so the cache stays true
                if patch:
                    planned.append((key, updated, {"PartitionKey": key[0], "RowKey": key[1], **patch}, cached.etag))
            for chunk in _chunks(planned, lambda item: _wire_size(item[2])):
                operations = [
                    ("update", patch, {"mode": UpdateMode.MERGE, "etag": etag,
                                       "match_condition": MatchConditions.IfNotModified})
                    for _, _, patch, etag in chunk
                ]
                with self._calling("write a transaction"):
                    try:
                        answers = self._table.submit_transaction(operations)
                    except TableTransactionError:
                        alone.extend(key for key, *_ in chunk)
                        continue
                for (key, updated, _, _), answer in zip(chunk, answers):
                    self._cache[key] = _Cached(updated, answer["etag"])
        for key in alone:
            outcomes[key] = self._edit_alone(key, edits[key])
        return outcomes

    def _edit_alone(self, key: Key, edits: list[Edit]) -> list[Any] | None:
        for _ in range(EDIT_ATTEMPTS):
            cached = self._get(key)
            if cached is None:
                return None
            updated = dict(cached.entity)
            results = [edit(updated) for edit in edits]
            patch = _patch(cached.entity, updated)
            updated.update(patch)
            if not patch:
                return results
            with self._calling("write an entity"):
                try:
                    answer = self._table.update_entity(
                        {"PartitionKey": key[0], "RowKey": key[1], **patch}, mode=UpdateMode.MERGE,
                        etag=cached.etag, match_condition=MatchConditions.IfNotModified,
                    )
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue  # changed or removed since the read: read again, decide again
                except HttpResponseError as error:
                    if error.status_code not in (404, 412):
                        raise
                    continue
            self._cache[key] = _Cached(updated, answer["etag"])
            return results
        raise LedgerError(self._message("write an entity", f"it kept changing under {EDIT_ATTEMPTS} attempts"))

    def _by_entity(self, deliveries: Iterable[Delivery], edit_for: Callable[[Delivery], Edit]) -> dict[Key, list[Edit]]:
        edits: dict[Key, list[Edit]] = {}
        for d in deliveries:
            edits.setdefault(self._keys(d.detection_id, d.device_key), []).append(edit_for(d))
        return edits

    # --- the Store protocol --------------------------------------------------------------------

    def known(self, detection_id: str) -> dict[str, KnownDevice]:
        partition, _ = table_key(detection_id)
        result: dict[str, KnownDevice] = {}
        for entity in self._query(
            "read the known devices", "PartitionKey eq @pk", {"pk": partition},
            select=["RowKey", STATUSES, LAST_SENT, DEVICE_KEY],
        ):
            key = _original(entity["RowKey"], entity, DEVICE_KEY)
            result[key] = known_device(key, entity)
        return result

    def add_new(
        self, detection_id: str, sightings: Sequence[Sighting], channels: Sequence[str], now: datetime
    ) -> list[str]:
        self._writable()
        partition, partition_hashed = table_key(detection_id)
        entities: dict[str, dict[str, Any]] = {}
        for sighting in sightings:
            row, row_hashed = table_key(sighting.device_key)
            if row in entities:
                continue
            entity: dict[str, Any] = {"PartitionKey": partition, "RowKey": row, FIRST_REPORTED: now,
                                      **_sighting_properties(sighting)}
            if row_hashed:
                entity[DEVICE_KEY] = _original_property(sighting.device_key)
            if partition_hashed:
                entity[DETECTION_ID] = _original_property(detection_id)
            for channel in channels:
                entity.update(_pending_fields(_check_channel(channel), now))
            entity.update(_derived(entity))
            entities[row] = entity
        created: set[str] = set()
        for chunk in _chunks(list(entities.values()), _wire_size):
            with self._calling("record new devices"):
                try:
                    self._table.submit_transaction([("create", entity) for entity in chunk])
                    created.update(entity["RowKey"] for entity in chunk)
                    continue
                except TableTransactionError:
                    pass  # rolled back as a whole: someone has one of them; create them one by one
                for entity in chunk:
                    try:
                        self._table.create_entity(entity)
                    except ResourceExistsError:
                        continue  # a racing run created it first: it is theirs to report
                    created.add(entity["RowKey"])
        keys = dict.fromkeys(s.device_key for s in sightings)
        return [key for key in keys if table_key(key)[0] in created]

    def requeue(
        self,
        detection_id: str,
        sightings: Sequence[Sighting],
        channels: Sequence[str],
        now: datetime,
        *,
        sent_before: datetime | None = None,
    ) -> int:
        for channel in channels:
            _check_channel(channel)

        def edit_for(sighting: Sighting) -> Edit:
            def edit(entity: dict[str, Any]) -> bool:
                if sent_before is not None:
                    # Decided again on the entity the ETag guards: a racing run may have re-alerted.
                    statuses = _parse_statuses(entity.get(STATUSES))
                    last_sent = _utc(entity.get(LAST_SENT))
                    owed = any(statuses.get(c) == DeliveryStatus.PENDING.value for c in channels)
                    if owed or (last_sent is not None and last_sent > sent_before):
                        return False
                entity.update(_sighting_properties(sighting))
                for channel in channels:
                    entity.update(_pending_fields(channel, now))  # `_sent` stays: re-alerts count from it
                return True

            return edit

        edits: dict[Key, list[Edit]] = {}
        for sighting in sightings:
            edits.setdefault(self._keys(detection_id, sighting.device_key), []).append(edit_for(sighting))
        self._prefetch(list(edits))
        return sum(bool(results and results[0]) for results in self._edit(edits).values())

    def _prefetch(self, keys: list[Key]) -> None:
        """Cache the entities about to change: one partition query when there are many of them
        (a re-alert of thousands of devices), else nothing (each is read on its own)."""
        missing = [key for key in keys if key not in self._cache]
        partitions = {key[0] for key in missing}
        if len(missing) < 50:
            return
        wanted = set(missing)
        for partition in partitions:
            for entity in self._query("read devices", "PartitionKey eq @pk", {"pk": partition}):
                if (entity["PartitionKey"], entity["RowKey"]) in wanted:
                    self._remember(entity)

    def due(self, channel: str, now: datetime) -> list[Delivery]:
        channel = _check_channel(channel)
        wall = time.time()
        found = []
        for entity in self._query(
            f"read the deliveries due for {channel}",
            f"{_field(channel, 'status')} eq 'pending' and {_field(channel, 'next')} le @now",
            {"now": now},
        ):
            self._remember(entity)
            if float(entity.get(_field(channel, "lease_until")) or 0) >= wall:
                continue  # claimed by a live run
            detection_id = _original(entity["PartitionKey"], entity, DETECTION_ID)
            device_key = _original(entity["RowKey"], entity, DEVICE_KEY)
            found.append(_delivery(detection_id, device_key, channel, entity, _sighting(entity)))
        found.sort(key=lambda d: (d.detection_id, d.created_at or now, d.device_key))
        return found

    def claim(
        self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> list[Delivery]:
        wall = time.time()

        def edit_for(d: Delivery) -> Edit:
            status, lease_owner, lease_until, next_at = (
                _field(d.channel, "status"), _field(d.channel, "lease_owner"), _field(d.channel, "lease_until"),
                _field(d.channel, "next"),
            )

            def edit(entity: dict[str, Any]) -> bool:
                if status not in entity:
                    return False
                until = float(entity.get(lease_until) or 0)
                backed_off = now is not None and (_utc(entity.get(next_at)) or now) > now
                if entity[status] == DeliveryStatus.PENDING.value and until < wall and not backed_off:
                    entity[lease_owner], entity[lease_until] = owner, wall + lease_seconds
                    return True
                return entity.get(lease_owner) == owner and until > wall

            return edit

        outcomes = self._edit(self._by_entity(deliveries, edit_for))
        # Outcomes come in the order the edits were listed: per entity, in the deliveries' order.
        position: dict[Key, int] = {}
        held = []
        for d in deliveries:
            key = self._keys(d.detection_id, d.device_key)
            index = position[key] = position.get(key, -1) + 1
            results = outcomes.get(key)
            if results is not None and results[index]:
                held.append(d)
        return held

    def renew(self, deliveries: Sequence[Delivery], owner: str, lease_seconds: float) -> None:
        until = time.time() + lease_seconds

        def edit_for(d: Delivery) -> Edit:
            def edit(entity: dict[str, Any]) -> None:
                if (entity.get(_field(d.channel, "lease_owner")) == owner
                        and entity.get(_field(d.channel, "status")) == DeliveryStatus.PENDING.value):
                    entity[_field(d.channel, "lease_until")] = until

            return edit

        self._edit(self._by_entity(deliveries, edit_for))

    def mark_sent(self, deliveries: Sequence[Delivery], now: datetime) -> None:
        def edit_for(d: Delivery) -> Edit:
            def edit(entity: dict[str, Any]) -> None:
                if _field(d.channel, "status") not in entity:
                    return
                entity.update({
                    _field(d.channel, "status"): DeliveryStatus.SENT.value,
                    _field(d.channel, "sent"): now,
                    _field(d.channel, "attempts"): int(entity.get(_field(d.channel, "attempts")) or 0) + 1,
                    _field(d.channel, "error"): "",
                    _field(d.channel, "lease_owner"): NO_LEASE_OWNER,
                    _field(d.channel, "lease_until"): NO_LEASE,
                })

            return edit

        self._edit(self._by_entity(deliveries, edit_for))

    def mark_failed(self, deliveries: Sequence[Delivery], failure: Failure, *, owner: str | None = None) -> int:
        text = _safe_text(failure.error, ERROR_CHARS_MAX)

        def edit_for(d: Delivery) -> Edit:
            status, attempts, next_at = failure.next_state(d)

            def edit(entity: dict[str, Any]) -> bool:
                if entity.get(_field(d.channel, "status")) != DeliveryStatus.PENDING.value:
                    return False  # sent or given up meanwhile (by another run): keep that
                if owner is not None and entity.get(_field(d.channel, "lease_owner")) != owner:
                    return False  # our lease lapsed and another run holds it now
                entity.update({
                    _field(d.channel, "status"): status.value,
                    _field(d.channel, "attempts"): attempts,
                    _field(d.channel, "next"): next_at,
                    _field(d.channel, "error"): text,
                    _field(d.channel, "lease_owner"): NO_LEASE_OWNER,
                    _field(d.channel, "lease_until"): NO_LEASE,
                })
                return status is DeliveryStatus.FAILED

            return edit

        outcomes = self._edit(self._by_entity(deliveries, edit_for))
        return sum(sum(bool(r) for r in results) for results in outcomes.values() if results)

    def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for entity in self._query("count the deliveries", None, select=[STATUSES]):
            for channel, status in _parse_statuses(entity.get(STATUSES)).items():
                by_status = result.setdefault(channel, {})
                by_status[status] = by_status.get(status, 0) + 1
        return result

    def records(self, detection_id: str | None = None) -> list[DeviceRecord]:
        if detection_id is None:
            entities = self._query("read the ledger", None)
        else:
            entities = self._query("read the ledger", "PartitionKey eq @pk", {"pk": table_key(detection_id)[0]})
        records = []
        for entity in entities:
            self._remember(entity)
            sighting = _sighting(entity)
            detection = _original(entity["PartitionKey"], entity, DETECTION_ID)
            device_key = _original(entity["RowKey"], entity, DEVICE_KEY)
            records.append(DeviceRecord(
                detection_id=detection,
                sighting=sighting,
                first_reported_at=_utc(entity.get(FIRST_REPORTED)),
                deliveries=[_delivery(detection, device_key, c, entity, sighting) for c in _channels(entity)],
            ))
        far = datetime.max.replace(tzinfo=timezone.utc)
        records.sort(key=lambda r: (r.detection_id, r.first_reported_at or far, r.sighting.device_key))
        return records

    def forget(self, detection_id: str, device_key: str) -> bool:
        self._writable()
        key = self._keys(detection_id, device_key)
        if self._get(key) is None:
            return False
        with self._calling("forget a device"):
            self._table.delete_entity(*key)
        self._cache.pop(key, None)
        return True

    def retry_failed(self, now: datetime, channel: str | None = None) -> int:
        if channel is not None:
            _check_channel(channel)
            status = _field(channel, "status")
            query = f"{status} eq 'failed' or {status} eq 'pending'"
        else:
            query = None
        changed = 0
        edits: dict[Key, list[Edit]] = {}

        wall = time.time()

        def edit(entity: dict[str, Any]) -> int:
            count = 0
            for c in [channel] if channel else _channels(entity):
                was = entity.get(_field(c, "status"))
                if was == DeliveryStatus.PENDING.value and float(entity.get(_field(c, "lease_until")) or 0) >= wall:
                    continue  # a live run holds it and may be sending it right now
                if was not in (DeliveryStatus.FAILED.value, DeliveryStatus.PENDING.value):
                    continue
                count += 1
                entity.update({
                    _field(c, "status"): DeliveryStatus.PENDING.value,
                    _field(c, "next"): entity.get(_field(c, "created")) or now,  # due for any later run
                })
                if was == DeliveryStatus.FAILED.value:
                    entity[_field(c, "created")] = now  # a fresh give-up window
            return count

        for entity in self._query("read the deliveries to retry", query):
            self._remember(entity)
            edits[(entity["PartitionKey"], entity["RowKey"])] = [edit]
        for results in self._edit(edits).values():
            changed += sum(results or [])
        return changed

    def close(self) -> None:
        self._cache.clear()
        self._table.close()
        self._service.close()
        if self._credential is not None:
            self._credential.close()


def _patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The properties an edit changed, plus the derived ones when a channel changed."""
    patch = {k: v for k, v in after.items() if k not in ("PartitionKey", "RowKey") and before.get(k, _MISSING) != v}
    if patch:
        derived = _derived(after)
        patch.update({k: v for k, v in derived.items() if before.get(k, _MISSING) != v})
    return patch


_MISSING = object()


def _wire_size(entity: dict[str, Any]) -> int:
    """About the bytes an entity takes in a transaction's body."""
    return len(json.dumps(entity, default=str)) + 200


def _describe_endpoint(url: str) -> str:
    """Scheme, host, port and path: never a query string (a SAS token lives there)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}".rstrip("/")
    except ValueError:
        return "<unparseable endpoint>"


def _connection_secrets(connection: str | None) -> list[str]:
    """AccountKey and SharedAccessSignature values: masked wherever they might surface."""
    if not connection:
        return []
    found = []
    for item in connection.split(";"):
        name, _, value = item.partition("=")
        if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
            found.append(value.strip())
    return found
