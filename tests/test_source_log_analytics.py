"""QUERY_SOURCE=log_analytics: the real LogsQueryClient and DefaultAzureCredential against a local
HTTPS Log Analytics that runs the received KQL over test rows, with a token from a local
managed-identity endpoint (the App Service protocol the Functions host speaks)."""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential
from azure.monitor.query import LogsQueryClient

from alerter import cli
from alerter.detections import load_detections
from alerter.ledger import open_store
from alerter.model import Detection
from alerter.settings import Settings
from alerter.sightings import to_sightings
from alerter.sources import QueryError, create_source
from alerter.sources.log_analytics import LogAnalyticsSource
from tests.conftest import BOTH_STORES, DEMO_NOW, PANORAMA9_ID, ROOT, cert_row, sqlite_unless_asked  # noqa: F401 - sqlite_unless_asked is the module's state_values
from tests.support.http_server import Reply
from tests.support.identity import ManagedIdentityEndpoint
from tests.support.log_analytics import (
    FakeLogAnalytics,
    answer,
    gzipped,
    html_page,
    partial_error,
    result_table,
    throttled,
    truncated,
    unavailable,
)

WS_A = "11111111-aaaa-4aaa-8aaa-111111111111"
WS_B = "22222222-bbbb-4bbb-8bbb-222222222222"
TABLE = "DeviceFileCertificateInfo"
MACHINE_ID = "5f0b3c9e2a7d41e8b6c4a3f2e1d0c9b8a7f6e5d4"  # a Defender DeviceId: 40 hex digits
RESOURCE_ID = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/soc-rg/providers/"
               "Microsoft.OperationalInsights/workspaces/soc-sentinel")

# DEMO_NOW is 2026-05-31T11:00Z; the seed query reads the five days before it.
ROWS_A = [
    cert_row("d-alpha", "ALPHA-PC", "2026-05-30T08:15:00.1234567Z", report=101),
    cert_row("d-alpha", "ALPHA-PC", "2026-05-31T09:00:00Z", report=102),
    cert_row("d-bravo", "bravo-laptop", "2026-05-28T12:00:00Z", report=201),
    cert_row("d-old", "OLD-PC", "2026-05-20T00:00:00Z", report=301),  # before the window
    cert_row("d-other", "OTHER-PC", "2026-05-30T00:00:00Z", signer="NotPanorama9Corp", report=401),
    cert_row("d-vendor", "VENDOR-PC", "2026-05-30T00:00:00Z", signer="Contoso Ltd", report=501),
]
ROWS_B = [
    cert_row("d-bravo", "bravo-laptop", "2026-05-29T12:00:00Z", report=202),
    cert_row("d-charlie", "CHARLIE-SRV", "2026-05-27T12:00:00.5Z", report=601),
]


@pytest.fixture
def panorama9() -> Detection:
    loaded = load_detections(ROOT / "detections", ())
    [detection] = [d for d in loaded.detections if d.id == PANORAMA9_ID]
    return detection


def detection_with(query: str, base: Detection) -> Detection:
    return Detection(id="test-" + str(abs(hash(query))), name="test detection", query=query, path="test.yaml",
                     tactics=base.tactics, techniques=base.techniques)


@pytest.fixture
def fake(ca, trust_ca, managed_identity) -> Iterator[FakeLogAnalytics]:
    workspaces = {WS_A: {TABLE: ROWS_A}, WS_B: {TABLE: ROWS_B}}
    with FakeLogAnalytics(ca, managed_identity, DEMO_NOW, workspaces) as server:
        yield server


@pytest.fixture
def la_settings(make_settings, fake):
    def build(**overrides: str) -> Settings:
        values = {"QUERY_SOURCE": "log_analytics", "LOG_ANALYTICS_WORKSPACE_ID": WS_A,
                  "LOG_ANALYTICS_ENDPOINT": fake.url, **overrides}
        return make_settings(**values)

    return build


@pytest.fixture
def source_for(la_settings):
    made: list[LogAnalyticsSource] = []

    def build(**overrides: str) -> LogAnalyticsSource:
        source = LogAnalyticsSource(la_settings(**overrides))
        made.append(source)
        return source

    yield build
    for source in made:
        source.close()


def devices(result) -> dict[str, Any]:
    sightings, _ = to_sightings(result.batches)
    return {s.device_key: s for s in sightings}


def assert_no_secrets(identity: ManagedIdentityEndpoint, *texts: str) -> None:
    for secret in identity.secret_values:
        for text in texts:
            assert secret not in text


