"""The seed query's semantics through the local source (duckdb-kql), on a tricky dataset."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from alerter.detections import load_detections
from alerter.sightings import to_sightings
from alerter.sources import QueryError
from alerter.sources.local import LocalSource
from tests.conftest import DEMO_NOW, ROOT, cert_row, write_rows


@pytest.fixture
def seed():
    return load_detections(ROOT / "detections").detections[0]


def sightings_for(make_settings, seed, now=DEMO_NOW):
    source = LocalSource(make_settings())
    try:
        result = source.query(seed, now)
    finally:
        source.close()
    sightings, rows = to_sightings(result.batches)
    return {s.device_key: s for s in sightings}, rows


def test_has_is_a_case_insensitive_whole_term_match(make_settings, data_dir: Path, seed):
    write_rows(data_dir, [
        cert_row("d1", "inc", "2026-05-30T10:00:00Z", "Panorama9, Inc."),
        cert_row("d2", "upper", "2026-05-30T10:00:00Z", "PANORAMA9"),
        cert_row("d3", "glued", "2026-05-30T10:00:00Z", "NotPanorama9Corp"),
        cert_row("d4", "suffix", "2026-05-30T10:00:00Z", "Panorama9Labs"),
        cert_row("d5", "other", "2026-05-30T10:00:00Z", "Microsoft Corporation"),
    ])
    found, _ = sightings_for(make_settings, seed)
    assert sorted(found) == ["d1", "d2"]


def test_the_five_day_window_edges(make_settings, data_dir: Path, seed):
    write_rows(data_dir, [
        cert_row("inside-start", "a", "2026-05-26T11:00:00Z"),   # exactly now(-5d): between is inclusive
        cert_row("before-start", "b", "2026-05-26T10:59:59Z"),
        cert_row("at-now", "c", "2026-05-31T11:00:00Z"),
        cert_row("future", "d", "2026-05-31T11:00:01Z"),
    ])
    found, _ = sightings_for(make_settings, seed)
    assert sorted(found) == ["at-now", "inside-start"]


def test_make_set_and_count_merge_per_device_and_a_renamed_device_is_one_sighting(make_settings, data_dir: Path, seed):
    write_rows(data_dir, [
        cert_row("d1", "old-name", "2026-05-28T09:00:00Z", report=11),
        cert_row("d1", "old-name", "2026-05-28T10:00:00Z", report=12),
        cert_row("d1", "old-name", "2026-05-28T10:30:00Z", report=12),
        cert_row("d1", "new-name", "2026-05-30T08:00:00Z", report=13),
        cert_row("", "Kiosk-7", "2026-05-29T08:00:00Z", report=20),
        cert_row("", "kiosk-7", "2026-05-29T09:00:00Z", report=21),
    ])
    found, rows = sightings_for(make_settings, seed)
    assert rows == 4  # summarize gives one row per (DeviceId, DeviceName)
    renamed = found["d1"]
    assert renamed.device_name == "new-name"
    assert renamed.device_names == ["old-name", "new-name"]
    assert renamed.count == 4
    assert renamed.report_ids == [11, 12, 13]
    assert renamed.first_seen == datetime(2026, 5, 28, 9, tzinfo=timezone.utc)
    assert renamed.last_seen == datetime(2026, 5, 30, 8, tzinfo=timezone.utc)
    # No DeviceId: keyed by the lower-cased name, so both spellings are one device.
    kiosk = found["kiosk-7"]
    assert kiosk.device_id == ""
    assert kiosk.count == 2 and kiosk.report_ids == [20, 21]
    assert kiosk.source == f"local:{data_dir.name}"


def test_an_advanced_hunting_csv_export_replays_as_it_is(make_settings, data_dir: Path, seed):
    data_dir.mkdir(parents=True)
    (data_dir / "DeviceFileCertificateInfo.csv").write_text(
        "Timestamp,DeviceId,DeviceName,Signer,IsSigned,ReportId\n"
        '2026-05-30T10:00:00.1234567Z,d1,ws-1,"Panorama9, Inc.",true,7\n'
        "2026-05-30T11:00:00.7654321Z,d1,ws-1,PANORAMA9,true,8\n"
        "2026-05-10T11:00:00.0000000Z,d2,ws-2,Panorama9,true,9\n"
    )
    found, _ = sightings_for(make_settings, seed)
    assert list(found) == ["d1"]
    assert found["d1"].first_seen == datetime(2026, 5, 30, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert found["d1"].report_ids == [7, 8]


def test_a_missing_table_is_a_clear_query_error(make_settings, data_dir: Path, seed):
    write_rows(data_dir, [], table="SomethingElse")
    source = LocalSource(make_settings())
    with pytest.raises(QueryError, match="DeviceFileCertificateInfo"):
        source.query(seed, DEMO_NOW)


@pytest.mark.parametrize("bad_time", ["31/05/2026 10:30:00", "May 31, 2026 10:30:00 AM"])
def test_a_time_that_does_not_read_is_refused_not_silently_dropped(make_settings, data_dir: Path, seed, bad_time):
    data_dir.mkdir(parents=True)
    (data_dir / "DeviceFileCertificateInfo.csv").write_text(
        "Timestamp,DeviceId,DeviceName,Signer,ReportId\n"
        "2026-05-30T10:00:00Z,d1,ws-1,Panorama9,1\n"
        f'"{bad_time}",d2,ws-2,Panorama9,2\n'
    )
    source = LocalSource(make_settings())
    with pytest.raises(QueryError, match=r"DeviceFileCertificateInfo.csv: column Timestamp holds .* not an ISO 8601"):
        source.query(seed, DEMO_NOW)
