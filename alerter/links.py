"""Investigation links for a sighting, built from trusted parts only.

The parts are fixed portal addresses, ids (escaped), and the detection's own KQL (encoded). Never
text from a query result (device names are attacker-controlled) and never a configured endpoint's
text: an endpoint only selects one of the fixed portals below (a sovereign cloud's portal).

Formats (checked against Microsoft's own links; see docs/sources.md):

- Defender device page: `https://security.microsoft.com/machines/<DeviceId>`, only for a DeviceId
  that is a Defender machine id (40 hex digits): any other text could steer the path (`..`).
- Advanced hunting with the query pre-filled:
  `https://security.microsoft.com/v2/advanced-hunting?query=<q>&timeRangeId=month`, where `<q>` is
  the KQL as UTF-16LE, gzip-compressed, base64url-encoded without padding (the portal's own
  "share link" format).
- Log Analytics with the query pre-filled (needs the workspace's Azure resource id):
  `https://portal.azure.com/#blade/Microsoft_Azure_Monitoring_Logs/LogsBlade/resourceId/<id>/source/
  LogsBlade.AnalyticsShareLinkToQuery/q/<q>/timespan/P30D`, where `<q>` is the KQL as UTF-8,
  gzip-compressed, base64-encoded and then URL-escaped twice (as in Microsoft Learn's links).

The time range is the widest the portal offers for hunting (30 days), so a link never cuts the
query's own window, the same rule the sources follow for the API's timespan.
"""

from __future__ import annotations

import base64
import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

from alerter.model import Detection, Link

DEFENDER_PORTAL = "https://security.microsoft.com"
AZURE_PORTAL = "https://portal.azure.com"
HUNTING_TIME_RANGE = "month"
LOG_ANALYTICS_TIMESPAN = "P30D"

DEVICE_TITLE = "Device in Microsoft Defender"
HUNTING_TITLE = "Query in advanced hunting"
LOG_ANALYTICS_TITLE = "Query in Log Analytics"