# --- the request on the wire ----------------------------------------------------------------------


def test_sends_the_kql_unchanged_without_a_timespan_and_with_the_managed_identity_token(
    source_for, fake, panorama9, managed_identity
):
    result = source_for().query(panorama9, DEMO_NOW)

    [request] = fake.requests
    assert request.method == "POST" and request.path == f"/v1/workspaces/{WS_A}/query"
    body = request.json()
    assert body["query"] == panorama9.query  # byte for byte, not reformatted
    assert "timespan" in body and body["timespan"] is None  # the query's own window decides
    assert body["workspaces"] is None
    assert request.headers["Prefer"] == "wait=180"
    assert request.headers["Authorization"] == managed_identity.bearer(fake.url)
    # The token came from the App Service endpoint, asked for the endpoint's audience.
    [issued] = managed_identity.issued
    assert issued.resource == fake.url
    token_request = managed_identity.requests[0]
    assert token_request.query["api-version"] == ["2019-08-01"]

    found = devices(result)
    assert sorted(found) == ["d-alpha", "d-bravo"]
    alpha = found["d-alpha"]
    assert alpha.source == f"log_analytics:{WS_A}"
    assert alpha.first_seen.isoformat() == "2026-05-30T08:15:00.123456+00:00"  # 7 digits in, µs kept
    assert alpha.last_seen.isoformat() == "2026-05-31T09:00:00+00:00"
    assert alpha.count == 2 and alpha.report_ids == [101, 102]
    assert result.incomplete == []


def test_an_api_timespan_would_cut_the_querys_window(fake, panorama9, trust_ca):
    """Why the source sends timespan=None: the same query with a 24-hour API timespan (applied to
    TimeGenerated by the service) loses the device seen three days ago."""
    client = LogsQueryClient(DefaultAzureCredential(), endpoint=fake.url)
    try:
        cut = client.query_workspace(WS_A, panorama9.query, timespan=timedelta(hours=24))
        whole = client.query_workspace(WS_A, panorama9.query, timespan=None)
    finally:
        client.close()
    assert fake.bodies()[0]["timespan"] == "PT86400.0S"
    assert [row["DeviceId"] for row in cut.tables[0].rows] == ["d-alpha"]
    assert sorted(row["DeviceId"] for row in whole.tables[0].rows) == ["d-alpha", "d-bravo"]


def test_columns_are_typed_by_their_declared_kusto_types(source_for, fake, panorama9):
    fake.then(Reply(200, {"tables": [{
        "name": "PrimaryResult",
        "columns": [
            {"name": "DeviceId", "type": "string"}, {"name": "DeviceName", "type": "string"},
            {"name": "FirstSeen", "type": "datetime"}, {"name": "LastSeen", "type": "datetime"},
            {"name": "Report", "type": "dynamic"}, {"name": "Count", "type": "long"},
            {"name": "IsTrusted", "type": "bool"}, {"name": "Score", "type": "real"},
            {"name": "Extra", "type": "dynamic"},
        ],
        "rows": [
            ["d1", "PC-1", "2026-05-30T08:15:00.1234567Z", "2026-05-30T09:00:00Z", "[101,102]", 2, True, 0.5,
             '{"a": [1, null]}'],
            ["d2", None, None, "2026-05-29T23:59:59.9999999Z", "[]", 1, None, None, None],
        ],
    }]}))
    result = source_for().query(panorama9, DEMO_NOW)
    [(label, rows)] = result.batches
    first, second = rows
    assert first["FirstSeen"].isoformat() == "2026-05-30T08:15:00.123456+00:00"
    assert first["FirstSeen"].tzinfo is not None
    assert first["Report"] == [101, 102] and isinstance(first["Count"], int)
    assert first["IsTrusted"] is True and first["Score"] == 0.5 and first["Extra"] == {"a": [1, None]}
    assert second["DeviceName"] is None and second["FirstSeen"] is None and second["Report"] == []
    assert second["LastSeen"].isoformat() == "2026-05-29T23:59:59.999999+00:00"
    sightings, _ = to_sightings(result.batches)
    assert [s.device_key for s in sightings] == ["d1", "d2"]


