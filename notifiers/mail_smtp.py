"""Mail over SMTP (smtplib): STARTTLS, implicit TLS or plain (loopback only), optional login.

Every socket operation is bounded by HTTP_TIMEOUT. TLS certificates are verified against the
system store plus REQUESTS_CA_BUNDLE when it is set (the one trust setting of this app).
Errors become DeliveryError texts that name the server and the SMTP code, never the password:
after a failed AUTH the server's reply text is left out, as some servers echo what they got.
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
import ssl
from email.message import EmailMessage

from alerter.settings import Settings
from notifiers import DeliveryError

log = logging.getLogger(__name__)
REPLY_TEXT_MAX = 200

# smtplib would otherwise look up this host's FQDN in DNS for EHLO, with no timeout at all.
HELO_NAME = socket.gethostname() or "localhost"


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    bundle = os.environ.get("REQUESTS_CA_BUNDLE")
    if bundle:
        context.load_verify_locations(cafile=bundle)
    return context


def _reply_text(error: smtplib.SMTPResponseException) -> str:
    raw = error.smtp_error
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return text[:REPLY_TEXT_MAX]


class SmtpTransport:
    def __init__(self, settings: Settings) -> None:
        self.host = settings.smtp_host or ""
        self.port = settings.smtp_port
        self.security = settings.smtp_security
        self.username = settings.smtp_username
        self.password = settings.smtp_password
        self.timeout = settings.http_timeout

    @property
    def where(self) -> str:
        return f"SMTP {self.host}:{self.port}"

    def _connect(self) -> smtplib.SMTP:
        if self.security == "ssl":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=tls_context(),
                                    local_hostname=HELO_NAME)
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout, local_hostname=HELO_NAME)

    def send(self, mail: EmailMessage) -> None:
        where = self.where
        if not self.host:
            raise DeliveryError("SMTP_HOST is not set")
        stage = "connect"
        try:
            with self._connect() as client:
                stage = "EHLO"
                client.ehlo()
                if self.security == "starttls":
                    stage = "STARTTLS"
                    if not client.has_extn("starttls"):
                        raise DeliveryError(f"{where}: the server does not offer STARTTLS (SMTP_SECURITY=starttls)")
                    client.starttls(context=tls_context())
                    client.ehlo()
                if self.username:
                    stage = "login"
                    try:
                        client.login(self.username, self.password or "")
                    except smtplib.SMTPAuthenticationError as error:
                        raise DeliveryError(
                            f"{where}: login as SMTP_USERNAME refused (SMTP {error.smtp_code}); check SMTP_PASSWORD"
                        ) from None
                    except smtplib.SMTPNotSupportedError:
                        raise DeliveryError(f"{where}: the server offers no AUTH (is TLS required first?)") from None
                stage = "send"
                refused = client.send_message(mail)
                if refused:
                    # Some recipients took it: marking it sent is right (a retry would duplicate it
                    # for the others), and the refused ones are logged for the operator.
                    log.warning("%s: recipients refused: %s", where,
                                ", ".join(f"{addr} ({code})" for addr, (code, _) in refused.items()))
        except DeliveryError:
            raise
        except smtplib.SMTPRecipientsRefused as error:
            codes = ", ".join(f"{addr} ({code})" for addr, (code, _) in error.recipients.items())
            raise DeliveryError(f"{where}: every recipient refused: {codes}") from None
        except smtplib.SMTPSenderRefused as error:
            raise DeliveryError(f"{where}: sender refused: SMTP {error.smtp_code} {_reply_text(error)}") from None
        except smtplib.SMTPResponseException as error:
            raise DeliveryError(f"{where}: {stage} failed: SMTP {error.smtp_code} {_reply_text(error)}") from None
        except smtplib.SMTPServerDisconnected as error:
            if "timed out" in str(error):  # smtplib turns a read timeout into a disconnect
                raise DeliveryError(f"{where}: no answer within {self.timeout:g} s during {stage}") from None
            raise DeliveryError(f"{where}: the server closed the connection during {stage}") from None
        except smtplib.SMTPNotSupportedError as error:
            raise DeliveryError(f"{where}: {stage}: not supported by the server ({error})") from None
        except (socket.timeout, TimeoutError):
            raise DeliveryError(f"{where}: no answer within {self.timeout:g} s during {stage}") from None
        except ssl.SSLCertVerificationError as error:
            raise DeliveryError(f"{where}: TLS certificate not trusted ({error.verify_message})") from None
        except ssl.SSLError as error:
            raise DeliveryError(f"{where}: TLS failed during {stage} ({error.reason or type(error).__name__})") from None
        except OSError as error:
            raise DeliveryError(f"{where}: {stage} failed ({error.strerror or type(error).__name__})") from None
        except smtplib.SMTPException as error:
            raise DeliveryError(f"{where}: {stage} failed ({type(error).__name__})") from None
