"""Investigation links: the portals' formats, escaping, and nothing from untrusted text."""

from __future__ import annotations

import base64
import gzip
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from alerter import links
from alerter.links import (
    Portals,
    advanced_hunting_link,
    advanced_hunting_url,
    defender_device_url,
    device_link,
    encode_hunting_query,
    encode_log_analytics_query,
    log_analytics_link,
    log_analytics_query_url,
)
from alerter.model import Detection
from alerter.sources.local import LocalSource
from tests.conftest import DEMO_NOW, cert_row, write_rows

MACHINE_ID = "5f0b3c9e2a7d41e8b6c4a3f2e1d0c9b8a7f6e5d4"  # a Defender DeviceId: 40 hex digits
QUERY = (
    "let Time_start = now(-5d);\n//\nDeviceFileCertificateInfo\n| where Signer has 'Panorama9'\n"
    "| summarize Report=make_set(ReportId) by DeviceId, DeviceName // naïve ünicode + / = & # ?\n"
)
DETECTION = Detection(id="d", name="n", query=QUERY, path="p.yaml")
RESOURCE_ID = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/soc-rg/providers/"
               "Microsoft.OperationalInsights/workspaces/soc-sentinel")


def decode_hunting(value: str) -> str:
    return gzip.decompress(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))).decode("utf-16-le")


def decode_log_analytics(segment: str) -> str:
    return gzip.decompress(base64.b64decode(unquote(unquote(segment)))).decode("utf-8")


# --- Defender ------------------------------------------------------------------------------------


def test_device_page_is_linked_for_a_defender_machine_id():
    assert defender_device_url(MACHINE_ID) == f"https://security.microsoft.com/machines/{MACHINE_ID}"
    assert defender_device_url(f" {MACHINE_ID.upper()} ") == f"https://security.microsoft.com/machines/{MACHINE_ID.upper()}"
    assert device_link(MACHINE_ID).url == defender_device_url(MACHINE_ID)


@pytest.mark.parametrize("device_id", [
    "", "  ", "..", ".", "../../v2/x?y=1#z", "%2e%2e", "4f1c0a9e2d", MACHINE_ID[:-1], MACHINE_ID + "0",
    MACHINE_ID[:-1] + "g", MACHINE_ID[:-2] + "/.", "d-alpha", "0b6e5a3c-1d2f-4a8b-9c0d-1e2f3a4b5c6d",
    MACHINE_ID[:20] + "\n" + MACHINE_ID[20:39],
])
def test_a_device_id_that_is_no_defender_machine_id_gets_no_device_link(device_id):
    """A result's DeviceId is the data's text: `quote("..")` keeps `..`, and `/machines/..` is the
    portal's root. Only a Defender machine id (40 hex digits) is linked."""
    assert defender_device_url(device_id) is None and device_link(device_id) is None


def test_advanced_hunting_link_carries_the_query_as_utf16_gzip_base64url():
    url = advanced_hunting_url(QUERY)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "security.microsoft.com", "/v2/advanced-hunting")
    params = parse_qs(parts.query)
    assert params["timeRangeId"] == ["month"]  # 30 days: never narrower than the query's own window
    [value] = params["query"]
    assert value == encode_hunting_query(QUERY)
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")  # url-safe, no padding
    assert value.startswith("H4sI")  # gzip's magic number, as in the portal's own share links
    assert decode_hunting(value) == QUERY


def test_links_are_stable_across_runs():
    assert advanced_hunting_url(QUERY) == advanced_hunting_url(QUERY)
    assert encode_log_analytics_query(QUERY) == encode_log_analytics_query(QUERY)


# --- Log Analytics -------------------------------------------------------------------------------


def test_log_analytics_link_matches_the_documented_format():
    # Microsoft Learn's KQL training links the query "Heartbeat\n| take 10" to the Logs blade as
    # .../source/LogsBlade.AnalyticsShareLinkToQuery/q/<this segment>/timespan/P1D:
    documented = "H4sIAAAAAAAAA%252FNITSwqSUpNLOGqUShJzE5VMDQAAFjdyScTAAAA"
    assert decode_log_analytics(documented) == "Heartbeat\n| take 10"
    # The same decoding reads what we write.
    assert decode_log_analytics(encode_log_analytics_query(QUERY)) == QUERY


