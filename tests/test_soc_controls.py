"""SOC controls: suppressions of sanctioned devices, re-alerting, and the RMM catalog end to end."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from alerter.cli import main
from alerter.cycle import run_cycle
from alerter.detections import load_detections
from alerter.sightings import to_sightings
from alerter.sources.local import LocalSource
from alerter.suppressions import SuppressionError, load_suppressions
from tests.conftest import DEMO_NOW, PANORAMA9_ID, ROOT, cert_row, write_rows
from tests.support.http_server import Reply

P9_NAME = "Remote Management and Monitoring tool - Panorama9 - File Signature"


def posted_ids(server) -> list[str]:
    return [s["deviceId"] or s["deviceName"] for r in server.requests for s in r.json()["sightings"]]


@pytest.fixture
def fleet(data_dir: Path) -> None:
    write_rows(data_dir, [
        cert_row("id-jump-1", "IT-JUMP-01.contoso.local", "2026-05-30T10:00:00Z"),
        cert_row("id-jump-2", "it-jump-02.contoso.local", "2026-05-30T10:00:00Z"),
        cert_row("id-lab", "lab-7", "2026-05-30T10:00:00Z"),
        cert_row("id-fin", "fin-ws-1", "2026-05-30T10:00:00Z"),
    ])


def write_suppressions(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suppressions.yaml"
    path.write_text(text)
    return path


def test_suppressions_by_glob_by_id_and_by_both_with_a_wildcard_detection(
    make_settings, fleet, tmp_path, webhook_server
):
    path = write_suppressions(tmp_path, f"""
- detection: "{P9_NAME}"
  deviceName: "it-jump-*"
  reason: sanctioned RMM on jump hosts
  owner: it-ops@contoso.com
- detection: "*"
  deviceId: id-lab
  reason: lab
  owner: de@contoso.com
- detection: {PANORAMA9_ID}
  deviceId: id-fin
  deviceName: "not-this-name"
  reason: both must match, so this does not apply
  owner: de@contoso.com
""")
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", SUPPRESSIONS_PATH=str(path))
    report = run_cycle(settings, now=DEMO_NOW)
    assert report.ok
    assert posted_ids(webhook_server) == ["id-fin"]
    assert (report.detections[0].devices, report.detections[0].suppressed, report.detections[0].new) == (4, 3, 1)


def test_an_expired_suppression_stops_applying_and_the_device_is_reported_then(
    make_settings, fleet, tmp_path, webhook_server
):
    path = write_suppressions(tmp_path, """
- detection: "*"
  deviceName: "*"
  reason: change freeze
  owner: soc@contoso.com
  expires: 2026-06-01T00:00:00Z
""")
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", SUPPRESSIONS_PATH=str(path))
    before = run_cycle(settings, now=DEMO_NOW)
    assert before.detections[0].suppressed == 4 and webhook_server.requests == []
    after = run_cycle(settings, now=DEMO_NOW + timedelta(hours=13))  # 2026-06-01T00:00Z: expired
    assert after.detections[0].suppressed == 0 and after.detections[0].new == 4
    assert sorted(posted_ids(webhook_server)) == ["id-fin", "id-jump-1", "id-jump-2", "id-lab"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('- detection: "*"\n  deviceName: x\n  owner: a\n', "entry 1: field 'reason' is required"),
        ('- detection: "*"\n  reason: r\n  owner: a\n', "entry 1: needs deviceId, deviceName or both"),
        ('- detection: "*"\n  deviceName: "ws-[0-9"\n  reason: r\n  owner: a\n', "is not a valid glob"),
        ('- detection: "*"\n  deviceName: x\n  reason: r\n  owner: a\n  expires: next tuesday\n',
         "field 'expires' is not an ISO 8601 time"),
        ('- detection: "*"\n  deviceName: x\n  reason: r\n  owner: a\n  until: 2026-01-01\n', "unknown field(s) until"),
        ("detection: '*'\n", "must be a YAML list of entries"),
    ],
)
def test_a_bad_suppressions_file_is_a_clear_validation_error(tmp_path, text, expected, make_settings, capsys):
    path = write_suppressions(tmp_path, text)
    with pytest.raises(SuppressionError, match="SUPPRESSIONS_PATH"):
        load_suppressions(path)
    settings_file = tmp_path / "s.json"
    settings = make_settings()
    settings_file.write_text(
        '{"Values": {"QUERY_SOURCE": "local", "LOCAL_DATA_PATH": "%s", "DETECTIONS_PATH": "%s", '
        '"STATE_PATH": "%s", "SUPPRESSIONS_PATH": "%s"}}'
        % (settings.local_data_path, settings.detections_path, tmp_path / "s.db", path)
    )
    assert main(["validate", "--settings", str(settings_file)]) == 2
    assert expected in capsys.readouterr().err


def test_a_device_still_seen_is_realerted_after_the_window_and_not_before(make_settings, data_dir, webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", REALERT_AFTER="30d")
    assert run_cycle(settings, now=DEMO_NOW).ok
    first = webhook_server.requests[-1].json()["sightings"][0]
    assert first["realert"] is False

    def seen_at(now):
        write_rows(data_dir, [cert_row("d1", "ws-1", (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))])
        return run_cycle(settings, now=now)

    early = seen_at(DEMO_NOW + timedelta(days=29, hours=23))
    assert early.detections[0].realerts == 0 and len(webhook_server.requests) == 1
    due = seen_at(DEMO_NOW + timedelta(days=30))
    assert due.ok and due.detections[0].realerts == 1
    again = webhook_server.requests[-1].json()["sightings"][0]
    assert again["realert"] is True and again["deviceId"] == "d1"
    assert len(webhook_server.requests) == 2
    quiet = seen_at(DEMO_NOW + timedelta(days=30, hours=4))
    assert quiet.detections[0].realerts == 0 and len(webhook_server.requests) == 2


def test_no_realert_by_default(make_settings, data_dir, webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook")
    run_cycle(settings, now=DEMO_NOW)
    write_rows(data_dir, [cert_row("d1", "ws-1", "2027-05-30T10:00:00Z")])
    later = run_cycle(settings, now=DEMO_NOW + timedelta(days=365))
    assert later.detections[0].realerts == 0 and len(webhook_server.requests) == 1


def test_every_catalog_vendor_is_found_by_its_own_detection_through_the_local_source(make_settings, data_dir):
    """One dataset with a device per vendor (signed with its first signer term) plus Panorama9:
    each catalog detection finds exactly its own vendor's device."""
    catalog = load_detections(ROOT / "detections", ["rmm/*"]).detections
    assert len(catalog) == 51
    terms = {}
    for detection in catalog:
        line = next(l for l in detection.query.splitlines() if "Signer has" in l)
        terms[detection.id] = line.split("'")[1]
    rows = [cert_row(f"dev-{d.id}", f"ws-{i}", "2026-05-30T10:00:00Z", signer=f"{terms[d.id]}, Inc.")
            for i, d in enumerate(catalog)]
    rows.append(cert_row("dev-p9", "p9", "2026-05-30T10:00:00Z", signer="Panorama9, Inc."))
    write_rows(data_dir, rows)
    source = LocalSource(make_settings())
    try:
        for detection in catalog:
            sightings, _ = to_sightings(source.query(detection, DEMO_NOW).batches)
            assert [s.device_id for s in sightings] == [f"dev-{detection.id}"], detection.name
    finally:
        source.close()


