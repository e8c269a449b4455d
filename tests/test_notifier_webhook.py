"""The generic webhook: the exact payload, its signature, and failures that lose nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
from datetime import timedelta

import pytest

from alerter.cli import main
from alerter.cycle import run_cycle
from tests.conftest import DEMO_NOW, PANORAMA9_ID, cert_row, write_rows
from tests.support.http_server import Reply

SECRET = "hmac-key-9f8e7d6c5b4a"
SIGNED_PATH = "/workflows/abc/triggers/manual/paths/invoke"
SIGNED_QUERY = "api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sig=Zm9vYmFyc2lnbmF0dXJlc2VjcmV0"


@pytest.fixture
def hook_url(https_server) -> str:
    """A webhook URL shaped like a Logic App trigger: the signature is in the query string."""
    return f"{https_server.url}{SIGNED_PATH}?{SIGNED_QUERY}"


def test_the_payload_is_exactly_the_documented_schema_and_signed(make_settings, data_dir, https_server, hook_url):
    write_rows(data_dir, [
        cert_row("d1", "ws-old", "2026-05-29T10:00:00.1234567Z", report=101),
        cert_row("d1", "ws-new", "2026-05-30T12:30:00Z", report=102),
    ])
    settings = make_settings(WEBHOOK_URL=hook_url, WEBHOOK_SECRET=SECRET)
    report = run_cycle(settings, now=DEMO_NOW)
    assert report.ok
    [request] = https_server.requests
    assert request.method == "POST"
    assert request.path == SIGNED_PATH
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    expected_signature = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Alerter-Signature"] == expected_signature
    assert request.json() == {
        "schema": "alerter.sightings/1",
        "detection": {
            "id": PANORAMA9_ID,
            "name": "Remote Management and Monitoring tool - Panorama9 - File Signature",
            "tactics": ["CommandAndControl"],
            "techniques": ["T1219"],
        },
        "run": {"id": report.run.id, "at": "2026-05-31T11:00:00Z"},
        "sightings": [
            {
                "deviceId": "d1",
                "deviceName": "ws-new",
                "deviceNames": ["ws-old", "ws-new"],
                "firstSeen": "2026-05-29T10:00:00.123456Z",
                "lastSeen": "2026-05-30T12:30:00Z",
                "count": 2,
                "reportIds": [101, 102],
                "source": f"local:{data_dir.name}",
                "realert": False,
                "links": request.json()["sightings"][0]["links"],
            }
        ],
        "total": 1,
        "chunk": {"index": 1, "count": 1},
    }


def test_without_a_secret_there_is_no_signature_header(make_settings, data_dir, https_server, hook_url):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    assert run_cycle(make_settings(WEBHOOK_URL=hook_url), now=DEMO_NOW).ok
    assert "X-Alerter-Signature" not in https_server.requests[0].headers


def test_a_burst_is_chunked_at_500_sightings_per_post(make_settings, data_dir, https_server, hook_url):
    write_rows(data_dir, [cert_row(f"d{i:04}", f"ws-{i}", "2026-05-30T10:00:00Z") for i in range(1201)])
    assert run_cycle(make_settings(WEBHOOK_URL=hook_url), now=DEMO_NOW).ok
    bodies = [r.json() for r in https_server.requests]
    assert [len(b["sightings"]) for b in bodies] == [500, 500, 201]
    assert [b["chunk"] for b in bodies] == [{"index": i, "count": 3} for i in (1, 2, 3)]
    assert {b["total"] for b in bodies} == {1201}
    assert len({s["deviceId"] for b in bodies for s in b["sightings"]}) == 1201


HOSTILE_NAMES = [
    "[click me](https://evil.example/phish) **bold** <script>alert(1)</script>",
    "x" * 3000,
    "invoice\u202etxt.exe",
    "quote\" backslash\\ newline\n tab\t nul-free",
]


def test_hostile_device_names_pass_through_the_json_intact(make_settings, data_dir, https_server, hook_url):
    write_rows(data_dir, [cert_row(f"d{i}", name, "2026-05-30T10:00:00Z") for i, name in enumerate(HOSTILE_NAMES)])
    assert run_cycle(make_settings(WEBHOOK_URL=hook_url), now=DEMO_NOW).ok
    names = {s["deviceId"]: s["deviceName"] for s in https_server.requests[0].json()["sightings"]}
    assert names == {f"d{i}": name for i, name in enumerate(HOSTILE_NAMES)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "failure",
    ["http-500", "http-429-retry-after", "timeout", "connection-refused"],
)
def test_failures_leave_deliveries_pending_and_the_run_exits_1(
    failure, make_settings, state_values, data_dir, https_server, hook_url, tmp_path, capsys, caplog
):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    url = hook_url
    if failure == "http-500":
        https_server.default = Reply(500, body="boom")
    elif failure == "http-429-retry-after":
        https_server.default = Reply(429, headers={"Retry-After": "1"})
    elif failure == "timeout":
        https_server.default = Reply(200, delay=3)  # HTTP_TIMEOUT is 2 s in these tests
    else:
        url = f"https://127.0.0.1:{_free_port()}{SIGNED_PATH}?{SIGNED_QUERY}"
    settings_file = _settings_file(tmp_path, make_settings, state_values, url)
    with caplog.at_level(logging.INFO):
        status = main(["run", "--settings", str(settings_file), "--now", "2026-05-31T11:00:00Z"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "1 delivered" not in out and "0 delivered, 1 left pending" in out
    if failure == "http-429-retry-after":
        # One retry (HTTP_RETRIES=1) after waiting Retry-After, then left for the next run.
        assert len(https_server.requests) == 2
    # Nothing secret in anything a person or a log collector sees.
    everything = out + err + caplog.text
    for secret in ("Zm9vYmFyc2lnbmF0dXJlc2VjcmV0", SIGNED_QUERY, SIGNED_PATH, SECRET):
        assert secret not in everything

    # The next run, with the receiver healthy, delivers it.
    https_server.default = Reply(200)
    settings_file = _settings_file(tmp_path, make_settings, state_values, hook_url)
    later = main(["run", "--settings", str(settings_file), "--now", "2026-05-31T15:00:00Z"])
    assert later == 0
    assert https_server.requests[-1].json()["sightings"][0]["deviceId"] == "d1"


def _settings_file(tmp_path, make_settings, state_values, url: str):
    settings = make_settings(WEBHOOK_URL=url, WEBHOOK_SECRET=SECRET)
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {
        "QUERY_SOURCE": "local",
        "LOCAL_DATA_PATH": str(settings.local_data_path),
        "DETECTIONS_PATH": str(settings.detections_path),
        **state_values,
        "WEBHOOK_URL": url,
        "WEBHOOK_SECRET": SECRET,
        "HTTP_TIMEOUT": "2",
        "HTTP_RETRIES": "1",
    }}))
    return path


def test_plain_http_is_refused_for_a_remote_host(make_settings):
    from alerter.settings import SettingsError

    with pytest.raises(SettingsError) as error:
        make_settings(WEBHOOK_URL=f"http://hooks.example.com{SIGNED_PATH}?{SIGNED_QUERY}")
    message = str(error.value)
    assert "WEBHOOK_URL: must use https://" in message
    assert "sig=" not in message and SIGNED_PATH not in message


def test_a_delivery_error_in_the_ledger_is_redacted(make_settings, data_dir, https_server, hook_url):
    from alerter.ledger import open_store

    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    https_server.default = Reply(500)
    settings = make_settings(WEBHOOK_URL=hook_url)
    run_cycle(settings, now=DEMO_NOW)
    store = open_store(settings)
    try:
        [record] = store.records()
        error = record.deliveries[0].last_error
    finally:
        store.close()
    assert error.startswith("webhook at https://127.0.0.1:") and "HTTP 500" in error
    assert SIGNED_PATH not in error and "sig=" not in error
    # Backed off for a minute after the first failure: a run 30 s later does not hammer it.
    assert run_cycle(settings, now=DEMO_NOW + timedelta(seconds=30)).detections[0].channels == {}


def test_a_retry_after_past_the_run_is_not_slept_in_the_run(make_settings, data_dir, https_server, hook_url):
    import time

    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    https_server.default = Reply(429, headers={"Retry-After": "3600"})
    started = time.monotonic()
    report = run_cycle(make_settings(WEBHOOK_URL=hook_url), now=DEMO_NOW)
    assert time.monotonic() - started < 10
    assert not report.ok and len(https_server.requests) == 1  # no in-run retry of a one-hour wait
    assert "HTTP 429" in report.detections[0].channels["webhook"].errors[0]
