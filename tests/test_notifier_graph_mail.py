"""Email through Microsoft Graph sendMail: a local HTTPS "Graph" and the managed-identity token
flow (the real DefaultAzureCredential asks the local identity endpoint, as in a Function App)."""

from __future__ import annotations

import base64
import io
import logging
import zipfile

import pytest

from notifiers import DeliveryError, create_notifier
from notifiers.email import CHUNK_SIZE_GRAPH, EmailNotifier
from notifiers.mail_content import digest_content, mail_content
from notifiers.mail_graph import REQUEST_MAX_BYTES, request_body
from tests.support.http_server import Recorded, RecordingServer, Reply
from tests.support.identity import ManagedIdentityEndpoint
from tests.conftest import sqlite_unless_asked  # noqa: F401 - the module's state_values
from tests.support.messages import DETECTION, RUN, digest, many, message, sighting

SENDER = "soc-alerts@contoso.com"
SEND_PATH = f"/v1.0/users/{SENDER}/sendMail"


@pytest.fixture
def graph(https_server: RecordingServer, managed_identity: ManagedIdentityEndpoint) -> RecordingServer:
    """Graph's sendMail: 202 for a request with the token issued for this endpoint, else 401."""

    def answer(recorded: Recorded) -> Reply:
        if not managed_identity.authorized(recorded, https_server.url):
            return Reply(401, {"error": {"code": "InvalidAuthenticationToken", "message": "Access token is empty."}})
        if recorded.method != "POST" or recorded.path != SEND_PATH:
            return Reply(404, {"error": {"code": "ErrorInvalidUser", "message": "not found"}})
        return Reply(202)

    https_server.responder = answer
    return https_server


@pytest.fixture
def notifier(graph, make_settings):
    built = create_notifier("email", make_settings(
        EMAIL_TO="soc@contoso.com,ir@contoso.com", GRAPH_MAIL_SENDER=SENDER, GRAPH_ENDPOINT=graph.url))
    assert isinstance(built, EmailNotifier) and built.graph is not None and built.smtp is None
    yield built
    built.close()


def test_sendmail_with_a_managed_identity_token(graph, notifier, managed_identity) -> None:
    m = message(many(3) + [sighting(7, realert=True)])
    notifier.send(m)
    [request] = graph.requests
    assert request.method == "POST" and request.path == SEND_PATH
    assert request.headers["Authorization"] == managed_identity.bearer(graph.url)
    assert managed_identity.resources() == [graph.url]  # token for {GRAPH_ENDPOINT}/.default
    content = mail_content(m)
    body = request.json()
    assert body["saveToSentItems"] is False
    mail = body["message"]
    assert mail["subject"] == content.subject == (
        "Remote Management and Monitoring tool - Panorama9 - File Signature: 3 new devices, 1 re-alert")
    assert mail["body"] == {"contentType": "HTML", "content": content.html}
    assert mail["toRecipients"] == [{"emailAddress": {"address": "soc@contoso.com"}},
                                    {"emailAddress": {"address": "ir@contoso.com"}}]
    [attachment] = mail["attachments"]
    assert attachment["@odata.type"] == "#microsoft.graph.fileAttachment"
    assert attachment["name"] == content.csv_name and attachment["contentType"] == "text/csv"
    csv_text = base64.b64decode(attachment["contentBytes"]).decode("utf-8-sig")
    assert csv_text.count("\r\n") == 5 and "fin-ws-0007.contoso.local" in csv_text
    assert {"name": "X-Alerter-Run", "value": RUN.id} in mail["internetMessageHeaders"]
    assert {"name": "X-Alerter-Detection", "value": DETECTION.id} in mail["internetMessageHeaders"]


def test_one_token_for_several_mails(graph, notifier, managed_identity) -> None:
    notifier.send(message(many(1)))
    notifier.send_digest(digest(2))
    assert len(graph.requests) == 2 and len(managed_identity.issued) == 1
    digest_mail = graph.requests[1].json()["message"]
    assert "attachments" not in digest_mail
    assert digest_mail["body"]["content"] == digest_content(digest(2)).html


