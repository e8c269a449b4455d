"""The alert mail, whichever transport carries it: subject, plain text, HTML and the CSV.

The text and HTML parts come from Jinja2 templates in notifiers/templates (autoescape on for
HTML, so a device name is always text); both render the shared `MessageView`. The CSV lists
every sighting of the message with the webhook's field names and raw values, guarded against
spreadsheet formula injection.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from alerter.model import Digest, Message
from notifiers.content import MessageView, digest_view, message_view
from notifiers.webhook import sighting_json

TEMPLATES = Path(__file__).with_name("templates")
LIST_MAX = 200
"""Devices listed in the mail body; the CSV has them all."""
CSV_COLUMNS = (
    "deviceName", "deviceId", "firstSeen", "lastSeen", "count", "realert",
    "deviceNames", "reportIds", "source", "links", "detectionId", "detectionName",
)
CSV_TEXT_MAX = 256
"""Characters kept of an endpoint-supplied cell (names, ids): the mail must stay within the
transport's size whatever a device calls itself; the webhook carries the full value."""
CSV_REPORT_IDS_MAX = 50
"""Report ids listed per device; the cell then says how many there were."""

_environment = Environment(
    loader=FileSystemLoader(str(TEMPLATES)),
    autoescape=select_autoescape(enabled_extensions=("html",), disabled_extensions=("txt",), default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


_FORMULA_START = re.compile(r"(^|[;,\t\r\n])(?=[=+\-@\t\r])")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run: text starting with = + - @ (or tab, CR) gets a `'`,
    and so does such text after a `;` or `,` inside the cell, where Excel set up for another
    list separator would start a new cell."""
    if isinstance(value, str):
        return _FORMULA_START.sub(r"\1'", value)
    return value


def csv_text(value: str) -> str:
    return value if len(value) <= CSV_TEXT_MAX else value[: CSV_TEXT_MAX - 1] + "…"


def csv_report_ids(ids: list[object]) -> str:
    shown = " ".join(str(r) for r in ids[:CSV_REPORT_IDS_MAX])
    return shown if len(ids) <= CSV_REPORT_IDS_MAX else f"{shown} … ({len(ids)} in all)"


def csv_bytes(view: MessageView) -> bytes:
    """Every sighting of the message, in display order, as UTF-8 CSV with a BOM (for Excel).
    Every cell is quoted: Excel set up for `;` lists would otherwise split a name at its `;`
    and run what follows as a formula."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for device in view.devices:
        record = sighting_json(device.sighting)
        row = {
            **record,
            "deviceName": csv_text(record["deviceName"]),
            "deviceId": csv_text(record["deviceId"]),
            "source": csv_text(record["source"]),
            "realert": "true" if record["realert"] else "false",
            "deviceNames": csv_text("; ".join(str(n) for n in record["deviceNames"])),
            "reportIds": csv_report_ids(record["reportIds"]),
            # Links every device shares (the query) are in the body once, not on every row.
            "links": " ".join(link.url for link in device.links),
            "detectionId": view.detection_id,
            "detectionName": view.detection_name,
        }
        writer.writerow([csv_cell("" if row[c] is None else row[c]) for c in CSV_COLUMNS])
    return out.getvalue().encode("utf-8-sig")


def csv_name(view: MessageView) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", view.detection_name.lower()).strip("-")
    if len(slug) > 60:
        slug = slug[:61].rpartition("-")[0] or slug[:60]
    slug = slug or "detection"
    stamp = view.run_at_raw.strftime("%Y%m%dT%H%MZ")
    part = f"-part{view.chunk_index}" if view.chunk_count > 1 else ""
    return f"{slug}-{stamp}{part}.csv"


@dataclass(frozen=True)
class MailContent:
    subject: str
    text: str
    html: str
    csv_name: str | None
    csv: bytes | None
    run_id: str
    run_at: datetime
    message_key: str
    """What makes the Message-ID unique within a run: `<detection id>.<part>`, or `digest`."""
    headers: tuple[tuple[str, str], ...]
    """Extra `X-Alerter-*` headers (the detection, the run)."""
    attachment_type: str = "text/csv"
    """`application/zip` when the CSV was too large to attach as it is."""


def zip_bytes(name: str, data: bytes, when: datetime) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        info = zipfile.ZipInfo(name, date_time=when.timetuple()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, data)
    return out.getvalue()


def mail_content(message: Message, *, zip_csv: bool = False) -> MailContent:
    """The mail for a message; `zip_csv` attaches the CSV inside a .zip (for very large runs)."""
    view = message_view(message)
    shown, more = view.shown(LIST_MAX)
    name = csv_name(view)
    data = csv_bytes(view)
    if zip_csv:
        data, name = zip_bytes(name, data, view.run_at_raw), name + ".zip"
    values = {"view": view, "shown": shown, "more": more, "csv_name": name}
    return MailContent(
        subject=view.subject,
        text=_environment.get_template("email.txt").render(values),
        html=_environment.get_template("email.html").render(values),
        csv_name=name,
        csv=data,
        run_id=view.run_id,
        run_at=view.run_at_raw,
        message_key=f"{view.detection_id}.{view.chunk_index}",
        headers=(("X-Alerter-Detection", view.detection_id), ("X-Alerter-Run", view.run_id)),
        attachment_type="application/zip" if zip_csv else "text/csv",
    )


def digest_content(digest: Digest) -> MailContent:
    """The daily "alive" mail: what each detection found; text and HTML, no attachment."""
    view = digest_view(digest)
    values = {"view": view}
    return MailContent(
        subject=view.subject,
        text=_environment.get_template("digest.txt").render(values),
        html=_environment.get_template("digest.html").render(values),
        csv_name=None,
        csv=None,
        run_id=view.run_id,
        run_at=digest.run.at,
        message_key="digest",
        headers=(("X-Alerter-Digest", "daily"), ("X-Alerter-Run", view.run_id)),
    )


def mime_message(content: MailContent, sender: str, recipients: tuple[str, ...]) -> EmailMessage:
    """multipart/mixed: multipart/alternative (text, HTML) and the CSV attachment.

    Without an attachment (the digest) the mail is the multipart/alternative alone."""
    domain = sender.rpartition("@")[2].strip(" >") or "alerter.invalid"
    mail = EmailMessage()
    mail["Subject"] = content.subject
    mail["From"] = sender
    mail["To"] = ", ".join(recipients)
    mail["Date"] = format_datetime(content.run_at)
    # One id per run and message: a retry of the same message within a run keeps it.
    mail["Message-ID"] = f"<alerter.{content.run_id}.{content.message_key}@{domain}>"
    mail["Auto-Submitted"] = "auto-generated"
    for name, value in content.headers:
        mail[name] = value
    mail.set_content(content.text, subtype="plain", charset="utf-8")
    mail.add_alternative(content.html, subtype="html", charset="utf-8")
    if content.csv is not None and content.csv_name:
        maintype, _, subtype = content.attachment_type.partition("/")
        params = {"charset": "utf-8"} if maintype == "text" else {}
        mail.add_attachment(content.csv, maintype=maintype, subtype=subtype, filename=content.csv_name, params=params)
    return mail
