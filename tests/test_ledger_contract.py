"""The delivery ledger's contract, written once and run against every store.

Each test talks to the Store protocol only, on a real store: an SQLite file, or a fresh table in
the session's Azurite through the real azure-data-tables client. Races use two store instances
(two "runs") on the same ledger, in threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from alerter.ledger import (
    REPORT_IDS_KEPT,
    Failure,
    LedgerError,
    Store,
    open_store,
    sighting_from_json,
    sighting_to_json,
)
from alerter.model import Delivery, DeliveryStatus, Link, Sighting
from alerter.settings import Settings

NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
DET = "7a706363-95d0-4c85-9a65-f4a4463d09cf"
OTHER = "0b1c2d3e-0000-4000-8000-000000000002"
CHANNELS = ("webhook", "teams")
BACKOFF_MAX = timedelta(hours=1)
GIVE_UP = timedelta(days=7)

OpenStore = Callable[..., Store]


@pytest.fixture(params=["sqlite", "table"])
def open_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens store instances on one fresh ledger: each call is another process's view of it."""
    if request.param == "sqlite":
        settings = Settings(state_store="sqlite", state_path=tmp_path / "state.db")
    else:
        values = request.getfixturevalue("table_state_values")
        settings = Settings(
            state_store="table", state_connection=values["STATE_CONNECTION"],
            state_table_name=values["STATE_TABLE_NAME"], http_retries=1, http_timeout=10,
        )
    opened: list[Store] = []

    def open_one(read_only: bool = False) -> Store:
        store = open_store(settings, read_only=read_only)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_ledger: OpenStore) -> Store:
    return open_ledger()


