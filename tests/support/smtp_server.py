"""A real SMTP server on loopback for tests (aiosmtpd), plain, STARTTLS or implicit TLS.

    with SmtpServer(security="starttls", ca=ca, users={"alerter": "pw"}) as smtp:
        ...  # SMTP_HOST=127.0.0.1, SMTP_PORT=smtp.port
        smtp.messages[0].parsed()  # an email.message.EmailMessage

Every message the server accepted is kept with its envelope, the login used and whether the
session was encrypted. `reply` makes the server answer DATA with an error instead (e.g. "451 ...").
"""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    encrypted: bool

    def parsed(self) -> EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class _Handler:
    server: SmtpServer
    messages: list[ReceivedMail] = field(default_factory=list)

    async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
        if self.server.reply:
            return self.server.reply
        auth = session.auth_data
        self.messages.append(ReceivedMail(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or envelope.content,
            login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            encrypted=session.ssl is not None or self.server.security == "ssl",
        ))
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SmtpServer:
    def __init__(self, *, security: str = "none", ca: trustme.CA | None = None,
                 users: dict[str, str] | None = None, mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN")) -> None:
        self.security = security
        self.users = users or {}
        self.reply: str | None = None
        self.auth_attempts: list[tuple[str, str]] = []
        """(mechanism, login) for every AUTH the server saw, successful or not."""
        self.host = "127.0.0.1"
        self.port = _free_port()
        self._handler = _Handler(self)
        context = None
        if security in ("starttls", "ssl"):
            assert ca is not None, "TLS needs a CA"
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        kwargs: dict[str, Any] = {"server_hostname": "localhost", "ident": "test SMTP"}
        if self.users:
            # Offer only `mechanisms`, so a test decides whether the client logs in with LOGIN or PLAIN.
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          # aiosmtpd counts only STARTTLS as TLS; an implicit-TLS session is encrypted anyway.
                          auth_require_tls=security == "starttls",
                          auth_exclude_mechanism=[m for m in ("LOGIN", "PLAIN") if m not in mechanisms])
        if security == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        self._controller = Controller(
            self._handler, hostname=self.host, port=self.port,
            ssl_context=context if security == "ssl" else None, **kwargs,
        )

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        self.auth_attempts.append((mechanism, login))
        ok = login in self.users and self.users[login] == password
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    @property
    def messages(self) -> list[ReceivedMail]:
        return self._handler.messages

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
