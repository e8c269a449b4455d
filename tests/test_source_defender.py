"""QUERY_SOURCE=defender: the project's Graph client (requests session from alerter.http, token from
the real DefaultAzureCredential via a local managed-identity endpoint) against a local HTTPS
runHuntingQuery that runs the received KQL over test rows."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from alerter import cli
from alerter.detections import load_detections
from alerter.ledger import open_store
from alerter.model import Detection
from alerter.settings import Settings
from alerter.sightings import to_sightings
from alerter.sources import QueryError, create_source
from alerter.sources.defender import DefenderSource
from alerter.sources.local import LocalSource
from alerter.sources.log_analytics import LogAnalyticsSource
from tests.conftest import BOTH_STORES, DEMO_NOW, PANORAMA9_ID, ROOT, cert_row, sqlite_unless_asked, write_rows  # noqa: F401 - sqlite_unless_asked is the module's state_values
from tests.support.graph import FakeGraph, graph_error, quota_exceeded
from tests.support.http_server import Reply
from tests.support.identity import ManagedIdentityEndpoint
from tests.support.log_analytics import FakeLogAnalytics, html_page, truncated

TABLE = "DeviceFileCertificateInfo"
WS = "33333333-cccc-4ccc-8ccc-333333333333"

ROWS = [
    cert_row("d-alpha", "ALPHA-PC", "2026-05-30T08:15:00.1234567Z", report=101),
    cert_row("d-alpha", "alpha-pc-renamed", "2026-05-31T09:00:00Z", report=102),
    cert_row("d-bravo", "bravo-laptop", "2026-05-28T12:00:00Z", report=201),
    cert_row("d-bravo", "bravo-laptop", "2026-05-28T12:00:00Z", report=201),
    cert_row("", "NO-ID-PC", "2026-05-29T01:02:03Z", report=701),
    cert_row("d-old", "OLD-PC", "2026-05-20T00:00:00Z", report=301),  # before the window
    cert_row("d-other", "OTHER-PC", "2026-05-30T00:00:00Z", signer="NotPanorama9Corp", report=401),
    cert_row("d-lower", "LOWER-PC", "2026-05-30T00:00:00Z", signer="panorama9 inc", report=801),
]
EXPECTED = ["d-alpha", "d-bravo", "d-lower", "no-id-pc"]
MACHINE_ID = "5f0b3c9e2a7d41e8b6c4a3f2e1d0c9b8a7f6e5d4"  # a Defender DeviceId: 40 hex digits


@pytest.fixture
def panorama9() -> Detection:
    [detection] = [d for d in load_detections(ROOT / "detections", ()).detections if d.id == PANORAMA9_ID]
    return detection


@pytest.fixture
def fake(ca, trust_ca, managed_identity) -> Iterator[FakeGraph]:
    with FakeGraph(ca, managed_identity, DEMO_NOW, {TABLE: ROWS}) as server:
        yield server


@pytest.fixture
def source_for(make_settings, fake):
    made: list[Any] = []

    def build(**overrides: str) -> DefenderSource:
        source = DefenderSource(make_settings(QUERY_SOURCE="defender", GRAPH_ENDPOINT=fake.url, **overrides))
        made.append(source)
        return source

    yield build
    for source in made:
        source.close()


def by_device(result) -> dict[str, Any]:
    sightings, _ = to_sightings(result.batches)
    return {s.device_key: s for s in sightings}


def comparable(sightings: dict[str, Any]) -> dict[str, tuple]:
    return {
        key: (s.device_id, s.device_name, s.first_seen, s.last_seen, s.count, s.report_ids, sorted(s.device_names))
        for key, s in sightings.items()
    }


def assert_no_secrets(identity: ManagedIdentityEndpoint, *texts: str) -> None:
    for secret in identity.secret_values:
        for text in texts:
            assert secret not in text


# --- the request on the wire ----------------------------------------------------------------------


def test_posts_the_kql_unchanged_with_no_timespan_and_the_graph_token(source_for, fake, panorama9, managed_identity):
    result = source_for().query(panorama9, DEMO_NOW)
    [request] = fake.requests
    assert request.method == "POST" and request.path == "/v1.0/security/runHuntingQuery"
    assert request.json() == {"Query": panorama9.query}  # no Timespan: the service's 30 days, never cut
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.headers["Authorization"] == managed_identity.bearer(fake.url)
    assert managed_identity.resources() == [fake.url]  # scope {GRAPH_ENDPOINT}/.default

    found = by_device(result)
    assert sorted(found) == EXPECTED
    alpha = found["d-alpha"]
    assert alpha.source == "defender"
    assert alpha.first_seen.isoformat() == "2026-05-30T08:15:00.123456+00:00"
    assert alpha.device_name == "alpha-pc-renamed" and sorted(alpha.device_names) == ["ALPHA-PC", "alpha-pc-renamed"]
    assert found["d-bravo"].count == 2 and found["d-bravo"].report_ids == [201]
    assert result.incomplete == []


def test_the_same_sightings_come_out_as_from_log_analytics_and_the_local_source(
    ca, trust_ca, managed_identity, make_settings, data_dir, fake, panorama9
):
    write_rows(data_dir, ROWS)
    with FakeLogAnalytics(ca, managed_identity, DEMO_NOW, {WS: {TABLE: ROWS}}) as log_analytics:
        sources = {
            "defender": DefenderSource(make_settings(QUERY_SOURCE="defender", GRAPH_ENDPOINT=fake.url)),
            "log_analytics": LogAnalyticsSource(make_settings(
                QUERY_SOURCE="log_analytics", LOG_ANALYTICS_WORKSPACE_ID=WS, LOG_ANALYTICS_ENDPOINT=log_analytics.url)),
            "local": LocalSource(make_settings()),
        }
        try:
            results = {name: comparable(by_device(s.query(panorama9, DEMO_NOW))) for name, s in sources.items()}
        finally:
            for source in sources.values():
                source.close()
    assert sorted(results["defender"]) == EXPECTED
    assert results["defender"] == results["log_analytics"] == results["local"]
    # Each service really computed its answer from the query it received.
    assert log_analytics.answers[0][2] == 5 and fake.answers[0][1] == 5  # ALPHA-PC was renamed: 2 rows


@pytest.mark.parametrize("casing, dynamic_as", [("lower", "json"), ("upper", "json"), ("lower", "string"),
                                                ("upper", "string")])
def test_both_casings_and_both_forms_of_dynamic_are_read(ca, trust_ca, managed_identity, make_settings,
                                                         panorama9, casing, dynamic_as):
    with FakeGraph(ca, managed_identity, DEMO_NOW, {TABLE: ROWS}, casing=casing, dynamic_as=dynamic_as) as graph:
        source = DefenderSource(make_settings(QUERY_SOURCE="defender", GRAPH_ENDPOINT=graph.url))
        try:
            result = source.query(panorama9, DEMO_NOW)
        finally:
            source.close()
    found = by_device(result)
    assert sorted(found) == EXPECTED
    assert found["d-alpha"].report_ids == [101, 102]


def test_values_are_typed_by_the_declared_schema(source_for, fake, panorama9):
    fake.then(Reply(200, {"Schema": [
        {"Name": "DeviceId", "Type": "String"}, {"Name": "DeviceName", "Type": "String"},
        {"Name": "FirstSeen", "Type": "DateTime"}, {"Name": "LastSeen", "Type": "DateTime"},
        {"Name": "Report", "Type": "Object"}, {"Name": "Count", "Type": "Int64"}, {"Name": "IsTrusted", "Type": "Boolean"},
    ], "Results": [
        {"DeviceId": "d1", "DeviceName": "PC-1", "FirstSeen": "2026-05-30T08:15:00.1234567Z",
         "LastSeen": "2026-05-30T09:00:00Z", "Report": "[101,102]", "Count": 2, "IsTrusted": True},
        {"DeviceId": "d2", "DeviceName": None, "FirstSeen": None, "LastSeen": "2026-05-29T23:59:59.9999999Z",
         "Report": [], "Count": "1"},
    ]}))
    [(label, rows)] = source_for().query(panorama9, DEMO_NOW).batches
    assert label == "defender"
    first, second = rows
    assert first["FirstSeen"].isoformat() == "2026-05-30T08:15:00.123456+00:00"
    assert first["Report"] == [101, 102] and first["Count"] == 2 and first["IsTrusted"] is True
    assert second["DeviceName"] is None and second["FirstSeen"] is None and second["Count"] == 1
    assert second["IsTrusted"] is None and second["Report"] == []


@pytest.mark.parametrize("kind, value", [
    ("Int64", "--1"), ("Int64", "\u00b2"), ("Int64", "9" * 5000),
    ("DateTime", "9999-12-31T23:59:59-01:00"), ("DateTime", "0001-01-01T00:00:00+01:00"),
    ("Object", "[" * 100_000 + "]" * 100_000),
], ids=["double-minus", "superscript-two", "5000-digits", "past-9999-in-utc", "before-year-1", "nested-too-deep"])
def test_a_cell_that_is_not_its_declared_type_fails_the_detection_clearly(source_for, fake, panorama9, kind, value):
    fake.then(Reply(200, {"schema": [{"name": "DeviceId", "type": "String"}, {"name": "X", "type": kind}],
                          "results": [{"DeviceId": "d1", "X": value}]}))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "advanced hunting result: row 1, column X" in str(caught.value)


def test_a_result_at_the_100000_row_cap_is_reported_as_possibly_cut(source_for, fake, panorama9):
    fake.row_limit = 3  # the service cuts silently at 100,000; the check is the same
    source = source_for()
    source.row_limit = 3
    result = source.query(panorama9, DEMO_NOW)
    assert sum(len(rows) for _, rows in result.batches) == 3  # the rows that came are still used
    [reason] = result.incomplete
    assert "returned 3 rows" in reason and "limit is 3" in reason


# --- throttling and outages -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    quota_exceeded("1"), quota_exceeded(None),
    graph_error(503, "ServiceUnavailable", "Service unavailable"), graph_error(504, "GatewayTimeout", "Timed out"),
], ids=["429-retry-after", "429-no-retry-after", "503", "504"])
def test_throttling_and_outages_are_retried_with_backoff(source_for, fake, panorama9, fault):
    fake.then(fault)
    started = time.monotonic()
    result = source_for().query(panorama9, DEMO_NOW)
    assert time.monotonic() - started >= 0.9
    assert len(fake.requests) == 2
    assert sorted(by_device(result)) == EXPECTED


def test_a_dropped_connection_is_retried(source_for, fake, panorama9):
    fake.then(Reply(drop=True))
    result = source_for().query(panorama9, DEMO_NOW)
    assert len(fake.requests) == 2
    assert sorted(by_device(result)) == EXPECTED


def test_an_untrusted_certificate_is_a_clear_error(source_for, fake, panorama9, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(QueryError) as caught:
        source_for(HTTP_RETRIES="0").query(panorama9, DEMO_NOW)
    assert "certificate not trusted" in str(caught.value) and "REQUESTS_CA_BUNDLE" in str(caught.value)


def test_the_quotas_15_minute_wait_is_not_waited_out(source_for, fake, panorama9):
    fake.then(quota_exceeded("900"))
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert time.monotonic() - started < 5
    assert len(fake.requests) == 1
    text = str(caught.value)
    assert "HTTP 429" in text and "TooManyRequests" in text and "Retry-After 900 s" in text
    assert "next run retries" in text


def test_throttling_that_outlasts_the_retries_fails_loudly(source_for, fake, panorama9):
    fake.then(quota_exceeded("1"), quota_exceeded("1"), quota_exceeded("1"))
    with pytest.raises(QueryError) as caught:
        source_for(HTTP_RETRIES="1").query(panorama9, DEMO_NOW)
    assert len(fake.requests) == 2
    assert "HTTP 429" in str(caught.value) and "after 1 retries" in str(caught.value)


def test_retries_stop_at_the_runs_query_budget(source_for, fake, panorama9):
    fake.then(graph_error(503, "ServiceUnavailable", "busy", {"Retry-After": "5"}))
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for(RUN_BUDGET="3s").query(panorama9, DEMO_NOW)
    assert time.monotonic() - started < 3
    assert len(fake.requests) == 1
    assert "RUN_BUDGET" in str(caught.value)


def test_every_attempt_waits_only_as_long_as_the_budget_has_left(source_for, fake, panorama9):
    """RUN_BUDGET=6s: queries may use 3.6 s. A 503 after 0.5 s, a retry after 1 s, then a service that
    takes 5 s: the retry's read timeout is what is left (2.1 s), not the first attempt's 3.6 s."""
    busy = graph_error(503, "ServiceUnavailable", "busy")
    busy.delay = 0.5
    slow = Reply(200, {"schema": [{"name": "DeviceId", "type": "String"}], "results": [{"DeviceId": "d1"}]}, delay=5)
    fake.then(busy, slow)
    started = time.monotonic()
    with pytest.raises(QueryError) as caught:
        source_for(RUN_BUDGET="6s", HTTP_RETRIES="3").query(panorama9, DEMO_NOW)
    assert time.monotonic() - started < 4.3
    assert len(fake.requests) == 2  # and no third attempt: nothing is left to make it with
    assert "RUN_BUDGET" in str(caught.value) and "the next run retries" in str(caught.value)


# --- errors that retrying does not fix ------------------------------------------------------------


def test_a_bad_query_is_named_and_not_retried(source_for, fake, panorama9):
    broken = Detection(id="broken", name="broken", query="DeviceFileCertificateInfo | where (", path="x.yaml")
    with pytest.raises(QueryError) as caught:
        source_for().query(broken, DEMO_NOW)
    assert len(fake.requests) == 1
    text = str(caught.value)
    assert "HTTP 400" in text and "BadRequest: Query could not be parsed" in text and "fix the detection's KQL" in text


def test_a_trailing_slash_in_the_graph_endpoint_still_asks_for_the_right_scope(
    make_settings, fake, panorama9, managed_identity
):
    # GRAPH_ENDPOINT with a trailing slash: the scope must still be exactly {endpoint}/.default.
    source = DefenderSource(make_settings(QUERY_SOURCE="defender", GRAPH_ENDPOINT=fake.url + "/"))
    try:
        assert source.query(panorama9, DEMO_NOW).batches
    finally:
        source.close()
    assert managed_identity.resources() == [fake.url]


def test_a_missing_permission_gets_403_and_the_permission_is_explained(source_for, fake, panorama9,
                                                                      managed_identity, caplog):
    caplog.set_level(logging.DEBUG)
    fake.permitted = False
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    text = str(caught.value)
    assert "HTTP 403" in text and "'ThreatHunting.Read.All'" in text and "admin consent" in text
    assert len(fake.requests) == 1
    assert_no_secrets(managed_identity, text, caplog.text)


def test_a_rejected_token_gets_401(source_for, fake, panorama9, managed_identity):
    fake.then(graph_error(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience."))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "HTTP 401" in str(caught.value) and "ThreatHunting.Read.All" in str(caught.value)
    assert len(fake.requests) == 1


def test_no_managed_identity_token_is_a_clear_error(source_for, fake, panorama9, managed_identity):
    managed_identity.refuse = 400
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "no Azure credential produced a token" in str(caught.value)
    assert fake.requests == []


@pytest.mark.parametrize("reply", [html_page(200), truncated({"schema": [{"name": "DeviceId", "type": "String"}],
                                                              "results": [{"DeviceId": "d-alpha"}]})],
                         ids=["html", "truncated"])
def test_a_malformed_answer_is_a_clear_error(source_for, fake, panorama9, reply):
    fake.then(reply)
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "not JSON" in str(caught.value)


def test_json_nested_deeper_than_python_decodes_is_a_clear_error(source_for, fake, panorama9):
    fake.then(Reply(200, '{"schema": ' + "[" * 100_000 + "]" * 100_000 + "}", {"Content-Type": "application/json"}))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "JSON nested too deep to read" in str(caught.value)


def test_an_answer_without_schema_and_results_is_refused(source_for, fake, panorama9):
    fake.then(Reply(200, {"value": []}))
    with pytest.raises(QueryError) as caught:
        source_for().query(panorama9, DEMO_NOW)
    assert "without schema and results" in str(caught.value)


# --- links and the registry -----------------------------------------------------------------------


def test_the_registry_builds_the_source_and_its_links(make_settings, fake, panorama9):
    source = create_source(make_settings(QUERY_SOURCE="defender", GRAPH_ENDPOINT=fake.url))
    try:
        assert isinstance(source, DefenderSource)
        links = source.links(panorama9, MACHINE_ID)
        assert source.links(panorama9, "") == links[1:]  # no device link without a DeviceId
        assert source.links(panorama9, "..") == links[1:]  # nor for one that is no Defender machine id
    finally:
        source.close()
    assert [link.title for link in links] == ["Device in Microsoft Defender", "Query in advanced hunting"]
    assert links[0].url == f"https://security.microsoft.com/machines/{MACHINE_ID}"


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def app_settings(fake, webhook_server, state_values, monkeypatch):
    values = {
        "QUERY_SOURCE": "defender",
        "GRAPH_ENDPOINT": fake.url,
        "WEBHOOK_URL": webhook_server.url + "/hook",
        "DETECTIONS_PATH": str(ROOT / "detections"),
        "HTTP_TIMEOUT": "5",
        "HTTP_RETRIES": "1",
        **state_values,
    }
    for name in ("DETECTIONS", "LOCAL_DATA_PATH", "TEAMS_WEBHOOK_URL", "EMAIL_TO", "SUPPRESSIONS_PATH",
                 "STATE_CONNECTION", "AzureWebJobsStorage", "STATE_TABLE_ENDPOINT", "REALERT_AFTER",
                 "LOG_ANALYTICS_WORKSPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def posted(webhook_server) -> dict[str, dict[str, Any]]:
    found = {}
    for request in webhook_server.requests:
        payload = request.json()
        assert payload["schema"] == "alerter.sightings/1" and payload["detection"]["id"] == PANORAMA9_ID
        found.update({s["deviceId"] or s["deviceName"]: s for s in payload["sightings"]})
    return found


@BOTH_STORES
def test_alerter_run_delivers_the_right_devices(app_settings, fake, webhook_server, managed_identity, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert cli.main(["run"]) == 0
    sent = posted(webhook_server)
    assert sorted(sent) == ["NO-ID-PC", "d-alpha", "d-bravo", "d-lower"]
    assert sent["d-alpha"]["source"] == "defender" and sent["d-alpha"]["reportIds"] == [101, 102]
    # "d-alpha" is no Defender machine id (40 hex digits): no device link, the query link only.
    assert [link["title"] for link in sent["d-alpha"]["links"]] == ["Query in advanced hunting"]
    assert sorted(open_store(Settings.load()).known(PANORAMA9_ID)) == EXPECTED
    out = capsys.readouterr()
    assert "4 new" in out.out
    assert_no_secrets(managed_identity, out.out, out.err, caplog.text)
    assert cli.main(["run"]) == 0
    assert len(webhook_server.requests) == 1


@BOTH_STORES
def test_the_timer_function_delivers_the_right_devices(app_settings, fake, webhook_server):
    from azure.functions.timer import TimerRequest

    import function_app

    function_app = importlib.reload(function_app)
    [timer] = function_app.app.get_functions()
    timer.get_user_function()(TimerRequest(past_due=False))
    assert sorted(posted(webhook_server)) == ["NO-ID-PC", "d-alpha", "d-bravo", "d-lower"]


@BOTH_STORES
def test_the_timer_function_fails_loudly_without_the_permission(app_settings, fake, webhook_server, caplog):
    from azure.functions.timer import TimerRequest

    import function_app

    function_app = importlib.reload(function_app)
    [timer] = function_app.app.get_functions()
    fake.permitted = False
    with pytest.raises(function_app.CycleFailed):
        timer.get_user_function()(TimerRequest(past_due=False))
    assert webhook_server.requests == []
    assert "ThreatHunting.Read.All" in caplog.text