def sighting(key: str, name: str | None = None, **changes: object) -> Sighting:
    base = Sighting(
        device_key=key,
        device_id=key,
        device_name=name if name is not None else f"host-{key}",
        first_seen=NOW - timedelta(days=1),
        last_seen=NOW - timedelta(hours=1),
        count=2,
        report_ids=[101, 102],
        source="local:test",
        device_names=[name if name is not None else f"host-{key}"],
        links=[Link("Device", f"https://security.microsoft.com/machines/{key}")],
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def keys_of(deliveries: list[Delivery]) -> list[tuple[str, str, str]]:
    return [(d.detection_id, d.device_key, d.channel) for d in deliveries]


def run_together(*calls: Callable[[], object]) -> list[object]:
    """Start the calls at the same instant in threads; return their results (or raise)."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def worker(index: int, call: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = call()
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# --- add_new and known ------------------------------------------------------------------------


def test_add_new_creates_each_device_once(store: Store) -> None:
    assert store.known(DET) == {}
    created = store.add_new(DET, [sighting("a"), sighting("b"), sighting("c")], CHANNELS, NOW)
    assert sorted(created) == ["a", "b", "c"]
    assert store.add_new(DET, [sighting("a"), sighting("b"), sighting("d")], CHANNELS, NOW) == ["d"]
    assert store.add_new(DET, [sighting("a")], CHANNELS, NOW) == []

    known = store.known(DET)
    assert sorted(known) == ["a", "b", "c", "d"]
    assert all(k.owed and k.last_notified_at is None for k in known.values())
    assert store.known(OTHER) == {}
    assert store.counts() == {"webhook": {"pending": 4}, "teams": {"pending": 4}}


def test_a_device_without_channels_is_known_but_owes_nothing(store: Store) -> None:
    assert store.add_new(DET, [sighting("a")], (), NOW) == ["a"]
    assert store.known(DET)["a"].owed is False
    assert store.due("webhook", NOW) == []


def test_the_same_device_under_two_detections_is_two_records(store: Store) -> None:
    assert store.add_new(DET, [sighting("a")], CHANNELS, NOW) == ["a"]
    assert store.add_new(OTHER, [sighting("a")], CHANNELS, NOW) == ["a"]
    assert [d.detection_id for d in store.due("webhook", NOW)] == sorted([DET, OTHER])


def test_two_runs_racing_add_new_create_each_device_exactly_once(open_ledger: OpenStore) -> None:
    first, second = open_ledger(), open_ledger()
    keys = [f"dev-{i:03d}" for i in range(260)]
    # Overlapping halves, in opposite orders: every batch of one run meets the other's writes.
    mine = [sighting(k) for k in keys[:200]]
    theirs = [sighting(k) for k in reversed(keys[60:])]
    for _ in range(2):
        a, b = run_together(lambda: first.add_new(DET, mine, CHANNELS, NOW),
                            lambda: second.add_new(DET, theirs, CHANNELS, NOW))
        assert isinstance(a, list) and isinstance(b, list)
        assert not set(a) & set(b), "a device was created by both runs"
        if a or b:
            assert sorted(a + b) == keys
        mine, theirs = theirs, mine  # the second round finds everything present: creates none
    assert a == [] and b == []
    assert sorted(first.known(DET)) == keys
    assert first.counts() == {"webhook": {"pending": 260}, "teams": {"pending": 260}}


def test_more_than_a_hundred_new_devices_in_one_call(store: Store) -> None:
    keys = [f"bulk-{i:04d}" for i in range(345)]
    assert sorted(store.add_new(DET, [sighting(k) for k in keys], CHANNELS, NOW)) == keys
    assert sorted(store.known(DET)) == keys
    due = store.due("webhook", NOW)
    assert sorted(d.device_key for d in due) == keys
    assert store.add_new(DET, [sighting(k) for k in keys], CHANNELS, NOW) == []


# --- due and claim ----------------------------------------------------------------------------


def test_due_lists_pending_deliveries_in_order_across_detections(store: Store) -> None:
    store.add_new(OTHER, [sighting("z")], CHANNELS, NOW)
    store.add_new(DET, [sighting("b"), sighting("a")], CHANNELS, NOW + timedelta(seconds=1))
    store.add_new(DET, [sighting("0-late")], CHANNELS, NOW + timedelta(seconds=2))
    due = store.due("webhook", NOW + timedelta(seconds=5))
    # By detection id (OTHER sorts first), then by creation time, then by device key.
    assert OTHER < DET
    assert keys_of(due) == [
        (OTHER, "z", "webhook"), (DET, "a", "webhook"), (DET, "b", "webhook"), (DET, "0-late", "webhook"),
    ]
    first = next(d for d in due if d.device_key == "a")
    assert first.status is DeliveryStatus.PENDING and first.attempts == 0
    assert first.created_at == NOW + timedelta(seconds=1) and first.next_attempt_at == NOW + timedelta(seconds=1)
    assert first.sighting == sighting_from_json(sighting_to_json(sighting("a")))
    # Not due before its first attempt time: a replay with an earlier clock sees nothing new.
    assert keys_of(store.due("webhook", NOW)) == [(OTHER, "z", "webhook")]


def test_two_owners_claiming_the_same_deliveries_get_disjoint_sets(open_ledger: OpenStore) -> None:
    first, second = open_ledger(), open_ledger()
    first.add_new(DET, [sighting(f"d{i:03d}") for i in range(150)], CHANNELS, NOW)
    due_first, due_second = first.due("webhook", NOW), second.due("webhook", NOW)
    assert len(due_first) == len(due_second) == 150
    a, b = run_together(lambda: first.claim(due_first, "run-a", 60),
                        lambda: second.claim(due_second, "run-b", 60))
    assert isinstance(a, list) and isinstance(b, list)
    assert not set(keys_of(a)) & set(keys_of(b)), "a delivery was claimed by both runs"
    assert sorted(keys_of(a) + keys_of(b)) == sorted(keys_of(due_first))
    # Claimed deliveries are not due for anyone while the lease holds, and cannot be claimed.
    assert first.due("webhook", NOW) == [] and second.due("webhook", NOW) == []
    assert second.claim(due_first, "run-c", 60) == []
    # The other channel is a separate delivery: untouched by the webhook claims.
    assert len(second.due("teams", NOW)) == 150


def test_a_held_lease_is_kept_and_an_expired_one_is_taken_over(open_ledger: OpenStore) -> None:
    crashed, next_run = open_ledger(), open_ledger()
    crashed.add_new(DET, [sighting("a"), sighting("b")], CHANNELS, NOW)
    due = crashed.due("webhook", NOW)
    assert keys_of(crashed.claim(due[:1], "crashed-run", 60)) == keys_of(due[:1])
    assert keys_of(crashed.claim(due[:1], "crashed-run", 60)) == keys_of(due[:1]), "the holder still holds it"
    assert keys_of(next_run.claim(due, "next-run", 60)) == keys_of(due[1:])

    # A short lease that runs out (a run that died mid-send): the delivery is due and claimable.
    teams = next_run.due("teams", NOW)
    assert keys_of(crashed.claim(teams, "crashed-run", 0.5)) == [(DET, "a", "teams"), (DET, "b", "teams")]
    assert next_run.due("teams", NOW) == []
    assert next_run.claim(teams, "next-run", 60) == []
    threading.Event().wait(0.7)
    taken = next_run.claim(next_run.due("teams", NOW), "next-run", 60)
    assert keys_of(taken) == [(DET, "a", "teams"), (DET, "b", "teams")]
    assert crashed.claim(teams, "crashed-run", 60) == []


def test_claim_ignores_deliveries_that_are_no_longer_pending(open_ledger: OpenStore) -> None:
    first, second = open_ledger(), open_ledger()
    first.add_new(DET, [sighting("a")], CHANNELS, NOW)
    stale = second.due("webhook", NOW)
    first.mark_sent(first.claim(first.due("webhook", NOW), "run-a", 60), NOW)
    assert second.claim(stale, "run-b", 60) == []
    first.forget(DET, "a")
    assert second.claim(stale, "run-b", 60) == []


# --- marking ----------------------------------------------------------------------------------


def test_mark_sent_is_final_and_feeds_re_alerting(store: Store) -> None:
    store.add_new(DET, [sighting("a"), sighting("b")], CHANNELS, NOW)
    claimed = store.claim(store.due("webhook", NOW), "run", 60)
    sent_at = NOW + timedelta(minutes=3)
    store.mark_sent(claimed, sent_at)
    assert store.due("webhook", NOW + timedelta(days=30)) == []
    assert store.counts() == {"webhook": {"sent": 2}, "teams": {"pending": 2}}
    known = store.known(DET)
    assert known["a"].last_notified_at == sent_at
    assert known["a"].owed is True  # teams still owes it
    store.mark_sent(store.claim(store.due("teams", NOW), "run", 60), sent_at + timedelta(seconds=1))
    known = store.known(DET)
    assert known["a"].owed is False and known["a"].last_notified_at == sent_at + timedelta(seconds=1)
    record = store.records(DET)[0]
    webhook = next(d for d in record.deliveries if d.channel == "webhook")
    assert (webhook.status, webhook.attempts, webhook.sent_at, webhook.last_error) == (
        DeliveryStatus.SENT, 1, sent_at, "",
    )


def test_mark_failed_backs_off_then_gives_up(store: Store) -> None:
    store.add_new(DET, [sighting("a")], CHANNELS, NOW)
    [delivery] = store.claim(store.due("webhook", NOW), "run", 60)
    failure = Failure("webhook at http://127.0.0.1/…: HTTP 503", NOW, BACKOFF_MAX, GIVE_UP)
    assert store.mark_failed([delivery], failure) == 0

    [record] = store.records(DET)
    webhook = next(d for d in record.deliveries if d.channel == "webhook")
    assert webhook.status is DeliveryStatus.PENDING and webhook.attempts == 1
    assert webhook.next_attempt_at == NOW + timedelta(minutes=1)
    assert webhook.last_error == "webhook at http://127.0.0.1/…: HTTP 503"
    assert store.due("webhook", NOW + timedelta(seconds=59)) == []
    [again] = store.due("webhook", NOW + timedelta(minutes=1))
    assert again.attempts == 1 and again.created_at == NOW

    # Second failure: two minutes; the backoff is capped by backoff_max.
    later = NOW + timedelta(minutes=1)
    store.mark_failed(store.claim([again], "run", 60), Failure("HTTP 503", later, timedelta(minutes=90), GIVE_UP))
    [again] = store.due("webhook", later + timedelta(minutes=2))
    assert again.attempts == 2 and again.next_attempt_at == later + timedelta(minutes=2)
    assert store.counts()["webhook"] == {"pending": 1}
    assert store.known(DET)["a"].owed is True

    # Owed for give_up_after: it becomes failed, is counted, and is no longer due.
    end = NOW + GIVE_UP
    assert store.mark_failed(store.claim([again], "run", 60), Failure("HTTP 410", end, BACKOFF_MAX, GIVE_UP)) == 1
    assert store.counts() == {"webhook": {"failed": 1}, "teams": {"pending": 1}}
    assert store.due("webhook", end + timedelta(days=1)) == []
    [record] = store.records(DET)
    webhook = next(d for d in record.deliveries if d.channel == "webhook")
    assert (webhook.status, webhook.attempts, webhook.last_error) == (DeliveryStatus.FAILED, 3, "HTTP 410")


def test_marks_on_two_channels_of_one_device_in_one_call(store: Store) -> None:
    store.add_new(DET, [sighting("a")], CHANNELS, NOW)
    both = store.due("webhook", NOW) + store.due("teams", NOW)
    assert len(store.claim(both, "run", 60)) == 2
    store.mark_sent(both, NOW)
    assert store.counts() == {"webhook": {"sent": 1}, "teams": {"sent": 1}}


# --- requeue, records, forget, retry ----------------------------------------------------------


def test_requeue_makes_a_realert_pending_with_the_refreshed_sighting(store: Store) -> None:
    store.add_new(DET, [sighting("a"), sighting("b")], CHANNELS, NOW)
    for channel in CHANNELS:
        store.mark_sent(store.claim(store.due(channel, NOW), "run", 60), NOW)
    later = NOW + timedelta(days=31)
    fresh = sighting("a", name="renamed-a", last_seen=later, count=9, report_ids=[7, 8, 9], realert=True)
    assert store.requeue(DET, [fresh], ["webhook"], later) == 1

    [due] = store.due("webhook", later)
    assert due.device_key == "a" and due.attempts == 0 and due.created_at == later
    assert due.sighting == sighting_from_json(sighting_to_json(fresh))
    assert due.sighting.realert is True and due.sighting.device_name == "renamed-a"
    assert store.due("teams", later) == []
    known = store.known(DET)
    assert known["a"].owed is True and known["a"].last_notified_at == NOW  # counts from the last send
    assert known["b"].owed is False
    [record] = [r for r in store.records(DET) if r.sighting.device_key == "a"]
    assert record.sighting.device_name == "renamed-a" and record.first_reported_at == NOW
    store.mark_sent(store.claim([due], "run", 60), later)
    assert store.known(DET)["a"].last_notified_at == later


def test_records_list_devices_with_their_deliveries(store: Store) -> None:
    store.add_new(DET, [sighting("b"), sighting("a")], CHANNELS, NOW)
    store.add_new(DET, [sighting("c")], CHANNELS, NOW - timedelta(days=1))
    store.add_new(OTHER, [sighting("x")], ["webhook"], NOW)
    records = store.records()
    ordered = [(r.detection_id, r.sighting.device_key) for r in records]
    assert ordered == [(OTHER, "x"), (DET, "c"), (DET, "a"), (DET, "b")]
    by_key = {(r.detection_id, r.sighting.device_key): r for r in records}
    assert [d.channel for d in by_key[(DET, "a")].deliveries] == sorted(CHANNELS)
    assert [d.channel for d in by_key[(OTHER, "x")].deliveries] == ["webhook"]
    assert by_key[(DET, "c")].first_reported_at == NOW - timedelta(days=1)
    assert [r.sighting.device_key for r in store.records(OTHER)] == ["x"]
    assert store.records("no-such-detection") == []


def test_forget_makes_a_device_new_again(store: Store) -> None:
    store.add_new(DET, [sighting("a"), sighting("b")], CHANNELS, NOW)
    assert store.forget(DET, "a") is True
    assert store.forget(DET, "a") is False
    assert store.forget(OTHER, "b") is False
    assert sorted(store.known(DET)) == ["b"]
    assert [d.device_key for d in store.due("webhook", NOW)] == ["b"]
    assert store.add_new(DET, [sighting("a")], CHANNELS, NOW) == ["a"]


def test_retry_failed_makes_failed_and_backed_off_deliveries_due_now(store: Store) -> None:
    store.add_new(DET, [sighting("failed"), sighting("backoff"), sighting("sent")], ["webhook"], NOW)
    due = {d.device_key: d for d in store.claim(store.due("webhook", NOW), "run", 60)}
    store.mark_failed([due["failed"]], Failure("HTTP 500", NOW, BACKOFF_MAX, GIVE_UP))
    [failing] = [d for d in store.due("webhook", NOW + GIVE_UP) if d.device_key == "failed"]
    store.mark_failed([failing], Failure("HTTP 500", NOW + GIVE_UP, BACKOFF_MAX, GIVE_UP))  # second attempt: gives up
    store.mark_failed([due["backoff"]], Failure("HTTP 500", NOW + GIVE_UP - timedelta(seconds=30), BACKOFF_MAX, GIVE_UP))
    store.mark_sent([due["sent"]], NOW)
    now = NOW + GIVE_UP + timedelta(seconds=10)  # the backed-off one is next due 20 s later
    assert store.due("webhook", now) == []
    assert store.counts() == {"webhook": {"failed": 1, "pending": 1, "sent": 1}}

    assert store.retry_failed(now, "teams") == 0
    assert store.retry_failed(now) == 2
    after = {d.device_key: d for d in store.due("webhook", now)}
    assert sorted(after) == ["backoff", "failed"]
    assert after["failed"].created_at == now, "a failed delivery gets a fresh give-up window"
    assert after["backoff"].created_at == NOW
    # Due from their creation time on, so a replay with an earlier --now takes them as well.
    assert all(d.next_attempt_at == NOW and d.status is DeliveryStatus.PENDING for d in after.values())
    assert store.counts() == {"webhook": {"pending": 2, "sent": 1}}


def test_retry_failed_never_takes_a_delivery_a_live_run_holds(open_ledger: OpenStore) -> None:
    """The operator cannot tell a live run from a dead one; the lease can. A retry leaves a held
    claim alone (the holder may be sending it now); once the lease lapses, the next run takes it."""
    live, operator = open_ledger(), open_ledger()
    live.add_new(DET, [sighting("a")], ["webhook"], NOW)
    held = live.claim(live.due("webhook", NOW), "live-run", 0.5)
    assert operator.retry_failed(NOW, "webhook") == 0
    assert operator.claim(held, "next", 60) == []
    time.sleep(0.6)
    assert [d.device_key for d in operator.claim(operator.due("webhook", NOW), "next", 60)] == ["a"]


# --- hostile data -----------------------------------------------------------------------------

HOSTILE = [
    ("a/b\\c#d?e", "slash/back\\slash#hash?question"),
    ("pct%25'quote''!bang", "it's 100% <b>bold</b> & \"quoted\""),
    ("ctl\x00\x01\x1f\x7f\x85\x9f", "nul\x00bell\x07del\x7f c1\x85\x9f"),
    ("tab\tnl\ncr\r", "line1\nline2\r\nend"),
    ("ünïcødé-主机-🖥️", "\u202eevil\u202c‮gnp.exe 💣"),
    ("", "empty-key?"),
    (" spaced key ", "  spaced  "),
    ("x" * 700, "long id: " + "y" * 700),
    ("🖥" * 300, "astral " + "🖥" * 300),
    ("same-prefix-" + "p" * 600 + "-one", "one"),
    ("same-prefix-" + "p" * 600 + "-two", "two"),
    ("n" * 2_000 + "/#?\\", "<script>alert(1)</script>" + "\u0000" * 10 + "Z" * 3_000),
]


def test_hostile_keys_and_names_survive_the_round_trip(store: Store) -> None:
    sightings = [
        sighting(key, name, device_names=[name, name.upper(), "🖥 other"], source="log_analytics:ws\x00/#?",
                 report_ids=list(range(REPORT_IDS_KEPT + 50)) + ["r-1", None, {"nested": "x/#"}],
                 links=[Link("Device", "https://security.microsoft.com/machines/x?y=1#z")])
        for key, name in HOSTILE
    ]
    expected = {s.device_key: sighting_from_json(sighting_to_json(s)) for s in sightings}
    assert len(expected) == len(HOSTILE)
    assert sorted(store.add_new(DET, sightings, CHANNELS, NOW)) == sorted(expected)
    assert store.add_new(DET, sightings, CHANNELS, NOW) == []
    assert sorted(store.known(DET)) == sorted(expected)

    due = store.due("webhook", NOW)
    assert sorted(d.device_key for d in due) == sorted(expected)
    for d in due:
        assert d.sighting == expected[d.device_key]
        assert len(d.sighting.report_ids) == REPORT_IDS_KEPT
    assert {r.sighting.device_key: r.sighting for r in store.records(DET)} == expected

    claimed = store.claim(due, "run", 60)
    assert len(claimed) == len(HOSTILE)
    store.mark_sent(claimed, NOW)
    assert store.counts()["webhook"] == {"sent": len(HOSTILE)}
    for key, _ in HOSTILE:
        assert store.forget(DET, key) is True, repr(key[:40])
    assert store.known(DET) == {}


def test_hostile_detection_ids_are_their_own_partitions(store: Store) -> None:
    detections = ["det/with#bad?chars\\", "det'quote%", "d" * 600]
    for detection in detections:
        assert store.add_new(detection, [sighting("a")], ["webhook"], NOW) == ["a"]
    assert sorted(d.detection_id for d in store.due("webhook", NOW)) == sorted(detections)
    assert sorted(r.detection_id for r in store.records()) == sorted(detections)
    for detection in detections:
        assert list(store.known(detection)) == ["a"]
        assert [r.detection_id for r in store.records(detection)] == [detection]


# --- ownership, leases, backoff and re-alert races ------------------------------------------------

def test_a_run_whose_lease_lapsed_cannot_undo_another_runs_success(open_ledger: OpenStore) -> None:
    slow, fast = open_ledger(), open_ledger()
    slow.add_new(DET, [sighting("a")], ["webhook"], NOW)
    [stale] = slow.claim(slow.due("webhook", NOW), "slow-run", 0.3)
    time.sleep(0.4)  # the slow run's lease lapses; the fast run takes over and delivers
    fast.mark_sent(fast.claim(fast.due("webhook", NOW), "fast-run", 60), NOW)
    assert slow.mark_failed([stale], Failure("HTTP 500", NOW, BACKOFF_MAX, GIVE_UP), owner="slow-run") == 0
    [record] = fast.records(DET)
    assert record.deliveries[0].status is DeliveryStatus.SENT


def test_a_failure_is_recorded_only_by_the_run_that_holds_the_claim(open_ledger: OpenStore) -> None:
    first, second = open_ledger(), open_ledger()
    first.add_new(DET, [sighting("a")], ["webhook"], NOW)
    [lapsed] = first.claim(first.due("webhook", NOW), "first", 0.3)
    time.sleep(0.4)
    [held] = second.claim(second.due("webhook", NOW), "second", 60)
    first.mark_failed([lapsed], Failure("HTTP 500", NOW, BACKOFF_MAX, GIVE_UP), owner="first")
    [record] = second.records(DET)
    assert record.deliveries[0].attempts == 0 and record.deliveries[0].last_error == ""
    second.mark_failed([held], Failure("HTTP 503", NOW, BACKOFF_MAX, GIVE_UP), owner="second")
    [record] = second.records(DET)
    assert (record.deliveries[0].attempts, record.deliveries[0].last_error) == (1, "HTTP 503")


def test_renewing_keeps_a_claim_past_its_first_lease(open_ledger: OpenStore) -> None:
    holder, other = open_ledger(), open_ledger()
    holder.add_new(DET, [sighting("a")], ["webhook"], NOW)
    claimed = holder.claim(holder.due("webhook", NOW), "holder", 0.5)
    time.sleep(0.3)
    holder.renew(claimed, "holder", 2)
    time.sleep(0.4)  # past the first lease, inside the renewed one
    assert other.claim(claimed, "other", 60) == []
    other.renew(claimed, "other", 60)  # renewing what one does not hold changes nothing
    assert other.claim(claimed, "other", 60) == []


def test_a_claim_with_the_run_clock_respects_the_backoff(store: Store) -> None:
    store.add_new(DET, [sighting("a")], ["webhook"], NOW)
    stale_view = store.due("webhook", NOW)  # what an overlapping run listed before the failure
    store.mark_failed(store.claim(stale_view, "run-1", 60, NOW), Failure("HTTP 500", NOW, BACKOFF_MAX, GIVE_UP))
    assert store.claim(stale_view, "run-2", 60, NOW) == []
    assert keys_of(store.claim(stale_view, "run-2", 60, NOW + timedelta(minutes=1))) == [(DET, "a", "webhook")]


def test_retry_after_sets_the_earliest_next_attempt(store: Store) -> None:
    store.add_new(DET, [sighting("a")], ["webhook"], NOW)
    claimed = store.claim(store.due("webhook", NOW), "run", 60, NOW)
    store.mark_failed(claimed, Failure("HTTP 429", NOW, BACKOFF_MAX, GIVE_UP, not_before=NOW + timedelta(hours=2)),
                      owner="run")
    assert store.due("webhook", NOW + timedelta(hours=1)) == []
    assert len(store.due("webhook", NOW + timedelta(hours=2))) == 1


def test_overlapping_realerts_requeue_a_device_once(open_ledger: OpenStore) -> None:
    a, b = open_ledger(), open_ledger()
    a.add_new(DET, [sighting("a")], ["webhook"], NOW)
    a.mark_sent(a.claim(a.due("webhook", NOW), "run", 60), NOW)
    later = NOW + timedelta(days=30)
    window_start = later - timedelta(days=30)
    # Both runs saw the device as due for a re-alert; only the first requeue takes.
    assert a.requeue(DET, [sighting("a", realert=True)], ["webhook"], later, sent_before=window_start) == 1
    assert b.requeue(DET, [sighting("a", realert=True)], ["webhook"], later, sent_before=window_start) == 0
    a.mark_sent(a.claim(a.due("webhook", later), "run", 60), later)
    assert b.requeue(DET, [sighting("a", realert=True)], ["webhook"], later, sent_before=window_start) == 0


def test_a_read_only_store_reads_and_writes_nothing(open_ledger: OpenStore) -> None:
    writer = open_ledger()
    writer.add_new(DET, [sighting("a")], ["webhook"], NOW)
    reader = open_ledger(read_only=True)
    assert sorted(reader.known(DET)) == ["a"]
    assert len(reader.due("webhook", NOW)) == 1
    with pytest.raises(LedgerError):
        reader.add_new(DET, [sighting("b")], ["webhook"], NOW)
    assert sorted(writer.known(DET)) == ["a"]
