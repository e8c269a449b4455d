"""Mail through Microsoft Graph: `POST {GRAPH_ENDPOINT}/v1.0/users/{GRAPH_MAIL_SENDER}/sendMail`.

The token is for `{GRAPH_ENDPOINT}/.default`, from `DefaultAzureCredential` (the Function App's
managed identity in Azure), and needs the application permission `Mail.Send` (best scoped to the
one mailbox with an application access policy or RBAC for Applications). 202 Accepted is
success. The request goes through alerter.http, so 429/5xx with Retry-After are retried within
the run; errors name the status and a likely cause, never the token.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

from alerter.http import HttpCallError, HttpPolicy, post, session
from alerter.settings import Settings
from alerter.urls import describe_url
from notifiers import DeliveryError
from notifiers.mail_content import MailContent

REQUEST_MAX_BYTES = 3_500_000
"""Graph takes at most 4 MB per request: above this the CSV goes in a .zip."""

HINTS = {
    400: "Graph refused the message",
    401: "the token was not accepted",
    403: "the identity lacks the Mail.Send application permission for this mailbox",
    404: "no mailbox GRAPH_MAIL_SENDER in this tenant",
    413: "the message is too large for one sendMail request",
}


def send_mail_request(content: MailContent, recipients: tuple[str, ...]) -> dict[str, Any]:
    """The sendMail body: the HTML part as the body (Graph takes one), the CSV as a fileAttachment."""
    message: dict[str, Any] = {
        "subject": content.subject,
        "body": {"contentType": "HTML", "content": content.html},
        "toRecipients": [{"emailAddress": {"address": address}} for address in recipients],
        "internetMessageHeaders": [{"name": name, "value": value} for name, value in content.headers],
    }
    if content.csv is not None and content.csv_name:
        message["attachments"] = [{
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": content.csv_name,
            "contentType": content.attachment_type,
            "contentBytes": base64.b64encode(content.csv).decode("ascii"),
        }]
    return {"message": message, "saveToSentItems": False}


def request_body(content: MailContent, recipients: tuple[str, ...]) -> bytes:
    return json.dumps(send_mail_request(content, recipients), ensure_ascii=False).encode("utf-8")


class GraphMailTransport:
    def __init__(self, settings: Settings) -> None:
        self.endpoint = settings.graph_endpoint.rstrip("/")
        self.sender = settings.graph_mail_sender or ""
        self.scope = f"{self.endpoint}/.default"
        self.policy = HttpPolicy(timeout=settings.http_timeout, retries=settings.http_retries)
        self._http = session(self.policy)
        self._credential: Any = None

    @property
    def url(self) -> str:
        return f"{self.endpoint}/v1.0/users/{quote(self.sender, safe='@')}/sendMail"

    def _token(self) -> str:
        try:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
            return self._credential.get_token(self.scope).token
        except Exception as error:  # noqa: BLE001 - azure-identity raises several types; all mean "no token"
            lines = str(getattr(error, "message", None) or error).strip().splitlines()
            first = lines[0][:200] if lines else type(error).__name__
            raise DeliveryError(
                f"Graph mail: no token for {describe_url(self.endpoint)}: in Azure, turn on the Function App's "
                f"managed identity (AZURE_CLIENT_ID for a user-assigned one); on a workstation, `az login` ({first})"
            ) from None

    def send(self, content: MailContent, recipients: tuple[str, ...]) -> None:
        if not self.sender:
            raise DeliveryError("GRAPH_MAIL_SENDER is not set")
        body = request_body(content, recipients)
        headers = {"Authorization": f"Bearer {self._token()}", "Content-Type": "application/json; charset=utf-8"}
        try:
            response = post(self._http, self.url, self.policy, what="Graph sendMail", data=body, headers=headers)
        except HttpCallError as error:
            raise DeliveryError.from_http(error, HINTS.get(error.status or 0)) from None
        if response.status_code != 202:
            # sendMail answers 202 Accepted and nothing else on success.
            raise DeliveryError(f"Graph sendMail at {describe_url(self.url)}: unexpected HTTP {response.status_code}")

    def close(self) -> None:
        self._http.close()
        if self._credential is not None:
            self._credential.close()