# Known service hosts -> their portals. Anything else (a test server, a proxy) gets the public cloud.
# Defender portals of the US government clouds: GCC High and DoD (Defender for Endpoint's
# "Portal URLs" for US Government customers); GCC uses the commercial portal.
DEFENDER_PORTAL_GCC_HIGH = "https://security.microsoft.us"
DEFENDER_PORTAL_DOD = "https://security.apps.mil"
_GRAPH_TO_DEFENDER = {
    "graph.microsoft.com": DEFENDER_PORTAL,
    "graph.microsoft.us": DEFENDER_PORTAL_GCC_HIGH,
    "dod-graph.microsoft.us": DEFENDER_PORTAL_DOD,
}
# When GRAPH_ENDPOINT is left at the public cloud, the Defender portal follows the Log Analytics
# endpoint's cloud, so that a sovereign-cloud Sentinel never gets public-cloud Defender links.
# (Azure Government's Log Analytics serves GCC High and DoD alike: DoD sets GRAPH_ENDPOINT.)
_LOG_ANALYTICS_TO_DEFENDER = {
    "api.loganalytics.us": DEFENDER_PORTAL_GCC_HIGH,
}
_LOG_ANALYTICS_TO_AZURE = {
    "api.loganalytics.io": AZURE_PORTAL,
    "api.loganalytics.azure.com": AZURE_PORTAL,
    "api.loganalytics.us": "https://portal.azure.us",
    "api.loganalytics.azure.cn": "https://portal.azure.cn",
}
_DEFENDER_MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")
_WORKSPACE_RESOURCE_ID = re.compile(
    r"^/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[-\w._()]{1,90}"
    r"/providers/Microsoft\.OperationalInsights/workspaces/[-A-Za-z0-9]{4,63}$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Portals:
    defender: str = DEFENDER_PORTAL
    azure: str = AZURE_PORTAL

    @classmethod
    def for_endpoints(cls, *, log_analytics: str | None = None, graph: str | None = None) -> Portals:
        """Pick the portals of the cloud the endpoints belong to, from the fixed tables above: the
        Defender portal from GRAPH_ENDPOINT when it names a sovereign cloud, otherwise from the Log
        Analytics endpoint's cloud, otherwise the public cloud's."""
        defender = _GRAPH_TO_DEFENDER.get(_host(graph), DEFENDER_PORTAL)
        if defender == DEFENDER_PORTAL:
            defender = _LOG_ANALYTICS_TO_DEFENDER.get(_host(log_analytics), DEFENDER_PORTAL)
        return cls(defender=defender, azure=_LOG_ANALYTICS_TO_AZURE.get(_host(log_analytics), AZURE_PORTAL))


def _host(url: str | None) -> str:
    try:
        return (urlsplit(url or "").hostname or "").lower()
    except ValueError:
        return ""


# --- encodings -----------------------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)  # mtime=0: the same query gives the same link


@lru_cache(maxsize=128)  # one detection's query is encoded once per run, not once per device
def encode_hunting_query(query: str) -> str:
    """Advanced hunting's `query=` value: UTF-16LE, gzip, base64url without padding."""
    return base64.urlsafe_b64encode(_gzip(query.encode("utf-16-le"))).decode("ascii").rstrip("=")


@lru_cache(maxsize=128)
def encode_log_analytics_query(query: str) -> str:
    """The Logs blade's `/q/` path segment: UTF-8, gzip, base64, URL-escaped twice (the portal
    unescapes the hash path once before it reads the segment)."""
    packed = base64.b64encode(_gzip(query.encode("utf-8"))).decode("ascii")
    return quote(quote(packed, safe=""), safe="")


# --- URLs ----------------------------------------------------------------------------------------


def is_defender_machine_id(value: str) -> bool:
    """A Defender for Endpoint machine id (DeviceId): 40 hexadecimal digits."""
    return bool(_DEFENDER_MACHINE_ID.fullmatch((value or "").strip()))


def defender_device_url(device_id: str, portal: str = DEFENDER_PORTAL) -> str | None:
    """None unless `device_id` is a Defender machine id: a result's DeviceId is the data's text, and
    other text (`..`, an id from another product) would open the wrong page or none."""
    device_id = (device_id or "").strip()
    if not is_defender_machine_id(device_id):
        return None
    return f"{portal}/machines/{quote(device_id, safe='')}"


def advanced_hunting_url(query: str, portal: str = DEFENDER_PORTAL) -> str:
    return f"{portal}/v2/advanced-hunting?query={encode_hunting_query(query)}&timeRangeId={HUNTING_TIME_RANGE}"


def is_workspace_resource_id(value: str) -> bool:
    return bool(_WORKSPACE_RESOURCE_ID.match(value or ""))


def log_analytics_query_url(workspace_resource_id: str, query: str, portal: str = AZURE_PORTAL) -> str | None:
    """None unless `workspace_resource_id` is a Log Analytics workspace's Azure resource id."""
    if not is_workspace_resource_id(workspace_resource_id):
        return None
    return (
        f"{portal}/#blade/Microsoft_Azure_Monitoring_Logs/LogsBlade/resourceId/{quote(workspace_resource_id, safe='')}"
        f"/source/LogsBlade.AnalyticsShareLinkToQuery/q/{encode_log_analytics_query(query)}"
        f"/timespan/{LOG_ANALYTICS_TIMESPAN}"
    )


# --- Links for sightings -------------------------------------------------------------------------


def device_link(device_id: str, portals: Portals = Portals()) -> Link | None:
    url = defender_device_url(device_id, portals.defender)
    return Link(DEVICE_TITLE, url) if url else None


def advanced_hunting_link(detection: Detection, portals: Portals = Portals()) -> Link:
    return Link(HUNTING_TITLE, advanced_hunting_url(detection.query, portals.defender))


def log_analytics_link(detection: Detection, workspace_resource_id: str, portals: Portals = Portals()) -> Link | None:
    url = log_analytics_query_url(workspace_resource_id, detection.query, portals.azure)
    return Link(LOG_ANALYTICS_TITLE, url) if url else None
