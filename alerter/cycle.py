"""One cycle: query every enabled detection, record new devices, deliver everything due.

This is the one place that wires the stages together; each stage is picked from its registry by
setting value. Order matters for "loses no data": a device's pending deliveries are written to
the ledger before anything is sent, and a delivery is marked sent only after a 2xx.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from itertools import groupby

from alerter.detections import load_detections
from alerter.digest import digest_due
from alerter.ledger import LEASE_RENEW_EVERY, LEASE_SECONDS, Failure, KnownDevice, LedgerError, Store, open_store
from alerter.model import (
    Delivery,
    DeliveryStatus,
    Detection,
    Digest,
    DetectionReport,
    Message,
    RunInfo,
    RunReport,
    Sighting,
)
from alerter.settings import Settings
from alerter.sightings import ResultShapeError, merge_rows
from alerter.sources import QueryError, Source, create_source
from alerter.suppressions import Suppressions, load_suppressions
from notifiers import DeliveryError, Notifier, available_channels, create_notifier

log = logging.getLogger("alerter")


@dataclass
class _Planned:
    message: Message
    deliveries: list[Delivery] = field(default_factory=list)


def plan_messages(
    deliveries: Sequence[Delivery], chunk_size: int, detections: dict[str, Detection], run: RunInfo
) -> list[_Planned]:
    """Group due deliveries into messages: one detection per message, at most chunk_size each."""
    planned: list[_Planned] = []
    ordered = sorted(deliveries, key=lambda d: d.detection_id)
    for detection_id, group in groupby(ordered, key=lambda d: d.detection_id):
        items = list(group)
        detection = detections.get(detection_id) or orphan_detection(detection_id)
        chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
        for index, chunk in enumerate(chunks, start=1):
            message = Message(
                detection=detection,
                run=run,
                sightings=[d.sighting for d in chunk],
                total=len(items),
                chunk_index=index,
                chunk_count=len(chunks),
            )
            planned.append(_Planned(message, chunk))
    return planned


def orphan_detection(detection_id: str) -> Detection:
    """A delivery owed for a detection whose file is gone or broken still goes out."""
    return Detection(id=detection_id, name=f"Detection {detection_id}", query="", path="")


def _pending(detection_id: str, sighting: Sighting, channel: str, now: datetime) -> Delivery:
    return Delivery(detection_id, sighting.device_key, channel, DeliveryStatus.PENDING, sighting, created_at=now)


class Cycle:
    def __init__(
        self, settings: Settings, *, now: datetime | None = None, dry_run: bool = False, preview: bool = False
    ) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.preview = preview or dry_run
        self.record = not dry_run
        """Whether this run writes to the ledger (and so may send)."""
        clock = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
        self.report = RunReport(run=RunInfo(id=str(uuid.uuid4()), at=clock), dry_run=dry_run)
        self.started = time.monotonic()
        self.detections: dict[str, Detection] = {}
        self.created_this_run: set[tuple[str, str]] = set()
        self._notifiers: dict[str, Notifier] = {}

    @property
    def now(self) -> datetime:
        return self.report.run.at

    def run(self) -> RunReport:
        report = self.report
        log.info("run %s at %s%s", report.run.id, self.now.isoformat(), " (dry run)" if self.dry_run else "")
        loaded = load_detections(self.settings.detections_path, self.settings.detections)
        for problem in loaded.problems:
            log.error("detection problem: %s", problem)
            report.problems.append(str(problem))
        self.detections = {d.id: d for d in loaded.detections}
        self._all_detections: dict[str, Detection] | None = None
        if not self.settings.channels and not self.dry_run:
            if self.preview:
                report.notes.append(
                    "No delivery channel is configured (WEBHOOK_URL, TEAMS_WEBHOOK_URL, EMAIL_TO): new devices "
                    "are recorded as reported and shown in the preview only"
                )
            else:
                # Recording devices that go nowhere would use them up for good: a channel set
                # later does not replay history. So record nothing, and fail loudly.
                self.record = False
                report.problems.append(
                    "No delivery channel is configured (WEBHOOK_URL, TEAMS_WEBHOOK_URL or EMAIL_TO): "
                    "nothing was recorded, so nothing is lost until one is set"
                )
        try:
            suppressions = load_suppressions(self.settings.suppressions_path)
        except ValueError as error:
            log.error("%s", error)
            report.problems.append(str(error))
            suppressions = Suppressions()

        try:
            store = self._open_store()
        except LedgerError as error:
            log.error("ledger: %s", error)
            report.problems.append(f"ledger: {error}")
            return report
        try:
            self._query_all(loaded.detections, suppressions, store)
            self._deliver_all(store)
            self._digest(store)
        except LedgerError as error:
            # What was sent and not yet marked goes out again next run: at-least-once, never lost.
            log.error("ledger: %s", error)
            report.problems.append(f"ledger: {error}")
        finally:
            if store is not None:
                store.close()
            for notifier in self._notifiers.values():
                notifier.close()
            report.seconds = time.monotonic() - self.started
        return report

    def _notifier(self, channel: str) -> Notifier:
        """One notifier per channel per run: a channel's rate limit (Teams: 4 a second) then
        spans all its messages and the digest."""
        if channel not in self._notifiers:
            self._notifiers[channel] = create_notifier(channel, self.settings)
        return self._notifiers[channel]

    def _open_store(self) -> Store | None:
        if not self.record and self.settings.state_store == "sqlite" and not self.settings.state_path.exists():
            return None  # nothing known yet, and a run that records nothing creates no ledger file
        return open_store(self.settings, read_only=not self.record)

    # --- query stage -------------------------------------------------------------------------

    def _query_all(self, detections: list[Detection], suppressions: Suppressions, store: Store | None) -> None:
        if not detections:
            return
        try:
            source = create_source(self.settings)
        except QueryError as error:
            for detection in detections:
                self.report.detections.append(
                    DetectionReport(detection.id, detection.name, query_error=str(error))
                )
            log.error("source: %s", error)
            return
        try:
            for detection in detections:
                try:
                    report = self._query_one(detection, source, suppressions, store)
                except LedgerError:
                    raise
                except Exception as error:  # one detection's surprise never stops the others
                    text = self.settings.redactor()(f"{type(error).__name__}: {error}")
                    log.exception("detection %s (%s): failed unexpectedly", detection.name, detection.path)
                    report = DetectionReport(detection.id, detection.name, query_error=f"unexpected error: {text}")
                self.report.detections.append(report)
        finally:
            source.close()

    def _query_one(
        self, detection: Detection, source: Source, suppressions: Suppressions, store: Store | None
    ) -> DetectionReport:
        dr = DetectionReport(detection.id, detection.name)
        known = store.known(detection.id) if store else {}
        realert_due = {key for key, record in known.items() if self._realert_due(record)}
        try:
            result = source.query(detection, self.now)
            # A known device that is not due for a re-alert costs a set lookup and nothing more:
            # the steady state does no work per reported device.
            merged = merge_rows(result.batches, skip=known.keys() - realert_due)
        except (QueryError, ResultShapeError) as error:
            dr.query_error = str(error)
            log.error("detection %s (%s): query failed: %s", detection.name, detection.path, error)
            return dr
        dr.rows = merged.rows
        dr.incomplete = list(result.incomplete)
        for reason in dr.incomplete:
            log.error("detection %s: result may be incomplete: %s", detection.name, reason)
        dr.devices = len(merged.sightings) + merged.skipped

        active = []
        for sighting in merged.sightings:
            if suppressions.match(detection, sighting, self.now):
                dr.suppressed += 1
            else:
                sighting.links = source.links(detection, sighting.device_id)
                active.append(sighting)
        new = [s for s in active if s.device_key not in known]
        realerts = [replace(s, realert=True) for s in active if s.device_key in realert_due]
        dr.known = merged.skipped + len(active) - len(new)
        channels = self.settings.channels
        if not self.record or store is None:
            dr.new, dr.realerts = len(new), len(realerts)
        else:
            created = store.add_new(detection.id, new, channels, self.now) if new else []
            dr.new = len(created)
            self.created_this_run.update((detection.id, key) for key in created)
            if realerts and channels:
                assert self.settings.realert_after is not None  # realerts come only from it
                dr.realerts = store.requeue(
                    detection.id, realerts, channels, self.now, sent_before=self.now - self.settings.realert_after
                )
                self.created_this_run.update((detection.id, s.device_key) for s in realerts)
        if self.preview:
            self._would_send_new(detection, new + realerts)
        log.info(
            "detection %s: %d rows, %d devices, %d new, %d already reported, %d suppressed, %d re-alerts",
            detection.name, dr.rows, dr.devices, dr.new, dr.known, dr.suppressed, dr.realerts,
        )
        return dr

    def _realert_due(self, record: KnownDevice) -> bool:
        """Reported, nothing owed on a configured channel, last notified at least REALERT_AFTER ago.
        (A delivery left pending for a channel since removed does not hold re-alerts back.)"""
        after = self.settings.realert_after
        if after is None or record.last_notified_at is None:
            return False
        if record.owed_channels & set(self.settings.channels):
            return False
        return self.now - record.last_notified_at >= after

    def _would_send_new(self, detection: Detection, sightings: list[Sighting]) -> None:
        for channel in self.settings.channels or available_channels():
            pending = [_pending(detection.id, s, channel, self.now) for s in sightings]
            self.report.would_send.setdefault(channel, []).extend(
                p.message for p in plan_messages(pending, self._chunk_size(channel), self.detections, self.report.run)
            )

    def _chunk_size(self, channel: str) -> int:
        return self._notifier(channel).chunk_size

    # --- delivery stage ----------------------------------------------------------------------

    def _deliver_all(self, store: Store | None) -> None:
        if store is None:
            return
        counts = store.counts()
        for channel, statuses in counts.items():
            if channel not in self.settings.channels and statuses.get("pending"):
                log.warning(
                    "%d deliveries are pending for channel %s, which is no longer configured",
                    statuses["pending"], channel,
                )
        if not self.record:
            for channel in self.settings.channels:
                due = store.due(channel, self.now)
                carried = [d for d in due if (d.detection_id, d.device_key) not in self.created_this_run]
                self.report.pending_carried_over += len(carried)
                chunk = self._chunk_size(channel)
                self.report.would_send.setdefault(channel, []).extend(
                    p.message for p in plan_messages(carried, chunk, self._for_messages(carried), self.report.run)
                )
        else:
            for channel in self.settings.channels:
                self._deliver_channel(channel, store)
        self.report.failed_total = sum(statuses.get("failed", 0) for statuses in store.counts().values())
        if self.report.failed_total:
            log.error(
                "%d deliveries gave up after retrying (status failed); `alerter state list --failed` shows them, "
                "`alerter state retry` re-queues them", self.report.failed_total,
            )

    def _digest(self, store: Store | None) -> None:
        if not digest_due(self.now, self.settings.alert_schedule, self.settings.digest_at):
            return
        counts = store.counts() if store is not None else {}
        digest = Digest(
            run=self.report.run,
            detections=list(self.report.detections),
            pending=sum(c.get("pending", 0) for c in counts.values()),
            failed=sum(c.get("failed", 0) for c in counts.values()),
        )
        self.report.digest = digest
        if self.dry_run:
            return
        for channel in self.settings.channels:
            try:
                guarded(channel, lambda: self._notifier(channel).send_digest(digest))
                log.info("channel %s: daily digest sent", channel)
            except DeliveryError as error:
                text = self.settings.redactor()(str(error))
                self.report.problems.append(f"daily digest to {channel}: {text}")
                log.error("channel %s: daily digest not sent: %s", channel, text)

    def _for_messages(self, deliveries: Sequence[Delivery]) -> dict[str, Detection]:
        """Detections by id for building messages. A delivery still owed for a detection that is
        no longer enabled goes out with that file's name and techniques, read once when needed."""
        if all(d.detection_id in self.detections for d in deliveries):
            return self.detections
        if self._all_detections is None:
            every = load_detections(self.settings.detections_path, every_file=True).detections
            self._all_detections = {**{d.id: d for d in every}, **self.detections}
        return self._all_detections

    def _detection_report(self, detection_id: str) -> DetectionReport:
        for dr in self.report.detections:
            if dr.detection_id == detection_id:
                return dr
        detection = (self._all_detections or self.detections).get(detection_id) or orphan_detection(detection_id)
        dr = DetectionReport(detection.id, detection.name)
        self.report.detections.append(dr)
        return dr

    def _deliver_channel(self, channel: str, store: Store) -> None:
        due = store.due(channel, self.now)
        self.report.pending_carried_over += sum(
            1 for d in due if (d.detection_id, d.device_key) not in self.created_this_run
        )
        if not due:
            return
        notifier = self._notifier(channel)
        budget = self.settings.run_budget.total_seconds()
        held_back = ""  # once set, the channel's remaining messages wait for the next run untouched
        for planned in plan_messages(due, notifier.chunk_size, self._for_messages(due), self.report.run):
            outcome = self._detection_report(planned.message.detection.id).channel(channel)
            if not held_back and time.monotonic() - self.started > budget:
                held_back = "run budget used up"
            if held_back:
                # Not attempted, so not a failed attempt: they stay pending and due as they are.
                outcome.failed += len(planned.deliveries)
                if f"{held_back}; left pending for the next run" not in outcome.errors:
                    outcome.errors.append(f"{held_back}; left pending for the next run")
                continue
            owner = self.report.run.id
            claimed = store.claim(planned.deliveries, owner, LEASE_SECONDS, self.now)
            if not claimed:
                continue  # a concurrent run holds them and is sending
            message = replace(planned.message, sightings=[d.sighting for d in claimed])
            try:
                with LeaseKeeper(store, claimed, owner):
                    guarded(channel, lambda: notifier.send(message))
            except DeliveryError as error:
                text = self.settings.redactor()(str(error))
                not_before = self.now + timedelta(seconds=error.retry_after) if error.retry_after else None
                failure = Failure(text, self.now, self.settings.retry_backoff_max, self.settings.give_up_after,
                                  not_before)
                gave_up = store.mark_failed(claimed, failure, owner=owner)
                outcome.failed += len(claimed) - gave_up
                outcome.gave_up += gave_up
                outcome.errors.append(text)
                log.error(
                    "channel %s: %s: %d deliveries of %s left pending for the next run",
                    channel, text, len(claimed) - gave_up, message.detection.name,
                )
                # A channel that just failed most likely fails again: do not spend the run's
                # time budget on it while other channels wait.
                held_back = f"{channel} failed earlier in this run"
                continue
            store.mark_sent(claimed, self.now)
            outcome.sent += len(claimed)
            log.info("channel %s: delivered %d sightings of %s (message %d of %d)", channel, len(claimed),
                     message.detection.name, message.chunk_index, message.chunk_count)