def test_null_guid_and_timespan_cells_stay_null(source_for, fake, panorama9):
    """azure-monitor-query writes every guid and timespan cell with str(), a null one as "None": read
    back as text it would merge every device without an id under the key "None"."""
    fake.then(answer(result_table(
        [("DeviceId", "guid"), ("DeviceName", "string"), ("Dwell", "timespan")],
        [[None, "PC-1", None], [None, "PC-2", None],
         ["0b6e5a3c-1d2f-4a8b-9c0d-1e2f3a4b5c6d", "PC-3", "01:02:03"]],
    )))
    result = source_for().query(panorama9, DEMO_NOW)
    [(_, rows)] = result.batches
    assert rows[0]["DeviceId"] is None and rows[0]["Dwell"] is None
    assert rows[2]["DeviceId"] == "0b6e5a3c-1d2f-4a8b-9c0d-1e2f3a4b5c6d" and rows[2]["Dwell"] == "01:02:03"
    assert sorted(devices(result)) == ["0b6e5a3c-1d2f-4a8b-9c0d-1e2f3a4b5c6d", "pc-1", "pc-2"]


@pytest.mark.parametrize("kind, value", [
    ("long", "--1"), ("long", "\u00b2"), ("long", "9" * 5000), ("long", 1.5),
    ("datetime", "9999-12-31T23:59:59-01:00"), ("datetime", "0001-01-01T00:00:00+01:00"), ("datetime", "soon"),
    ("dynamic", "[" * 100_000 + "]" * 100_000),
], ids=["double-minus", "superscript-two", "5000-digits", "fraction", "past-9999-in-utc", "before-year-1",
        "not-a-time", "nested-too-deep"])
def test_a_cell_that_is_not_its_declared_type_fails_the_detection_clearly(source_for, fake, panorama9, kind, value):
    fake.then(answer(result_table([("DeviceId", "string"), ("X", kind)], [["d1", value]])))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert f"row 1, column X ({kind})" in str(caught.value) and WS_A in str(caught.value)


def test_every_result_table_is_read(source_for, fake, panorama9):
    fake.then(answer(
        result_table([("DeviceId", "string")], [["d1"]]),
        result_table([("DeviceName", "string"), ("Count", "long")], [["PC-2", 3]], name="Table_1"),
    ))
    result = source_for().query(panorama9, DEMO_NOW)
    found = devices(result)
    assert sorted(found) == ["d1", "pc-2"] and found["pc-2"].count == 3  # each table typed by its own columns
    assert result.incomplete == []


def test_a_later_table_without_a_device_column_is_reported_not_dropped(source_for, fake, panorama9):
    fake.then(answer(
        result_table([("DeviceId", "string")], [["d1"]]),
        result_table([("Note", "string")], [["a"], ["b"]], name="Table_1"),
    ))
    result = source_for().query(panorama9, DEMO_NOW)
    assert sorted(devices(result)) == ["d1"]
    [reason] = result.incomplete
    assert "result table 2 (Table_1) has no DeviceId or DeviceName column" in reason and "2 rows" in reason


# --- partial results and limits -------------------------------------------------------------------


def test_a_partial_result_is_used_and_reported_with_the_services_details(source_for, fake, panorama9):
    fake.partial_error = partial_error(
        "Query result set has exceeded the internal data size limit 67108864 (E_QUERY_RESULT_SET_TOO_LARGE)"
    )
    result = source_for().query(panorama9, DEMO_NOW)
    assert sorted(devices(result)) == ["d-alpha", "d-bravo"]  # the rows that came are real sightings
    [reason] = result.incomplete
    assert WS_A in reason and "partial result" in reason
    assert "E_QUERY_RESULT_SET_TOO_LARGE" in reason and "67108864" in reason  # the details, not just "PartialError"


def test_a_result_at_the_row_limit_is_reported_as_possibly_cut(source_for, fake, panorama9):
    source = source_for()
    source.row_limit = 2  # the service's limit is 500,000 rows; the check is the same
    result = source.query(panorama9, DEMO_NOW)
    assert len(devices(result)) == 2
    [reason] = result.incomplete
    assert "returned 2 rows" in reason and "limit is 2" in reason


def test_the_size_limit_is_compared_with_the_bytes_on_the_wire(source_for, fake, panorama9):
    """The service's ~64 MB limit counts the compressed answer: a big, well-compressed answer is not
    near it, however long it is once decompressed."""
    document = {"tables": [result_table([("DeviceId", "string"), ("Note", "string")],
                                        [[f"d{i % 7}", "x" * 200] for i in range(2000)])]}
    plain = len(json.dumps(document).encode("utf-8"))
    packed = len(gzipped(document).body)
    assert packed * 10 < plain
    source = source_for()
    source.size_limit = plain  # the decompressed answer is at this "limit", the wire bytes far under it
    fake.then(gzipped(document))
    result = source.query(panorama9, DEMO_NOW)
    assert sorted(devices(result)) == [f"d{i}" for i in range(7)] and result.incomplete == []
    source.size_limit = packed  # now the bytes on the wire reach it
    fake.then(gzipped(document))
    [reason] = source.query(panorama9, DEMO_NOW).incomplete
    assert "MB" in reason and "may be cut" in reason