def test_log_analytics_link_points_at_the_workspace_resource():
    url = log_analytics_query_url(RESOURCE_ID, QUERY)
    head, _, segment_and_tail = url.partition("/q/")
    assert head == (
        "https://portal.azure.com/#blade/Microsoft_Azure_Monitoring_Logs/LogsBlade/resourceId/"
        "%2Fsubscriptions%2F00000000-1111-2222-3333-444444444444%2FresourceGroups%2Fsoc-rg%2Fproviders%2F"
        "Microsoft.OperationalInsights%2Fworkspaces%2Fsoc-sentinel/source/LogsBlade.AnalyticsShareLinkToQuery"
    )
    segment, _, timespan = segment_and_tail.partition("/timespan/")
    assert timespan == "P30D"
    assert "/" not in segment and "+" not in segment and "=" not in segment
    assert decode_log_analytics(segment) == QUERY


@pytest.mark.parametrize("resource", [
    "", "soc-sentinel", "11111111-aaaa-4aaa-8aaa-111111111111",
    RESOURCE_ID + "/../../evil", RESOURCE_ID.replace("workspaces", "vaults"), "https://evil.example/" + RESOURCE_ID,
])
def test_only_a_workspace_resource_id_makes_a_log_analytics_link(resource):
    assert log_analytics_query_url(resource, QUERY) is None
    assert log_analytics_link(DETECTION, resource) is None


# --- portals by cloud, never from endpoint text ----------------------------------------------------


def test_portals_come_from_a_fixed_table():
    assert Portals.for_endpoints(log_analytics="https://api.loganalytics.io", graph="https://graph.microsoft.com") \
        == Portals("https://security.microsoft.com", "https://portal.azure.com")
    us = Portals.for_endpoints(log_analytics="https://api.loganalytics.us", graph="https://graph.microsoft.us/")
    assert us == Portals("https://security.microsoft.us", "https://portal.azure.us")
    assert Portals.for_endpoints(log_analytics="https://api.loganalytics.azure.cn").azure == "https://portal.azure.cn"
    odd = Portals.for_endpoints(log_analytics="https://evil.example/x?y", graph="https://127.0.0.1:8443")
    assert odd == Portals()
    link = advanced_hunting_link(DETECTION, odd)
    assert link.url.startswith("https://security.microsoft.com/") and "evil" not in link.url


def test_a_sovereign_log_analytics_cloud_picks_the_defender_portal_when_graph_is_left_at_its_default():
    """LOG_ANALYTICS_ENDPOINT in Azure Government, GRAPH_ENDPOINT at its default: device and hunting
    links must open the government cloud's Defender portal, not the public one."""
    us = Portals.for_endpoints(log_analytics="https://api.loganalytics.us", graph="https://graph.microsoft.com")
    assert us == Portals("https://security.microsoft.us", "https://portal.azure.us")
    assert device_link(MACHINE_ID, us).url.startswith("https://security.microsoft.us/machines/")
    assert advanced_hunting_link(DETECTION, us).url.startswith("https://security.microsoft.us/v2/advanced-hunting?")
    # A test server or proxy as GRAPH_ENDPOINT says nothing about the cloud: the Log Analytics one decides.
    assert Portals.for_endpoints(log_analytics="https://api.loganalytics.us",
                                 graph="https://127.0.0.1:8443").defender == "https://security.microsoft.us"
    # The public cloud's Log Analytics keeps the public Defender portal.
    assert Portals.for_endpoints(log_analytics="https://api.loganalytics.azure.com").defender \
        == "https://security.microsoft.com"


def test_a_sovereign_graph_endpoint_decides_the_defender_portal():
    # DoD shares Azure Government's Log Analytics with GCC High; its Graph endpoint tells them apart.
    dod = Portals.for_endpoints(log_analytics="https://api.loganalytics.us", graph="https://dod-graph.microsoft.us")
    assert dod == Portals("https://security.apps.mil", "https://portal.azure.us")
    assert Portals.for_endpoints(graph="https://dod-graph.microsoft.us/").defender == "https://security.apps.mil"
    assert Portals.for_endpoints(graph="https://graph.microsoft.us").defender == "https://security.microsoft.us"


def test_titles_are_fixed_text():
    assert device_link(MACHINE_ID).title == links.DEVICE_TITLE
    assert advanced_hunting_link(DETECTION).title == links.HUNTING_TITLE
    assert log_analytics_link(DETECTION, RESOURCE_ID).title == links.LOG_ANALYTICS_TITLE


# --- the local source -------------------------------------------------------------------------------


def test_the_local_source_links_the_device_page_only(make_settings, data_dir):
    write_rows(data_dir, [cert_row(MACHINE_ID, "PC-1", "2026-05-30T00:00:00Z")])
    source = LocalSource(make_settings())
    try:
        assert source.query(DETECTION, DEMO_NOW) is not None
        assert [link.url for link in source.links(DETECTION, MACHINE_ID)] == [
            f"https://security.microsoft.com/machines/{MACHINE_ID}"]
        assert source.links(DETECTION, "") == [] and source.links(DETECTION, "..") == []
    finally:
        source.close()