def guarded(channel: str, call: Callable[[], None]) -> None:
    """A notifier call whose every failure is a DeliveryError: a surprise inside one channel
    (a bug, a library's odd exception) is recorded like any failed attempt and retried, instead
    of ending the run with claims held and the other channels unserved."""
    try:
        call()
    except DeliveryError:
        raise
    except Exception as error:
        log.exception("channel %s: unexpected error", channel)
        raise DeliveryError(f"{channel}: unexpected {type(error).__name__}: {error}") from None


class LeaseKeeper:
    """Renews a run's claims while a send is under way, so a slow channel never lets another
    run take over deliveries this one is still sending; a crashed run's claims lapse within
    LEASE_SECONDS."""

    def __init__(self, store: Store, deliveries: Sequence[Delivery], owner: str) -> None:
        self.store, self.deliveries, self.owner = store, deliveries, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease-keeper", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_EVERY):
            try:
                self.store.renew(self.deliveries, self.owner, LEASE_SECONDS)
            except LedgerError as error:
                log.warning("could not renew claims (they lapse in %.0f s): %s", LEASE_SECONDS, error)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_cycle(
    settings: Settings, *, now: datetime | None = None, dry_run: bool = False, preview: bool = False
) -> RunReport:
    return Cycle(settings, now=now, dry_run=dry_run, preview=preview).run()