def test_403_names_the_missing_permission_not_the_token(graph, notifier, managed_identity, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    graph.then(Reply(403, {"error": {"code": "ErrorAccessDenied", "message": "Access is denied."}}))
    with pytest.raises(DeliveryError) as caught:
        notifier.send(message(many(1)))
    text = str(caught.value)
    assert "HTTP 403" in text and "Mail.Send" in text and SENDER not in text
    for secret in managed_identity.secret_values:
        assert secret not in text and secret not in caplog.text


def test_429_retry_after_then_202(graph, notifier) -> None:
    graph.then(Reply(429, {"error": {"code": "ApplicationThrottled"}}, headers={"Retry-After": "1"}))
    notifier.send(message(many(1)))
    assert len(graph.requests) == 2


def test_no_managed_identity_is_a_clear_error(graph, notifier, managed_identity) -> None:
    managed_identity.refuse = 400
    with pytest.raises(DeliveryError, match="Graph mail: no token for https://127.0.0.1:") as caught:
        notifier.send(message(many(1)))
    assert "managed identity" in str(caught.value)
    assert graph.requests == []
    assert managed_identity.header_secret not in str(caught.value)


def test_a_200_is_not_taken_for_sent(graph, notifier) -> None:
    graph.then(Reply(200, {}))
    with pytest.raises(DeliveryError, match="unexpected HTTP 200"):
        notifier.send(message(many(1)))


def test_graph_preview_and_chunk_size(notifier) -> None:
    assert notifier.chunk_size == CHUNK_SIZE_GRAPH
    rendered = notifier.render(message(many(2)))
    assert [r.filename for r in rendered] == [f"email-{DETECTION.id}-1.{ext}" for ext in ("eml", "html", "graph.json")]
    assert b"Bearer" not in rendered[2].content


def test_the_largest_graph_mail_stays_under_4_mb() -> None:
    sightings = many(CHUNK_SIZE_GRAPH)
    size = len(request_body(mail_content(message(sightings)), ("soc@contoso.com",)))  # the body as sent
    assert size < 4 * 1024 * 1024, size


def test_a_csv_too_large_for_one_request_is_zipped(graph, notifier) -> None:
    sightings = many(3000)
    for s in sightings:
        s.device_name = s.device_name + "-" + "x" * 300  # long names (cut to 256 in the CSV)
        s.device_names = [s.device_name] * 3
        s.report_ids = list(range(10_000_000, 10_000_300))  # a device with hundreds of files
    notifier.send(message(sightings))
    [request] = graph.requests
    assert len(request.body) < REQUEST_MAX_BYTES
    [attachment] = request.json()["message"]["attachments"]
    assert attachment["contentType"] == "application/zip" and attachment["name"].endswith(".csv.zip")
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(attachment["contentBytes"]))) as archive:
        [name] = archive.namelist()
        rows = archive.read(name).decode("utf-8-sig").split("\r\n")
    assert name == attachment["name"][: -len(".zip")] and len(rows) == 3002  # header, 3,000 rows, final newline
    assert attachment["name"] in request.json()["message"]["body"]["content"]


def test_a_chunk_of_the_worst_shape_still_fits_one_graph_request() -> None:
    """Hostile devices with long random names (which do not compress) and 200 report ids each:
    the capped CSV cells keep a full chunk under Graph's 4 MB."""
    import random
    import string

    rng = random.Random(7)
    sightings = many(CHUNK_SIZE_GRAPH)
    for s in sightings:
        s.device_name = "".join(rng.choices(string.ascii_letters, k=5000))
        s.device_names = [s.device_name, s.device_name[::-1]]
        s.report_ids = [rng.getrandbits(63) for _ in range(200)]
    notifier_content = mail_content(message(sightings))
    size = len(request_body(notifier_content, ("soc@contoso.com",)))
    zipped = len(request_body(mail_content(message(sightings), zip_csv=True), ("soc@contoso.com",)))
    assert min(size, zipped) < REQUEST_MAX_BYTES, (size, zipped)