@pytest.mark.parametrize(
    ("now", "due"),
    [
        ("2026-05-31T08:00:02Z", False),  # before 09:00
        ("2026-05-31T12:00:01Z", True),   # first scheduled run after 09:00 (previous tick 08:00)
        ("2026-05-31T16:00:00Z", False),  # later runs that day
        ("2026-05-31T09:00:00Z", True),   # a run exactly at the digest time
    ],
)
def test_the_digest_goes_with_the_first_scheduled_run_after_digest_at(now, due):
    from datetime import time

    from alerter.digest import digest_due
    from alerter.sightings import as_utc

    assert digest_due(as_utc(now), "0 0 */4 * * *", time(9, 0)) is due
    assert digest_due(as_utc(now), "0 0 */4 * * *", None) is False


def test_the_daily_digest_says_alive_and_what_was_checked_when_nothing_is_new(make_settings, data_dir, webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    settings = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", DIGEST_AT="09:00")
    run_cycle(settings, now=DEMO_NOW - timedelta(hours=3))  # 08:00: the device is new, no digest yet
    assert [r.json()["schema"] for r in webhook_server.requests] == ["alerter.sightings/1"]
    quiet = run_cycle(settings, now=DEMO_NOW + timedelta(hours=1))  # 12:00: nothing new, digest
    assert quiet.ok and quiet.digest is not None
    digest = webhook_server.requests[-1].json()
    assert digest["schema"] == "alerter.digest/1"
    assert digest["newTotal"] == 0 and digest["pending"] == 0 and digest["failed"] == 0
    assert digest["detections"] == [{
        "id": PANORAMA9_ID, "name": P9_NAME, "devices": 1, "new": 0, "alreadyReported": 1,
        "suppressed": 0, "realerts": 0, "queryError": None,
    }]
    run_cycle(settings, now=DEMO_NOW + timedelta(hours=5))  # 16:00: no second digest
    assert len(webhook_server.requests) == 2


def test_a_delivery_left_pending_for_a_removed_channel_does_not_hold_re_alerts_back(
    make_settings, data_dir, webhook_server, https_server
):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    https_server.default = Reply(503)  # Teams is down on the first run...
    both = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", TEAMS_WEBHOOK_URL=https_server.url + "/teams",
                         REALERT_AFTER="30d", HTTP_RETRIES="0")
    run_cycle(both, now=DEMO_NOW)
    assert len(webhook_server.requests) == 1
    # ...and is then removed from the settings, its delivery still pending in the ledger.
    webhook_only = make_settings(WEBHOOK_URL=webhook_server.url + "/hook", REALERT_AFTER="30d")
    later = DEMO_NOW + timedelta(days=30)
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-06-29T10:00:00Z")])
    report = run_cycle(webhook_only, now=later)
    assert report.detections[0].realerts == 1
    assert webhook_server.requests[-1].json()["sightings"][0]["realert"] is True
