"""EMAIL_TO: one mail per detection per run, over SMTP, or through Microsoft Graph when
GRAPH_MAIL_SENDER is set.

The mail is multipart/mixed: a multipart/alternative body (plain text and HTML, rendered from
templates with autoescape) and a CSV attachment with every sighting of the message. The subject
names the detection and the count. The transports are notifiers.mail_smtp and
notifiers.mail_graph; the content is notifiers.mail_content, the same for both.
"""

from __future__ import annotations

import json

from alerter.model import Digest, Message
from alerter.settings import Settings
from notifiers import DeliveryError, Rendered
from notifiers.mail_content import MailContent, digest_content, mail_content, mime_message
from notifiers.mail_graph import REQUEST_MAX_BYTES, GraphMailTransport, request_body, send_mail_request
from notifiers.mail_smtp import SmtpTransport

CHUNK_SIZE_SMTP = 10_000
"""A run's burst fits one mail: the CSV of 10,000 devices is about 3 MB."""
CHUNK_SIZE_GRAPH = 1_000
"""Graph takes at most 4 MB per request, attachments base64-encoded: with CSV cells capped
(mail_content.CSV_TEXT_MAX), 1,000 devices of the worst shape stay under it."""
SMTP_CSV_MAX_BYTES = 8 * 1024 * 1024
"""Above this the CSV is attached zipped: relays commonly refuse mails over 10 to 35 MB."""


class EmailNotifier:
    channel = "email"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recipients = settings.email_to
        self.graph: GraphMailTransport | None = None
        self.smtp: SmtpTransport | None = None
        if settings.graph_mail_sender:
            self.graph = GraphMailTransport(settings)
            self.chunk_size = CHUNK_SIZE_GRAPH
        else:
            self.smtp = SmtpTransport(settings)
            self.chunk_size = CHUNK_SIZE_SMTP

    @property
    def sender(self) -> str:
        return self.settings.email_from or self.settings.graph_mail_sender or "alerter@localhost"

    def content(self, message: Message) -> MailContent:
        """The mail; the CSV zipped when it would make the mail too large for the transport
        (a device with thousands of report ids makes long rows)."""
        content = mail_content(message)
        if not self._too_large(content):
            return content
        zipped = mail_content(message, zip_csv=True)
        if self._too_large(zipped):
            # Loud rather than refused by the server on every run: the ledger keeps it pending.
            raise DeliveryError(f"the mail for {len(message.sightings)} devices is too large even with the CSV zipped")
        return zipped

    def _too_large(self, content: MailContent) -> bool:
        if self.graph is not None:
            return len(request_body(content, self.recipients)) > REQUEST_MAX_BYTES
        return len(content.csv or b"") > SMTP_CSV_MAX_BYTES

    def render(self, message: Message) -> list[Rendered]:
        return self._render(self.content(message), f"email-{message.detection.id}-{message.chunk_index}")

    def send(self, message: Message) -> None:
        self._send(self.content(message))

    def render_digest(self, digest: Digest) -> list[Rendered]:
        return self._render(digest_content(digest), "email-digest")

    def send_digest(self, digest: Digest) -> None:
        self._send(digest_content(digest))

    def _render(self, content: MailContent, stem: str) -> list[Rendered]:
        rendered = [
            Rendered(f"{stem}.eml", mime_message(content, self.sender, self.recipients).as_bytes()),
            Rendered(f"{stem}.html", content.html.encode("utf-8")),
        ]
        if self.graph is not None:
            body = json.dumps(send_mail_request(content, self.recipients), ensure_ascii=False, indent=2)
            rendered.append(Rendered(f"{stem}.graph.json", body.encode("utf-8")))
        return rendered

    def _send(self, content: MailContent) -> None:
        if not self.recipients:
            raise DeliveryError("EMAIL_TO is not set")
        if self.graph is not None:
            self.graph.send(content, self.recipients)
        else:
            assert self.smtp is not None
            self.smtp.send(mime_message(content, self.sender, self.recipients))

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
