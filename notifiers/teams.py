"""TEAMS_WEBHOOK_URL: a Teams Workflows webhook ("When a Teams webhook request is received").

One POST per message: `{"type": "message", "attachments": [<Adaptive Card 1.4>]}`.

- Plain text only for endpoint data. Teams renders a markdown subset (bold, italic, lists,
  links) in `TextBlock.text` and `Fact.title`/`Fact.value`, and its clients have disagreed on
  backslash escapes (desktop honours them, mobile clients showed the backslashes). So no value
  that comes from a query result ever goes into one of those fields: device names, ids and the
  detection's own name go into `TextRun`s of a `RichTextBlock`, which the schema defines as
  markdown-free ("Markdown is not supported"). TextBlocks carry only our own words and numbers.
- Bounded size. A card stands for up to CHUNK_SIZE devices and lists the first SHOW_MAX; the
  list shrinks until the UTF-8 JSON body is at most BODY_BUDGET bytes (Teams refuses messages
  over about 28 KB), and the card says how many more it stands for and the true total.
- At most 4 requests a second to Teams, counted over every attempt (retries included) across
  `send()` calls; a 429's Retry-After is waited out by alerter.http within the run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any


from alerter.http import BoundedRetry, HttpCallError, HttpPolicy, post, session
from alerter.model import Digest, Message
from alerter.settings import Settings
from notifiers import DeliveryError, Rendered
from notifiers.content import DeviceView, DigestView, LinkView, MessageView, digest_view, message_view, plural

CARD_VERSION = "1.4"
SCHEMA_URL = "http://adaptivecards.io/schemas/adaptive-card.json"
CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"

CHUNK_SIZE = 1000
"""Devices one card stands for: a burst of 5,000 new devices is 5 cards."""
SHOW_MAX = 20
"""Devices a card lists at most; a longer list is not read in a chat anyway."""
TEAMS_MAX_BYTES = 28 * 1024
BODY_BUDGET = 26 * 1024
"""What we allow ourselves: 2 KB under the Teams limit for what the flow adds around the card."""
MESSAGE_ACTIONS_MAX = 4
DEVICE_ACTIONS_MAX = 2
REQUESTS_PER_SECOND = 4.0
SPACING_MARGIN_SECONDS = 0.02
"""Added to the 250 ms between requests, so network jitter does not make two arrive closer."""


# --- the card -------------------------------------------------------------------------------


def text_run(text: str, **style: Any) -> dict[str, Any]:
    return {"type": "TextRun", "text": text, **style}


def rich_text(*runs: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"type": "RichTextBlock", "inlines": list(runs), **props}


def text_block(text: str, **props: Any) -> dict[str, Any]:
    """Our own wording and numbers only: TextBlock text is markdown."""
    return {"type": "TextBlock", "text": text, "wrap": True, **props}


def open_url(link: LinkView) -> dict[str, Any]:
    return {"type": "Action.OpenUrl", "title": link.title, "url": link.url}


def device_item(device: DeviceView) -> dict[str, Any]:
    details: list[dict[str, Any]] = [
        rich_text(text_run(device.name, weight="Bolder")),
        rich_text(text_run(device.device_id, isSubtle=True, size="Small", fontType="Monospace"), spacing="None"),
        rich_text(
            text_run("First seen ", isSubtle=True), text_run(device.first_seen),
            text_run(" · Last seen ", isSubtle=True), text_run(device.last_seen),
            text_run(" · " + plural(device.count, "record"), isSubtle=True),
            spacing="Small",
        ),
    ]
    if device.other_names:
        others = ", ".join(device.other_names)
        if device.more_names:
            others += f" (+{device.more_names:,} more)"
        details.append(rich_text(text_run("Also named ", isSubtle=True), text_run(others), spacing="None"))
    columns: list[dict[str, Any]] = [{"type": "Column", "width": "stretch", "items": details}]
    if device.realert:
        columns.append({"type": "Column", "width": "auto", "items": [
            text_block("RE-ALERT", color="Warning", weight="Bolder", size="Small")]})
    items: list[dict[str, Any]] = [{"type": "ColumnSet", "columns": columns}]
    if device.links:
        # Below the details, not beside them: a side column squeezes the text on a phone.
        items.append({"type": "ActionSet", "spacing": "Small",
                      "actions": [open_url(link) for link in device.links[:DEVICE_ACTIONS_MAX]]})
    return {"type": "Container", "items": items, "separator": True, "spacing": "Medium"}


def build_card(view: MessageView, show: int, with_actions: bool = True) -> dict[str, Any]:
    shown, more = view.shown(show)
    header: list[dict[str, Any]] = [rich_text(text_run(view.detection_name, size="Large", weight="Bolder"))]
    if view.technique_text:
        header.append(rich_text(text_run(view.technique_text, isSubtle=True), spacing="None"))
    body: list[dict[str, Any]] = [
        {"type": "Container", "style": "attention", "bleed": True, "items": header},
        text_block(view.headline, size="Medium", weight="Bolder"),
    ]
    if view.realerts:
        body.append(text_block(view.realert_note, color="Warning", spacing="None"))
    if view.part_note:
        body.append(text_block(view.part_note + ".", isSubtle=True, spacing="None"))
    body.extend(device_item(device) for device in shown)
    if more:
        tail = f"…and {plural(more, 'more device')} not listed in this card."
        if with_actions and view.shared_links:
            tail += " Open the query to see them all."
        body.append(text_block(tail, weight="Bolder", separator=True, spacing="Medium"))
    body.append(text_block(f"Run {view.run_at} · run id {view.run_id}", isSubtle=True, size="Small",
                           separator=not more, spacing="Medium"))
    card: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": SCHEMA_URL,
        "version": CARD_VERSION,
        "msteams": {"width": "Full"},
        "body": body,
    }
    if with_actions and view.shared_links:
        card["actions"] = [open_url(link) for link in view.shared_links[:MESSAGE_ACTIONS_MAX]]
    return card


def envelope(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message",
        "attachments": [{"contentType": CONTENT_TYPE, "contentUrl": None, "content": card}],
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fitted_payload(view: MessageView, budget: int = BODY_BUDGET) -> dict[str, Any]:
    """The largest card (most devices listed) whose body fits the budget."""
    for with_actions in (True, False):
        low, high = 0, min(SHOW_MAX, view.count)
        if len(encode(envelope(build_card(view, low, with_actions)))) > budget:
            continue
        while low < high:  # the size grows with every device listed: binary search
            middle = (low + high + 1) // 2
            if len(encode(envelope(build_card(view, middle, with_actions)))) <= budget:
                low = middle
            else:
                high = middle - 1
        return envelope(build_card(view, low, with_actions))
    raise ValueError(f"no card for {view.detection_id} fits {budget} bytes")  # values are length-capped


def payload(message: Message) -> dict[str, Any]:
    return fitted_payload(message_view(message))


def build_digest_card(view: DigestView, show: int) -> dict[str, Any]:
    body: list[dict[str, Any]] = [
        {"type": "Container", "style": "emphasis", "bleed": True, "items": [
            text_block("Daily digest: the alerter is running", size="Large", weight="Bolder"),
            text_block(f"Run {view.run_at} · run id {view.run_id}", isSubtle=True, spacing="None"),
        ]},
        text_block(view.headline, size="Medium", weight="Bolder"),
    ]
    for line in view.lines[:show]:
        detail = (text_run("Query failed: " + line.error, color="Attention") if line.error
                  else text_run(line.summary, isSubtle=not (line.new or line.realerts)))
        body.append({"type": "Container", "separator": True, "items": [
            rich_text(text_run(line.name, weight="Bolder")),
            rich_text(detail, spacing="None"),
        ]})
    if len(view.lines) > show:
        body.append(text_block(f"…and {plural(len(view.lines) - show, 'more detection')}.", separator=True))
    for text, problem in view.notes:
        body.append(text_block(text, separator=True, **({"color": "Attention", "weight": "Bolder"} if problem else {})))
    return {"type": "AdaptiveCard", "$schema": SCHEMA_URL, "version": CARD_VERSION,
            "msteams": {"width": "Full"}, "body": body}


def digest_payload(digest: Digest, budget: int = BODY_BUDGET) -> dict[str, Any]:
    view = digest_view(digest)
    low, high = 0, len(view.lines)
    while low < high:
        middle = (low + high + 1) // 2
        if len(encode(envelope(build_digest_card(view, middle)))) <= budget:
            low = middle
        else:
            high = middle - 1
    return envelope(build_digest_card(view, low))


# --- throttling ----------------------------------------------------------------------------


class Throttle:
    """Spaces calls at least 1/rate seconds apart (thread-safe)."""

    def __init__(self, per_second: float, margin: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / per_second + margin
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


class _ThrottledRetry(BoundedRetry):
    """The project's Retry (no long Retry-After slept in a run) that also waits for the throttle
    before every retried attempt."""

    def __init__(self, *args: Any, throttle: Throttle | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.throttle = throttle

    def new(self, **kw: Any) -> _ThrottledRetry:
        fresh = super().new(**kw)
        fresh.throttle = self.throttle
        return fresh

    def sleep(self, response: Any = None) -> None:
        super().sleep(response)
        if self.throttle is not None:
            self.throttle.wait()


# --- the notifier --------------------------------------------------------------------------


class TeamsNotifier:
    channel = "teams"
    chunk_size = CHUNK_SIZE

    def __init__(self, settings: Settings) -> None:
        self.url = settings.teams_webhook_url
        self.policy = HttpPolicy(timeout=settings.http_timeout, retries=settings.http_retries)
        self.throttle = Throttle(REQUESTS_PER_SECOND, SPACING_MARGIN_SECONDS)
        self._http = session(self.policy, _ThrottledRetry, throttle=self.throttle)

    def body(self, message: Message) -> bytes:
        return encode(payload(message))

    def render(self, message: Message) -> list[Rendered]:
        name = f"teams-{message.detection.id}-{message.chunk_index}.json"
        pretty = json.dumps(payload(message), ensure_ascii=False, indent=2).encode("utf-8")
        return [Rendered(name, pretty)]

    def send(self, message: Message) -> None:
        self._post(self.body(message))

    def render_digest(self, digest: Digest) -> list[Rendered]:
        pretty = json.dumps(digest_payload(digest), ensure_ascii=False, indent=2).encode("utf-8")
        return [Rendered("teams-digest.json", pretty)]

    def send_digest(self, digest: Digest) -> None:
        self._post(encode(digest_payload(digest)))

    def _post(self, body: bytes) -> None:
        if not self.url:
            raise DeliveryError("TEAMS_WEBHOOK_URL is not set")
        self.throttle.wait()
        try:
            post(self._http, self.url, self.policy, what="Teams webhook", data=body,
                 headers={"Content-Type": "application/json; charset=utf-8"})
        except HttpCallError as error:
            raise DeliveryError.from_http(error) from None

    def close(self) -> None:
        self._http.close()
