"""Email over SMTP against a real aiosmtpd server on loopback: plain and TLS, with login; the
message as the standard library parses it; and the per-channel ledger in a full cycle."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import logging
import socket
import threading
import zipfile
from datetime import timedelta
from email.message import EmailMessage
from html.parser import HTMLParser

import pytest

from alerter.cycle import plan_messages, run_cycle
from alerter.ledger import open_store
from alerter.model import Delivery, DeliveryStatus
from notifiers import DeliveryError, create_notifier
from notifiers.content import message_view
from notifiers.email import CHUNK_SIZE_SMTP, EmailNotifier
from notifiers.mail_content import (
    CSV_COLUMNS,
    CSV_TEXT_MAX,
    LIST_MAX,
    csv_cell,
    csv_report_ids,
    csv_text,
    mail_content,
    mime_message,
)
from notifiers.webhook import sighting_json
from tests.conftest import BOTH_STORES, DEMO_NOW, cert_row, sqlite_unless_asked, write_rows  # noqa: F401 - sqlite_unless_asked is the module's state_values
from tests.support.http_server import Reply
from tests.support.messages import DETECTION, HOSTILE_NAMES, RUN, digest, many, message, sighting
from tests.support.smtp_server import SmtpServer

# aiosmtpd warns when AUTH is offered without TLS: the plain-SMTP tests do that on purpose (loopback).
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

PASSWORD = "s3cret-smtp-Pa55word"
RECIPIENTS = "soc@contoso.com, ir@contoso.com"
TEMPLATE_TAGS = {"html", "head", "meta", "title", "body", "div", "a", "p", "table", "thead", "tbody", "tr", "th",
                 "td", "span", "b", "br"}


@pytest.fixture
def mail_settings(make_settings):
    def build(server: SmtpServer | None, **overrides: str):
        values = {"EMAIL_TO": RECIPIENTS, "EMAIL_FROM": "RMM Alerter <alerter@contoso.com>",
                  "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port if server else 25),
                  "SMTP_SECURITY": server.security if server else "none"}
        if server is not None and server.users:
            values.update(SMTP_USERNAME="alerter", SMTP_PASSWORD=PASSWORD)
        return make_settings(**{**values, **overrides})

    return build


def send(settings, m) -> None:
    notifier = create_notifier("email", settings)
    try:
        notifier.send(m)
    finally:
        notifier.close()


def parts(mail: EmailMessage) -> tuple[str, str, EmailMessage]:
    """The plain text, the HTML and the CSV attachment, checking the MIME structure on the way."""
    assert mail.get_content_type() == "multipart/mixed"
    body, attachment = mail.get_payload()
    assert body.get_content_type() == "multipart/alternative"
    plain, html = body.get_payload()
    assert plain.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert attachment.get_content_type() == "text/csv" and attachment.get_content_disposition() == "attachment"
    return plain.get_content(), html.get_content(), attachment


def csv_rows(attachment: EmailMessage) -> list[dict[str, str]]:
    data = attachment.get_content()
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.lstrip("\ufeff")
    return list(csv.DictReader(io.StringIO(text, newline="")))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        self.hrefs += [value for name, value in attrs if name == "href"]

    def handle_data(self, data) -> None:
        self.text.append(data)


# --- transports and login ---------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_plain_smtp_with_login_delivers_one_complete_message(mail_settings, mechanism) -> None:
    m = message(many(3) + [sighting(9, realert=True)])
    with SmtpServer(users={"alerter": PASSWORD}, mechanisms=(mechanism,)) as smtp:
        send(mail_settings(smtp), m)
    [received] = smtp.messages
    assert smtp.auth_attempts == [(mechanism, "alerter")]
    assert received.login == "alerter" and not received.encrypted
    assert received.mail_from == "alerter@contoso.com"
    assert received.rcpt_tos == ["soc@contoso.com", "ir@contoso.com"]
    mail = received.parsed()
    assert mail["Subject"] == "Remote Management and Monitoring tool - Panorama9 - File Signature: 3 new devices, 1 re-alert"
    assert mail["To"] == "soc@contoso.com, ir@contoso.com"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Message-ID"] == f"<alerter.{RUN.id}.{DETECTION.id}.1@contoso.com>"
    plain, html, attachment = parts(mail)
    assert attachment.get_filename() == "remote-management-and-monitoring-tool-panorama9-file-20260531T1100Z.csv"
    for name in ("fin-ws-0000.contoso.local", "fin-ws-0009.contoso.local"):
        assert name in plain and name in html
    assert "1 device reported before is still seen (re-alert)." in plain
    assert [row["deviceName"] for row in csv_rows(attachment)] == [s.device_name for s in m.sightings]


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_tls_with_a_trusted_certificate_and_login(mail_settings, ca, trust_ca, security) -> None:
    with SmtpServer(security=security, ca=ca, users={"alerter": PASSWORD}) as smtp:
        send(mail_settings(smtp), message(many(2)))
    [received] = smtp.messages
    assert received.encrypted and received.login == "alerter"
    assert len(csv_rows(parts(received.parsed())[2])) == 2


def test_an_untrusted_certificate_is_refused(mail_settings, ca, monkeypatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with SmtpServer(security="starttls", ca=ca, users={"alerter": PASSWORD}) as smtp:
        with pytest.raises(DeliveryError, match="TLS certificate not trusted"):
            send(mail_settings(smtp), message(many(1)))
    assert smtp.messages == [] and smtp.auth_attempts == []


def test_starttls_required_but_not_offered(mail_settings) -> None:
    with SmtpServer() as smtp:
        with pytest.raises(DeliveryError, match="does not offer STARTTLS"):
            send(mail_settings(smtp, SMTP_SECURITY="starttls"), message(many(1)))
    assert smtp.messages == []


def test_a_wrong_password_is_an_error_that_does_not_show_it(mail_settings) -> None:
    with SmtpServer(users={"alerter": "the-right-one"}) as smtp:
        with pytest.raises(DeliveryError) as caught:
            send(mail_settings(smtp), message(many(1)))
    text = str(caught.value)
    assert "login as SMTP_USERNAME refused (SMTP 535)" in text
    assert PASSWORD not in text and "the-right-one" not in text
    assert smtp.messages == []


def test_a_temporary_refusal_is_a_delivery_error(mail_settings) -> None:
    with SmtpServer() as smtp:
        smtp.reply = "451 4.3.0 Mail server temporarily rejected message"
        with pytest.raises(DeliveryError, match=r"SMTP 451 4\.3\.0 Mail server temporarily rejected message"):
            send(mail_settings(smtp), message(many(1)))


def test_nobody_listening(mail_settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DeliveryError, match=rf"SMTP 127\.0\.0\.1:{port}: connect failed"):
        send(mail_settings(None, SMTP_PORT=str(port)), message(many(1)))


def test_a_server_that_never_greets_times_out(mail_settings) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        with pytest.raises(DeliveryError, match=r"no answer within 0\.5 s during connect"):
            send(mail_settings(None, SMTP_PORT=str(listener.getsockname()[1]), HTTP_TIMEOUT="0.5"), message(many(1)))
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


# --- content ----------------------------------------------------------------------------------


def test_device_names_are_text_in_both_parts(mail_settings) -> None:
    m = message([sighting(i, name) for i, name in enumerate(HOSTILE_NAMES)])
    with SmtpServer() as smtp:
        send(mail_settings(smtp), m)
    plain, html, attachment = parts(smtp.messages[0].parsed())
    parser = _Tags()
    parser.feed(html)
    # Only the template's own tags: nothing from a device name became markup.
    assert parser.tags <= TEMPLATE_TAGS, parser.tags - TEMPLATE_TAGS
    assert all(href.startswith("https://") for href in parser.hrefs)
    assert not any("evil" in href for href in parser.hrefs)
    text = "".join(parser.text)
    for shown in ("<script>alert(1)</script>&amp;", "<at>Security Team</at>", "**x**", "[click](https:\u2060//evil.example/phish)"):
        assert shown in text and shown in plain
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp;" in html
    for control in ("\u202e", "\u200b", "\u2066"):
        assert control not in html and control not in plain
    assert "\ufffdexe.txt" in plain


def test_the_csv_has_every_sighting_as_the_webhook_sends_it_and_no_formula(mail_settings) -> None:
    sightings = [sighting(i, name) for i, name in enumerate(HOSTILE_NAMES)] + many(300)
    for s in sightings[:3]:
        s.device_names = [s.device_name, "=HYPERLINK(\"https://evil.example\")"]
    m = message(sightings)
    with SmtpServer() as smtp:
        send(mail_settings(smtp), m)
    plain, html, attachment = parts(smtp.messages[0].parsed())
    rows = csv_rows(attachment)
    assert list(rows[0]) == list(CSV_COLUMNS)
    view = message_view(m)
    assert len(rows) == len(sightings) == view.count
    for row, device in zip(rows, view.devices):
        record = sighting_json(device.sighting)
        assert row["deviceName"] == csv_cell(csv_text(record["deviceName"]))
        assert row["deviceId"] == csv_text(record["deviceId"])
        assert row["firstSeen"] == record["firstSeen"] and row["lastSeen"] == record["lastSeen"]
        assert row["count"] == str(record["count"]) and row["source"] == csv_text(record["source"])
        assert row["realert"] == ("true" if record["realert"] else "false")
        assert row["reportIds"] == csv_report_ids(record["reportIds"])
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    by_name = {row["deviceName"]: row for row in rows}
    assert "'=cmd|'/C calc'!A0" in by_name and "'+SUM(1+1)" in by_name and "'@SUM(1)" in by_name and "'-2+3" in by_name
    assert "\"quoted\",comma;semi" in by_name  # quoting, not mangling
    assert "\u202eexe.txt" in by_name  # raw, as the webhook has it: the CSV is the record
    assert "'- item\r\n1. item\n# Heading\n> quote" in by_name  # newlines kept, inside quotes
    assert any(row["deviceNames"].endswith("; =HYPERLINK(\"https://evil.example\")") for row in rows)
    # The body lists the first LIST_MAX devices and points to the CSV for the rest.
    more = len(sightings) - LIST_MAX
    assert f"...and {more:,} more devices not listed here: all are in the attached CSV." in plain
    assert f"…and {more:,} more devices not listed here" in html


def test_one_mail_per_detection_per_run() -> None:
    deliveries = [Delivery(DETECTION.id, s.device_key, "email", DeliveryStatus.PENDING, s) for s in many(5000)]
    planned = plan_messages(deliveries, CHUNK_SIZE_SMTP, {DETECTION.id: DETECTION}, RUN)
    assert len(planned) == 1
    content = mail_content(planned[0].message)
    assert content.subject.endswith(": 5,000 new devices")
    assert content.csv.count(b"\r\n") == 5001


def test_a_split_run_says_which_part() -> None:
    content = mail_content(message(many(2), total=20_002, index=2, count=3))
    assert content.subject.endswith(": 2 new devices (part 2 of 3)")
    assert "Message 2 of 3: 20,002 devices in this run in all." in content.text
    assert content.csv_name.endswith("-part2.csv")


def test_preview_writes_eml_and_html(mail_settings, tmp_path) -> None:
    notifier = create_notifier("email", mail_settings(None))
    assert isinstance(notifier, EmailNotifier) and notifier.chunk_size == CHUNK_SIZE_SMTP
    rendered = notifier.render(message(many(2)))
    notifier.close()
    assert [r.filename for r in rendered] == [f"email-{DETECTION.id}-1.eml", f"email-{DETECTION.id}-1.html"]
    parsed = email.message_from_bytes(rendered[0].content, policy=email.policy.default)
    assert len(csv_rows(parts(parsed)[2])) == 2
    assert rendered[1].content.decode().startswith("<!DOCTYPE html>")


def test_the_daily_digest_is_a_text_and_html_mail(mail_settings) -> None:
    d = digest(3, pending=2, failed=1, error="<b>HTTP 400</b>")
    with SmtpServer() as smtp:
        notifier = create_notifier("email", mail_settings(smtp))
        try:
            notifier.send_digest(d)
            assert [r.filename for r in notifier.render_digest(d)] == ["email-digest.eml", "email-digest.html"]
        finally:
            notifier.close()
    mail = smtp.messages[0].parsed()
    assert mail["Subject"] == ("Alerter daily digest: 3 detections checked, 2 new devices, 1 re-alert, 1 query failed, "
                               "1 delivery failed")
    assert mail.get_content_type() == "multipart/alternative"
    plain, html = (part.get_content() for part in mail.get_payload())
    assert "QUERY FAILED: <b>HTTP 400</b>" in plain
    assert "Query failed: &lt;b&gt;HTTP 400&lt;/b&gt;" in html
    assert "PROBLEM: 1 delivery failed (gave up retrying)" in plain
    assert "2 new, 2 already reported, 1 re-alert" in plain


# --- the cycle: one ledger entry per channel --------------------------------------------------


@BOTH_STORES
def test_teams_down_while_mail_works_then_teams_catches_up(make_settings, https_server, data_dir, caplog) -> None:
    write_rows(data_dir, [
        cert_row("dev-a", "fin-ws-0142.contoso.local", "2026-05-30T09:12:44Z"),
        cert_row("dev-b", "[click](https://evil.example)", "2026-05-30T10:00:00Z", report=2),
    ])
    teams_url = f"{https_server.url}/workflows/abc/triggers/manual/paths/invoke?sig=VGVhbXNTZWNyZXRTaWc"
    https_server.default = Reply(503)
    caplog.set_level(logging.INFO)
    with SmtpServer(users={"alerter": PASSWORD}) as smtp:
        settings = make_settings(
            TEAMS_WEBHOOK_URL=teams_url, EMAIL_TO=RECIPIENTS, EMAIL_FROM="alerter@contoso.com",
            SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.port), SMTP_SECURITY="none",
            SMTP_USERNAME="alerter", SMTP_PASSWORD=PASSWORD, HTTP_RETRIES="1",
        )
        first = run_cycle(settings, now=DEMO_NOW)
        [detection] = first.detections
        assert detection.new == 2
        assert detection.channels["email"].sent == 2 and detection.channels["email"].failed == 0
        assert detection.channels["teams"].sent == 0 and detection.channels["teams"].failed == 2
        assert not first.ok
        assert len(smtp.messages) == 1 and len(https_server.requests) == 2  # one POST, one retry

        store = open_store(settings)
        try:
            assert store.due("email", DEMO_NOW + timedelta(days=1)) == []
            pending = store.due("teams", DEMO_NOW + timedelta(days=1))
            assert sorted(d.device_key for d in pending) == ["dev-a", "dev-b"]
            for delivery in pending:
                assert delivery.last_error.startswith("Teams webhook at https://127.0.0.1:")
                assert "VGVhbXNTZWNyZXRTaWc" not in delivery.last_error and "workflows" not in delivery.last_error
        finally:
            store.close()

        https_server.default = Reply(202)
        second = run_cycle(settings, now=DEMO_NOW + timedelta(hours=4))
        [detection] = second.detections
        assert second.ok, second
        assert detection.new == 0
        assert detection.channels["teams"].sent == 2
        assert "email" not in detection.channels  # nothing owed to mail: nothing sent again
        assert len(smtp.messages) == 1 and len(https_server.requests) == 3
        names = [r for r in (https_server.requests[-1].json()["attachments"][0]["content"]["body"])]
        assert "fin-ws-0142.contoso.local" in str(names)

        third = run_cycle(settings, now=DEMO_NOW + timedelta(hours=8))
        assert third.ok and len(https_server.requests) == 3 and len(smtp.messages) == 1

    for secret in ("VGVhbXNTZWNyZXRTaWc", PASSWORD):
        assert secret not in caplog.text
        assert all(secret not in e for d in first.detections for c in d.channels.values() for e in c.errors)


def test_a_zipped_csv_is_an_application_zip_attachment() -> None:
    content = mail_content(message(many(3)), zip_csv=True)
    mail = email.message_from_bytes(mime_message(content, "a@contoso.com", ("b@contoso.com",)).as_bytes(),
                                    policy=email.policy.default)
    attachment = mail.get_payload()[1]
    assert attachment.get_content_type() == "application/zip"
    assert attachment.get_filename() == content.csv_name and content.csv_name.endswith(".csv.zip")
    with zipfile.ZipFile(io.BytesIO(attachment.get_content())) as archive:
        assert archive.read(content.csv_name[:-4]).decode("utf-8-sig").count("\r\n") == 4
    assert f"Attached: {content.csv_name}," in content.text


def test_a_name_with_semicolons_cannot_become_a_formula_in_a_semicolon_excel() -> None:
    """Excel in much of Europe splits a .csv on `;`, also inside a quoted cell that does not start
    a `;`-separated field: text after a `;` or `,` that would start a formula is neutralized."""
    import csv as csv_module

    evil = "ws-1;=cmd|' /C calc'!A0;x"
    content = mail_content(message([sighting(1, evil)]))
    text = content.csv.decode("utf-8-sig")  # type: ignore[union-attr]
    assert '"ws-1;\'=cmd|\' /C calc\'!A0;x"' in text  # quoted, and the formula after `;` neutralized
    for row in csv_module.reader(io.StringIO(text), delimiter=";"):
        assert not any(cell.startswith("=") for cell in row), row


def test_endpoint_supplied_cells_are_capped_so_the_mail_keeps_its_size() -> None:
    long_name = "n" * 5000
    s = sighting(1, long_name)
    s.device_names = [long_name] * 20
    s.report_ids = list(range(1000))
    content = mail_content(message([s]))
    [row] = list(csv.DictReader(io.StringIO(content.csv.decode("utf-8-sig"))))  # type: ignore[union-attr]
    assert len(row["deviceName"]) == CSV_TEXT_MAX and row["deviceName"].endswith("…")
    assert len(row["deviceNames"]) == CSV_TEXT_MAX
    assert row["reportIds"].endswith("… (1000 in all)")