def test_an_uncompressed_answer_is_measured_as_sent(source_for, fake, panorama9):
    source = source_for()
    source.size_limit = 100  # the seed query's answer is a few hundred bytes
    [reason] = source.query(panorama9, DEMO_NOW).incomplete
    assert "may be cut" in reason


# --- throttling and outages -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", [throttled("1"), throttled(None), unavailable(503), unavailable(504)],
                         ids=["429-retry-after", "429-no-retry-after", "503", "504"])
def test_throttling_and_outages_are_retried_with_backoff(source_for, fake, panorama9, fault):
    fake.then(fault)
    started = time.monotonic()
    result = source_for().query(panorama9, DEMO_NOW)
    waited = time.monotonic() - started
    assert len(fake.requests) == 2
    assert fake.requests[0].json() == fake.requests[1].json()
    assert sorted(devices(result)) == ["d-alpha", "d-bravo"]
    assert waited >= 0.9  # Retry-After: 1, or the first backoff step (1 s)


def test_throttling_that_outlasts_the_retries_fails_the_detection_loudly(source_for, fake, panorama9):
    fake.then(throttled("1"), throttled("1"), throttled("1"))
    with pytest.raises(QueryError) as caught:
        source_for(HTTP_RETRIES="1").query(panorama9, DEMO_NOW)
    assert len(fake.requests) == 2
    assert "HTTP 429" in str(caught.value) and "ThrottledError" in str(caught.value)
    assert "next run retries" in str(caught.value)


def test_a_retry_after_longer_than_a_run_waits_is_not_waited_out(source_for, fake, panorama9):
    fake.then(throttled("900"))
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert time.monotonic() - started < 5
    assert len(fake.requests) == 1
    assert "Retry-After 900 s" in str(caught.value)


def test_retries_stop_at_the_runs_query_budget(source_for, fake, panorama9):
    fake.then(unavailable(503, retry_after="5"))
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for(RUN_BUDGET="3s").query(panorama9, DEMO_NOW)  # queries may use 60 %: 1.8 s
    assert time.monotonic() - started < 3
    assert len(fake.requests) == 1
    assert "RUN_BUDGET" in str(caught.value)


def test_a_slow_answer_is_not_waited_for_past_the_runs_query_budget(source_for, fake, panorama9):
    """azure-core cuts only the connection timeout to its budget; the read timeout (HTTP_TIMEOUT plus
    the service's 3 minutes) is cut here, for every attempt, and no retry starts without time left."""
    replies = [answer(result_table([("DeviceId", "string")], [["d1"]])) for _ in range(4)]
    for reply in replies:
        reply.delay = 4.0
    fake.then(*replies)
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for(RUN_BUDGET="3s", HTTP_RETRIES="3").query(panorama9, DEMO_NOW)  # queries may use 1.8 s
    assert time.monotonic() - started < 2.8
    assert len(fake.requests) == 1
    assert "no answer in time" in str(caught.value) and "RUN_BUDGET" in str(caught.value)
    assert "the next run retries" in str(caught.value)


def test_the_services_own_wait_is_cut_to_the_budget(source_for, fake, panorama9):
    source_for(RUN_BUDGET="20s").query(panorama9, DEMO_NOW)  # queries may use 12 s
    wait = int(fake.requests[0].headers["Prefer"].removeprefix("wait="))
    assert 10 <= wait <= 12


# --- errors that retrying does not fix ------------------------------------------------------------


def test_a_bad_query_is_named_and_not_retried(source_for, fake, panorama9):
    broken = detection_with("DeviceFileCertificateInfo | where (", panorama9)
    with pytest.raises(QueryError) as caught:
        source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(broken, DEMO_NOW)
    assert len(fake.requests) == 1  # not retried, and not repeated for the second workspace
    text = str(caught.value)
    assert "HTTP 400" in text and "BadArgumentError" in text and "fix the detection's KQL" in text


def test_a_token_for_the_wrong_audience_gets_401_and_the_role_is_explained(source_for, fake, panorama9):
    fake.audience = "https://api.loganalytics.io"
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    text = str(caught.value)
    assert "HTTP 401" in text and "Log Analytics Reader" in text
    assert len(fake.requests) == 1


