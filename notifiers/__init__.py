"""Delivery channels. One module per channel, one registry from channel name to class.

A notifier turns a Message into its channel's payload and sends it; it never sees a source or
the ledger, and retrying across runs is the ledger's job, not the notifier's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from alerter.http import HttpCallError, retry_after_seconds
from alerter.model import Digest, Message
from alerter.settings import Settings


class DeliveryError(Exception):
    """The channel did not accept the message. The text is stored in the ledger and logged, so
    it must never hold a URL's path or query, a password or a token."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the channel asked us to wait (Retry-After): the next attempt is not earlier."""

    @classmethod
    def from_http(cls, error: HttpCallError, hint: str | None = None) -> DeliveryError:
        """An HTTP channel's failure, keeping the Retry-After it may have sent."""
        message = f"{error}: {hint}" if hint else str(error)
        return cls(message, retry_after=retry_after_seconds(error.retry_after))


@dataclass(frozen=True)
class Rendered:
    """A payload as it would go on the wire, for --preview and for tests."""

    filename: str
    content: bytes


class Notifier(Protocol):
    channel: str
    chunk_size: int
    """How many sightings one message may carry (or stand for, when it shows only the first)."""

    def render(self, message: Message) -> list[Rendered]: ...

    def send(self, message: Message) -> None:
        """Deliver or raise DeliveryError. Returns only when the channel answered 2xx."""
        ...

    def render_digest(self, digest: Digest) -> list[Rendered]: ...

    def send_digest(self, digest: Digest) -> None:
        """The daily "alive" message; raise DeliveryError like send(). Not retried across runs."""
        ...

    def close(self) -> None: ...


NOTIFIERS: dict[str, str] = {
    "webhook": "notifiers.webhook:WebhookNotifier",
    "teams": "notifiers.teams:TeamsNotifier",
    "email": "notifiers.email:EmailNotifier",
}


def available_channels() -> list[str]:
    """The channels whose module exists in this build."""
    found = []
    for channel, target in NOTIFIERS.items():
        try:
            importlib.import_module(target.partition(":")[0])
        except ModuleNotFoundError:
            continue
        found.append(channel)
    return found


def create_notifier(channel: str, settings: Settings) -> Notifier:
    module_name, _, class_name = NOTIFIERS[channel].partition(":")
    notifier_class = getattr(importlib.import_module(module_name), class_name)
    return notifier_class(settings)
