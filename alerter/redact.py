"""Keep secrets (webhook URLs carry signatures, passwords, keys) out of logs, errors and the ledger."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

MASK = "***"


def _fragments(secret: str) -> set[str]:
    """The secret itself; for a URL, its path and query, which is where signatures live; for a
    connection string (`AccountName=…;AccountKey=…`), its key and SAS token, which may be shown alone."""
    found = {secret}
    if ";" in secret and "=" in secret:
        # The key and SAS token, not the account name or endpoint: those say where to look.
        found.update(
            value for name, _, value in (part.partition("=") for part in secret.split(";"))
            if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value
        )
    try:
        parts = urlsplit(secret)
    except ValueError:
        return found
    if parts.scheme and parts.netloc:
        if parts.query:
            found.add(parts.query)
            found.update(p.split("=", 1)[1] for p in parts.query.split("&") if "=" in p)
        if len(parts.path) > 1:
            found.add(parts.path)
    return found


class Redactor:
    """Replaces every known secret fragment in a text. Short fragments are ignored: masking `1`
    everywhere would make logs unreadable and protects nothing."""

    MIN_LENGTH = 6

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        fragments: set[str] = set()
        for secret in secrets:
            if secret:
                fragments |= _fragments(secret)
        # Longest first so a URL is masked whole before its query string is.
        self._fragments = sorted((f for f in fragments if len(f) >= self.MIN_LENGTH), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for fragment in self._fragments:
            if fragment in text:
                text = text.replace(fragment, MASK)
        return text


class RedactingFilter(logging.Filter):
    """A logging filter that formats the record's message once and masks secrets in it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not turn a log call into a crash
            message = f"{record.msg!s} {record.args!r}"
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
            record.exc_info = None  # handlers that format exc_info themselves would bypass the mask
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        record.msg, record.args = self._redact(message), None
        return True


def install(redactor: Redactor, logger: logging.Logger | None = None) -> RedactingFilter:
    """Attach the filter to every handler of the logger (root by default), replacing one that an
    earlier call installed: a warm Functions host calls this once per invocation."""
    target = logger or logging.getLogger()
    flt = RedactingFilter(redactor)
    for holder in (target, *target.handlers):
        for old in [f for f in holder.filters if isinstance(f, RedactingFilter)]:
            holder.removeFilter(old)
        holder.addFilter(flt)
    return flt
