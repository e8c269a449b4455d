"""The cycle's delivery contract, run against every store: delivered once, never lost."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

from alerter.cycle import run_cycle
from alerter.ledger import open_store
from alerter.model import DeliveryStatus
from tests.conftest import DEMO_NOW, cert_row, write_rows
from tests.support.http_server import RecordingServer, Reply


def delivered_keys(server: RecordingServer) -> Counter:
    counts: Counter = Counter()
    for request in server.requests:
        if request.method == "POST":
            for s in request.json()["sightings"]:
                counts[s["deviceId"] or s["deviceName"].lower()] += 1
    return counts


def three_devices(data_dir: Path) -> None:
    write_rows(data_dir, [
        cert_row("d1", "ws-1", "2026-05-30T10:00:00Z"),
        cert_row("d2", "ws-2", "2026-05-30T11:00:00Z"),
        cert_row("d3", "ws-3", "2026-05-31T09:00:00Z"),
    ])


def test_first_run_delivers_and_the_second_delivers_nothing(make_settings, data_dir, webhook_server):
    three_devices(data_dir)
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook")
    first = run_cycle(settings, now=DEMO_NOW)
    assert first.ok
    assert delivered_keys(webhook_server) == Counter({"d1": 1, "d2": 1, "d3": 1})
    report = first.detections[0]
    assert (report.devices, report.new, report.known, report.channels["webhook"].sent) == (3, 3, 0, 3)

    second = run_cycle(settings, now=DEMO_NOW + timedelta(hours=4))
    assert second.ok
    assert (second.detections[0].new, second.detections[0].known) == (0, 3)
    assert len(webhook_server.requests) == 1


def test_a_failing_channel_keeps_the_delivery_pending_and_a_later_run_delivers_it(
    make_settings, data_dir, webhook_server
):
    three_devices(data_dir)
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook")
    webhook_server.default = Reply(500)
    failed = run_cycle(settings, now=DEMO_NOW)
    assert not failed.ok
    assert failed.detections[0].channels["webhook"].failed == 3
    store = open_store(settings)
    try:
        statuses = {d.status for r in store.records() for d in r.deliveries}
        assert statuses == {DeliveryStatus.PENDING}
        # Backed off: not due again at the same instant, due a run later.
        assert store.due("webhook", DEMO_NOW) == []
        assert len(store.due("webhook", DEMO_NOW + timedelta(hours=4))) == 3
    finally:
        store.close()

    # The devices left the query window; the deliveries are still owed and go out.
    write_rows(data_dir, [cert_row("d9", "elsewhere", "2026-05-01T10:00:00Z")])
    webhook_server.default = Reply(200)
    recovered = run_cycle(settings, now=DEMO_NOW + timedelta(hours=4))
    assert recovered.ok
    assert recovered.pending_carried_over == 3
    posted = [r for r in webhook_server.requests if r.method == "POST"]
    assert [s["deviceId"] for s in posted[-1].json()["sightings"]] == ["d1", "d2", "d3"]


def test_a_delivery_that_keeps_failing_gives_up_loudly_and_is_never_deleted(make_settings, data_dir, webhook_server):
    three_devices(data_dir)
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", DELIVERY_GIVE_UP_AFTER="1d")
    webhook_server.default = Reply(503)
    run_cycle(settings, now=DEMO_NOW)
    late = run_cycle(settings, now=DEMO_NOW + timedelta(days=2))
    assert not late.ok
    assert late.failed_total == 3
    assert late.detections[0].channels["webhook"].gave_up == 3
    again = run_cycle(settings, now=DEMO_NOW + timedelta(days=3))
    assert not again.ok and again.failed_total == 3  # reported every run until someone acts


def test_two_cycles_racing_on_one_store_deliver_each_device_once(make_settings, data_dir, webhook_server):
    write_rows(data_dir, [cert_row(f"dev-{i:03}", f"ws-{i}", "2026-05-30T10:00:00Z") for i in range(60)])
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook")
    webhook_server.default = Reply(200, delay=0.05)
    reports = []
    barrier = threading.Barrier(2)

    def race() -> None:
        barrier.wait()
        reports.append(run_cycle(settings, now=DEMO_NOW))

    threads = [threading.Thread(target=race) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = delivered_keys(webhook_server)
    assert len(counts) == 60
    assert set(counts.values()) == {1}
    assert sum(r.detections[0].new for r in reports) == 60
    assert all(r.ok for r in reports)


# A crash between send and mark (SIGKILL of a real `alerter run` process while the receiver
# holds the message) is tested for every store in test_crash_safety.py.


def test_a_delivery_owed_for_a_detection_no_longer_enabled_still_goes_out_with_its_name(
    make_settings, data_dir, webhook_server
):
    three_devices(data_dir)
    webhook_server.default = Reply(500)
    run_cycle(make_settings(WEBHOOK_URL=webhook_server.url + "/hook"), now=DEMO_NOW)
    webhook_server.default = Reply(200)
    # The SOC switches the Panorama9 detection off; what it already owes is still delivered.
    later = run_cycle(
        make_settings(WEBHOOK_URL=webhook_server.url + "/hook", DETECTIONS="rmm/anydesk-filesig.yaml"),
        now=DEMO_NOW + timedelta(hours=4),
    )
    assert later.ok
    body = webhook_server.requests[-1].json()
    assert body["detection"]["name"] == "Remote Management and Monitoring tool - Panorama9 - File Signature"
    assert body["detection"]["techniques"] == ["T1219"]
    assert sorted(s["deviceId"] for s in body["sightings"]) == ["d1", "d2", "d3"]


def test_a_device_with_an_absurdly_long_name_and_no_id_is_delivered_once(make_settings, data_dir, webhook_server):
    """Its key (the lower-cased name) is bounded, so every store can hold it and find it again."""
    name = "É" * 6000
    write_rows(data_dir, [cert_row("", name, "2026-05-30T10:00:00Z"), cert_row("d2", "ws-2", "2026-05-30T10:00:00Z")])
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook")
    first = run_cycle(settings, now=DEMO_NOW)
    assert first.ok and first.detections[0].channels["webhook"].sent == 2
    names = sorted(s["deviceName"] for r in webhook_server.requests for s in r.json()["sightings"])
    assert names == sorted([name, "ws-2"])  # the name itself travels whole
    second = run_cycle(settings, now=DEMO_NOW + timedelta(hours=4))
    assert second.ok and (second.detections[0].new, second.detections[0].known) == (0, 2)
    assert len(webhook_server.requests) == 1


def test_a_surprise_inside_a_notifier_is_a_failed_delivery_not_a_crashed_run():
    from alerter.cycle import guarded
    from notifiers import DeliveryError

    def broken() -> None:
        raise KeyError("a library's odd failure")

    try:
        guarded("teams", broken)
    except DeliveryError as error:
        assert str(error) == "teams: unexpected KeyError: \"a library's odd failure\""
    else:
        raise AssertionError("guarded() let the call's failure pass as a success")