def test_a_missing_role_gets_403_and_the_role_is_explained(source_for, fake, panorama9, managed_identity, caplog):
    caplog.set_level(logging.DEBUG)
    fake.denied.add(WS_A)
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    text = str(caught.value)
    assert "HTTP 403" in text and "InsufficientAccessError" in text and "'Log Analytics Reader' role" in text
    assert len(fake.requests) == 1
    assert_no_secrets(managed_identity, text, caplog.text)


def test_no_managed_identity_token_is_a_clear_error(source_for, fake, panorama9, managed_identity):
    managed_identity.refuse = 400  # App Service: no identity assigned to the app
    with pytest.raises(QueryError) as caught:
        source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(panorama9, DEMO_NOW)
    assert str(caught.value).count("no Azure credential produced a token") == 1  # said once, not per workspace
    assert fake.requests == []
    assert_no_secrets(managed_identity, str(caught.value))


@pytest.mark.parametrize("reply", [html_page(200), truncated({"tables": [{"name": "PrimaryResult", "columns": [
    {"name": "DeviceId", "type": "string"}], "rows": [["d-alpha"], ["d-bravo"]]}]})], ids=["html", "truncated"])
def test_a_malformed_answer_is_a_clear_error_and_gives_no_rows(source_for, fake, panorama9, reply):
    fake.then(reply)
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "not the query API's JSON" in str(caught.value)


@pytest.mark.parametrize("body", [
    {"tables": [{"name": "P", "columns": [{"name": "DeviceId", "type": "string"}], "rows": None}]},
    {"tables": [{"name": "P", "columns": [{"name": "DeviceId"}], "rows": [["d"]]}]},
    {"tables": [{"name": "P", "columns": [{"name": "DeviceId", "type": "string"}], "rows": [["d", "extra"]]}]},
    {"tables": {"name": "P"}},
    {"tables": [{"name": "P", "columns": [{"name": "DeviceId", "type": "string"}], "rows": [["d"]]}],
     "error": "PartialError"},
    [],
    "null",
    '{"tables": ' + "[" * 100_000 + "]" * 100_000 + "}",
], ids=["rows-null", "column-without-type", "row-longer-than-columns", "tables-an-object", "error-a-string",
        "a-json-array", "json-null", "nested-too-deep"])
def test_json_of_another_shape_is_a_clear_error_and_gives_no_rows(source_for, fake, panorama9, body):
    fake.then(Reply(200, body, {"Content-Type": "application/json"}))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    text = str(caught.value)
    assert WS_A in text and "HTTP 200" in text and "nothing was taken from it" in text
    assert "not a query result" in text or "not the query API's JSON" in text


def test_an_html_error_page_with_a_5xx_is_retried_then_reported(source_for, fake, panorama9):
    fake.then(html_page(502), html_page(502))
    with pytest.raises(QueryError) as caught:
        source_for(HTTP_RETRIES="1").query(panorama9, DEMO_NOW)
    assert len(fake.requests) == 2
    assert "HTTP 502" in str(caught.value) and "HTML error page" in str(caught.value)
    assert "<html" not in str(caught.value).lower()


