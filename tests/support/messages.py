"""Messages for notifier tests: the model objects the cycle hands a notifier, built by hand."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from alerter.model import Detection, DetectionReport, Digest, Link, Message, RunInfo, Sighting

RUN_AT = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
DETECTION = Detection(
    id="7a706363-95d0-4c85-9a65-f4a4463d09cf",
    name="Remote Management and Monitoring tool - Panorama9 - File Signature",
    query="DeviceFileCertificateInfo | where Signer has 'Panorama9'",
    path="detections/panorama9-filesig.yaml",
    tactics=("CommandAndControl",),
    techniques=("T1219",),
)
RUN = RunInfo(id="0d2f6c3e-5b1a-4c7e-9d2f-6c3e5b1a4c7e", at=RUN_AT)
QUERY_URL = "https://security.microsoft.com/v2/advanced-hunting?query=H4sIAAAAAAAA" + "Q" * 400 + "&timeRangeId=week"

# Values an attacker who controls an endpoint can give a device name.
HOSTILE_NAMES = [
    "[click](https://evil.example/phish)",
    "**x**",
    "__bold__ _it_ *it* ~~strike~~ `code`",
    "![img](https://evil.example/pixel.png)",
    "<at>Security Team</at>",
    "<script>alert(1)</script>&amp;",
    "- item\r\n1. item\n# Heading\n> quote",
    "https://evil.example/login www.evil.example",
    "\u202eexe.txt",
    "safe\u200bname\u2066x\u2069",
    "=cmd|'/C calc'!A0",
    "+SUM(1+1)",
    "@SUM(1)",
    "-2+3",
    "\"quoted\",comma;semi",
    "W" * 5000,
]


def device_id(index: int) -> str:
    return f"{index:040x}"


def device_link(index: int) -> Link:
    return Link("Device page", f"https://security.microsoft.com/machines/v2/{device_id(index)}/overview")


def sighting(index: int, name: str | None = None, *, realert: bool = False, links: bool = True,
             names: Sequence[str] | None = None) -> Sighting:
    name = f"fin-ws-{index:04d}.contoso.local" if name is None else name
    return Sighting(
        device_key=device_id(index),
        device_id=device_id(index),
        device_name=name,
        first_seen=datetime(2026, 5, 30, 9, 12, tzinfo=timezone.utc) + timedelta(minutes=index),
        last_seen=datetime(2026, 5, 31, 8, 1, 2, 500000, tzinfo=timezone.utc),
        count=3 + index % 5,
        report_ids=[18231 + index, 18290 + index],
        source="local:demo",
        device_names=list(names) if names is not None else [name],
        links=[device_link(index), Link("Open the query", QUERY_URL)] if links else [],
        realert=realert,
    )


def message(sightings: Sequence[Sighting], *, total: int | None = None, index: int = 1, count: int = 1,
            detection: Detection = DETECTION) -> Message:
    return Message(
        detection=detection,
        run=RUN,
        sightings=list(sightings),
        total=len(sightings) if total is None else total,
        chunk_index=index,
        chunk_count=count,
    )


def many(count: int, **kwargs) -> list[Sighting]:
    return [sighting(i, **kwargs) for i in range(count)]


def digest(detections: int = 3, *, pending: int = 0, failed: int = 0, error: str = "") -> Digest:
    """A daily digest: the first detection found two new devices, the second one failed if `error`."""
    reports = []
    for i in range(detections):
        report = DetectionReport(f"det-{i}", f"Detection {i:02d}: RMM tool {i}", rows=10, devices=4, new=0, known=4)
        if i == 0:
            report.new, report.known, report.realerts = 2, 2, 1
        if i == 1 and error:
            report.devices, report.known, report.query_error = 0, 0, error
        reports.append(report)
    return Digest(run=RUN, detections=reports, pending=pending, failed=failed)