def test_an_untrusted_certificate_is_a_clear_error(source_for, fake, panorama9, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(QueryError) as caught:
        source_for(HTTP_RETRIES="0").query(panorama9, DEMO_NOW)
    assert "could not reach Log Analytics" in str(caught.value) and "REQUESTS_CA_BUNDLE" in str(caught.value)


def test_a_dropped_connection_is_retried(source_for, fake, panorama9):
    fake.then(Reply(drop=True))
    result = source_for().query(panorama9, DEMO_NOW)
    assert len(fake.requests) == 2
    assert sorted(devices(result)) == ["d-alpha", "d-bravo"]


# --- several workspaces ---------------------------------------------------------------------------


def test_two_workspaces_without_tenantid_in_the_result_are_queried_each_on_its_own(source_for, fake, panorama9):
    result = source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(panorama9, DEMO_NOW)
    assert [r.path for r in fake.requests] == [f"/v1/workspaces/{WS_A}/query", f"/v1/workspaces/{WS_B}/query"]
    assert all(body["workspaces"] is None for body in fake.bodies())
    found = devices(result)
    assert sorted(found) == ["d-alpha", "d-bravo", "d-charlie"]
    assert found["d-alpha"].source == f"log_analytics:{WS_A}"
    assert found["d-charlie"].source == f"log_analytics:{WS_B}"
    assert found["d-bravo"].source == f"log_analytics:{WS_A}, log_analytics:{WS_B}"
    assert found["d-bravo"].report_ids == [201, 202] and found["d-bravo"].count == 2


def test_two_workspaces_with_tenantid_in_the_result_are_queried_together(source_for, fake, panorama9):
    by_workspace = detection_with(panorama9.query.rstrip() + ", TenantId\n", panorama9)
    result = source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(by_workspace, DEMO_NOW)
    [request] = fake.requests
    assert request.path == f"/v1/workspaces/{WS_A}/query"
    assert request.json()["workspaces"] == [WS_B]
    assert request.json()["query"] == by_workspace.query
    found = devices(result)
    assert found["d-alpha"].source == f"log_analytics:{WS_A}"
    assert found["d-charlie"].source == f"log_analytics:{WS_B}"
    assert found["d-bravo"].source in (f"log_analytics:{WS_A}, log_analytics:{WS_B}",
                                       f"log_analytics:{WS_B}, log_analytics:{WS_A}")


def test_a_workspace_without_the_role_does_not_hide_the_other_workspaces_devices(source_for, fake, panorama9):
    fake.denied.add(WS_B)
    result = source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(panorama9, DEMO_NOW)
    assert sorted(devices(result)) == ["d-alpha", "d-bravo"]
    [reason] = result.incomplete
    assert WS_B in reason and "Log Analytics Reader" in reason


@pytest.mark.parametrize("lacking", [WS_A, WS_B])
def test_a_workspace_without_the_table_does_not_hide_the_other_workspaces_devices(
    ca, trust_ca, managed_identity, make_settings, panorama9, lacking
):
    """Only one workspace streams DeviceFileCertificateInfo: the other answers 400 (SemanticError).
    That is this workspace's failure, reported with the service's message; the other's rows count."""
    having = WS_B if lacking == WS_A else WS_A
    workspaces = {lacking: {"Heartbeat": [{"Computer": "x", "TimeGenerated": "2026-05-31T00:00:00Z"}]},
                  having: {TABLE: ROWS_B}}
    with FakeLogAnalytics(ca, managed_identity, DEMO_NOW, workspaces) as server:
        source = LogAnalyticsSource(make_settings(QUERY_SOURCE="log_analytics", LOG_ANALYTICS_ENDPOINT=server.url,
                                                  LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}"))
        try:
            result = source.query(panorama9, DEMO_NOW)
        finally:
            source.close()
    assert len(server.requests) == 2
    found = devices(result)
    assert sorted(found) == ["d-bravo", "d-charlie"] and found["d-charlie"].source == f"log_analytics:{having}"
    [reason] = result.incomplete
    assert lacking in reason and "HTTP 400" in reason and "BadArgumentError" in reason
    assert TABLE in reason  # the service's own message names what this workspace lacks
    assert "fix the detection's KQL" not in reason


def test_one_workspace_without_the_table_fails_the_detection(ca, trust_ca, managed_identity, make_settings,
                                                              panorama9):
    with FakeLogAnalytics(ca, managed_identity, DEMO_NOW, {WS_A: {"Heartbeat": [{"Computer": "x"}]}}) as server:
        source = LogAnalyticsSource(make_settings(QUERY_SOURCE="log_analytics", LOG_ANALYTICS_ENDPOINT=server.url,
                                                  LOG_ANALYTICS_WORKSPACE_ID=WS_A))
        try:
            with pytest.raises(QueryError) as caught:
                source.query(panorama9, DEMO_NOW)
        finally:
            source.close()
    assert len(server.requests) == 1
    assert WS_A in str(caught.value) and "HTTP 400" in str(caught.value) and "BadArgumentError" in str(caught.value)


def test_a_combined_query_that_fails_falls_back_to_each_workspace(source_for, fake, panorama9):
    """A 403 on one workspace fails the combined request; asked on its own, the other still answers."""
    fake.denied.add(WS_B)
    by_workspace = detection_with(panorama9.query.rstrip() + ", TenantId\n", panorama9)
    result = source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(by_workspace, DEMO_NOW)
    assert [r.json()["workspaces"] for r in fake.requests] == [[WS_B], None, None]
    assert sorted(devices(result)) == ["d-alpha", "d-bravo"]
    [reason] = result.incomplete
    assert WS_B in reason and "HTTP 403" in reason


def test_a_combined_query_with_a_syntax_error_is_not_asked_again(source_for, fake, panorama9):
    broken = detection_with("DeviceFileCertificateInfo | where ( | project TenantId", panorama9)
    with pytest.raises(QueryError) as caught:
        source_for(LOG_ANALYTICS_WORKSPACE_ID=f"{WS_A},{WS_B}").query(broken, DEMO_NOW)
    assert len(fake.requests) == 1 and "fix the detection's KQL" in str(caught.value)


# --- links and the registry -----------------------------------------------------------------------


def test_the_registry_builds_the_source_and_links_come_from_trusted_parts(la_settings, panorama9):
    settings = la_settings()
    source = create_source(settings)
    try:
        assert isinstance(source, LogAnalyticsSource)
        urls = [link.url for link in source.links(panorama9, MACHINE_ID)]
        steered = [link.url for link in source.links(panorama9, "..")]
    finally:
        source.close()
    assert urls[0] == f"https://security.microsoft.com/machines/{MACHINE_ID}"
    assert urls[1].startswith("https://security.microsoft.com/v2/advanced-hunting?query=")
    assert all("127.0.0.1" not in url for url in urls)  # never the endpoint's text
    # A DeviceId that is no Defender machine id gets no device link: "/machines/.." is the portal's root.
    assert steered == urls[1:]


def test_a_sovereign_log_analytics_endpoint_gets_that_clouds_portals_for_every_link(make_settings, panorama9):
    """LOG_ANALYTICS_ENDPOINT in Azure Government with GRAPH_ENDPOINT left at its default: the
    Defender links are the government cloud's too, never the public cloud's."""
    source = LogAnalyticsSource(make_settings(QUERY_SOURCE="log_analytics", LOG_ANALYTICS_WORKSPACE_ID=WS_A,
                                              LOG_ANALYTICS_ENDPOINT="https://api.loganalytics.us"),
                                workspace_resource_ids=[RESOURCE_ID])
    try:
        urls = [link.url for link in source.links(panorama9, MACHINE_ID)]  # builds links only: no request
    finally:
        source.close()
    assert [url.split("/")[2] for url in urls] == ["security.microsoft.us", "security.microsoft.us", "portal.azure.us"]


def test_a_workspace_resource_id_adds_the_log_analytics_link(la_settings, panorama9):
    source = LogAnalyticsSource(la_settings(), workspace_resource_ids=[RESOURCE_ID])
    try:
        titles = [link.title for link in source.links(panorama9, MACHINE_ID)]
    finally:
        source.close()
    assert titles == ["Device in Microsoft Defender", "Query in advanced hunting", "Query in Log Analytics"]


# --- end to end: `python -m alerter run` and the timer function -----------------------------------


@pytest.fixture
def app_settings(fake, webhook_server, state_values, tmp_path, monkeypatch):
    """The Function App's application settings, as environment variables."""
    values = {
        "QUERY_SOURCE": "log_analytics",
        "LOG_ANALYTICS_WORKSPACE_ID": f"{WS_A},{WS_B}",
        "LOG_ANALYTICS_ENDPOINT": fake.url,
        "WEBHOOK_URL": webhook_server.url + "/hook",
        "DETECTIONS_PATH": str(ROOT / "detections"),
        "HTTP_TIMEOUT": "5",
        "HTTP_RETRIES": "1",
        **state_values,
    }
    for name in ("DETECTIONS", "LOCAL_DATA_PATH", "TEAMS_WEBHOOK_URL", "EMAIL_TO", "SUPPRESSIONS_PATH",
                 "STATE_CONNECTION", "AzureWebJobsStorage", "STATE_TABLE_ENDPOINT", "REALERT_AFTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def posted_sightings(webhook_server) -> list[dict[str, Any]]:
    found = []
    for request in webhook_server.requests:
        payload = request.json()
        assert payload["schema"] == "alerter.sightings/1"
        assert payload["detection"]["id"] == PANORAMA9_ID
        found.extend(payload["sightings"])
    return found


@BOTH_STORES
def test_alerter_run_delivers_the_right_devices_to_the_ledger_and_the_webhook(
    app_settings, fake, webhook_server, managed_identity, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    assert cli.main(["run"]) == 0
    out = capsys.readouterr()
    sent = {s["deviceId"]: s for s in posted_sightings(webhook_server)}
    assert sorted(sent) == ["d-alpha", "d-bravo", "d-charlie"]
    assert sent["d-charlie"]["source"] == f"log_analytics:{WS_B}"
    assert sent["d-alpha"]["firstSeen"] == "2026-05-30T08:15:00.123456Z"
    assert sent["d-alpha"]["reportIds"] == [101, 102]
    # "d-alpha" is no Defender machine id (40 hex digits): no device link, the query links only.
    assert [link["title"] for link in sent["d-alpha"]["links"]] == ["Query in advanced hunting"]
    known = open_store(Settings.load()).known(PANORAMA9_ID)
    assert sorted(known) == ["d-alpha", "d-bravo", "d-charlie"]
    assert "3 new" in out.out
    assert_no_secrets(managed_identity, out.out, out.err, caplog.text)

    # The next run finds the same devices and sends nothing new.
    assert cli.main(["run"]) == 0
    assert len(webhook_server.requests) == 1
    assert "0 new" in capsys.readouterr().out


@BOTH_STORES
def test_a_partial_result_is_delivered_and_the_run_exits_1(app_settings, fake, webhook_server, caplog):
    fake.partial_error = partial_error("Query execution has exceeded the allowed limits (E_RUNAWAY_QUERY)")
    assert cli.main(["run"]) == 1
    assert sorted(s["deviceId"] for s in posted_sightings(webhook_server)) == ["d-alpha", "d-bravo", "d-charlie"]
    assert "E_RUNAWAY_QUERY" in caplog.text and "incomplete" in caplog.text


@BOTH_STORES
def test_a_failed_query_sends_nothing_and_loses_nothing(app_settings, fake, webhook_server, caplog):
    fake.then(html_page(200), html_page(200))
    assert cli.main(["run"]) == 1
    assert webhook_server.requests == []
    assert "not the query API's JSON" in caplog.text
    # The next tick: the service answers, and every device is delivered.
    assert cli.main(["run"]) == 0
    assert len(posted_sightings(webhook_server)) == 3


@BOTH_STORES
def test_a_refused_query_names_its_detection_and_does_not_silence_the_others(
    app_settings, fake, webhook_server, tmp_path, monkeypatch, capsys, caplog
):
    folder = tmp_path / "detections"
    folder.mkdir()
    (folder / "panorama9-filesig.yaml").write_text((ROOT / "detections" / "panorama9-filesig.yaml").read_text())
    (folder / "unknown-table.yaml").write_text(
        "id: 0b0b0b0b-0000-4000-8000-000000000000\nname: Hunting a table this workspace lacks\n"
        "query: |\n  NoSuchTable\n  | summarize by DeviceId, DeviceName\n"
    )
    monkeypatch.setenv("DETECTIONS_PATH", str(folder))
    assert cli.main(["run"]) == 1
    summary = capsys.readouterr().out
    assert "Hunting a table this workspace lacks: QUERY FAILED" in summary and "BadArgumentError" in summary
    assert "Hunting a table this workspace lacks" in caplog.text and "unknown-table.yaml" in caplog.text
    assert sorted(s["deviceId"] for s in posted_sightings(webhook_server)) == ["d-alpha", "d-bravo", "d-charlie"]
    refused = [body for body in fake.bodies() if body["query"].startswith("NoSuchTable")]
    # A table one workspace lacks may be in another: each is asked once, neither is retried.
    assert len(refused) == 2
    assert "semantic error" in caplog.text and "fix the detection's KQL" not in caplog.text


@BOTH_STORES
def test_the_timer_function_delivers_the_right_devices(app_settings, fake, webhook_server, monkeypatch):
    from azure.functions.timer import TimerRequest

    monkeypatch.setenv("ALERT_SCHEDULE", "0 0 */4 * * *")
    import function_app

    function_app = importlib.reload(function_app)  # get_functions() may be called once per app object
    [timer] = function_app.app.get_functions()
    timer.get_user_function()(TimerRequest(past_due=False))
    assert sorted(s["deviceId"] for s in posted_sightings(webhook_server)) == ["d-alpha", "d-bravo", "d-charlie"]
    assert {body["query"] for body in fake.bodies()} == {
        d.query for d in load_detections(Path(app_settings["DETECTIONS_PATH"]), ()).detections
    }


@BOTH_STORES
def test_the_timer_function_fails_loudly_when_the_role_is_missing(app_settings, fake, webhook_server, caplog):
    from azure.functions.timer import TimerRequest

    import function_app

    function_app = importlib.reload(function_app)
    [timer] = function_app.app.get_functions()
    fake.denied.update({WS_A, WS_B})
    with pytest.raises(function_app.CycleFailed):
        timer.get_user_function()(TimerRequest(past_due=False))
    assert webhook_server.requests == []
    assert "Log Analytics Reader" in caplog.text


@BOTH_STORES
def test_the_webhook_payload_is_json(app_settings, webhook_server):
    assert cli.main(["run"]) == 0
    body = webhook_server.requests[0].body
    assert json.loads(body)["total"] == 3
