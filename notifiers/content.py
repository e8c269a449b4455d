"""What a message looks like to a person: one content model for Teams, mail and the previews.

Every human-facing channel renders a `MessageView`, so the card, the mail body and the CSV never
disagree on what a sighting is, in which order devices come, or how they are counted. The raw
record of a sighting is the webhook's `sighting_json`; the CSV flattens that same record, and the
views here are its display form.

Endpoint-supplied values (device names and ids, source labels) are attacker-controlled. For
display they are cleaned by `display_text`: control and format characters (newlines, bidi
overrides such as U+202E, zero-width characters) become a visible U+FFFD so they can neither
reorder nor hide text, a URL scheme separator is broken with an invisible word joiner so the
value is not turned into a link by a linkifier, and long values end in an ellipsis. Each channel
then keeps the value out of markup in its own way: Teams puts it in a TextRun (never parsed as
markdown), mail templates escape it (Jinja2 autoescape). The webhook JSON carries the raw value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from alerter.model import Digest, Link, Message, Sighting

REPLACEMENT = "\ufffd"
WORD_JOINER = "\u2060"
ELLIPSIS = "…"

NAME_MAX = 80
ID_MAX = 64
OTHER_NAMES_MAX = 3
SOURCE_MAX = 80
DETECTION_NAME_MAX = 160
LINK_TITLE_MAX = 40
LINK_URL_MAX = 4000

# Categories shown as U+FFFD: controls, format characters (bidi embeddings, overrides and
# isolates, zero-width joiners and spaces, the BOM), line and paragraph separators, private use
# and lone surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs"})
_TECHNIQUE = re.compile(r"^T(\d{4})(?:\.(\d{3}))?$")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def display_text(value: object, limit: int | None = None) -> str:
    """A value as safe plain text for a person to read: see the module docstring."""
    if value is None:
        return ""
    text = str(value)
    out = []
    for ch in text:
        if ch in "\t\n\r":
            out.append(" ")
        elif unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            out.append(REPLACEMENT)
        else:
            out.append(ch)
    text = "".join(out).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + ELLIPSIS
    # After truncation, so the inserted joiners never count against the limit or get cut in half.
    text = text.replace("://", ":" + WORD_JOINER + "//")
    return re.sub(r"(?i)\bwww\.", lambda m: m.group(0)[:-1] + WORD_JOINER + ".", text)


def display_time(value: datetime | None) -> str:
    """Minute precision in UTC, the way an analyst reads it: `2026-05-30 09:12 UTC`."""
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "unknown"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    word = singular if count == 1 else (plural_form or singular + "s")
    return f"{count:,} {word}"


def is_safe_url(url: str) -> bool:
    """Only https links to a host become buttons or anchors (no javascript:, data:, http:)."""
    if not url or len(url) > LINK_URL_MAX or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname)


@dataclass(frozen=True)
class LinkView:
    title: str
    url: str


@dataclass(frozen=True)
class Technique:
    id: str
    url: str | None


@dataclass(frozen=True)
class DeviceView:
    name: str
    """Display-clean, at most NAME_MAX characters; `(no name)` when the row had none."""
    device_id: str
    other_names: tuple[str, ...]
    """Other names the device had in the window (renamed devices), at most OTHER_NAMES_MAX."""
    more_names: int
    first_seen: str
    last_seen: str
    count: int
    realert: bool
    source: str
    links: tuple[LinkView, ...]
    """Links for this device only; links every device shares are on the message."""
    sighting: Sighting
    """The raw record, for the CSV (which must match the webhook JSON, not the display)."""


@dataclass(frozen=True)
class MessageView:
    detection_id: str
    detection_name: str
    tactics: tuple[str, ...]
    techniques: tuple[Technique, ...]
    devices: tuple[DeviceView, ...]
    """Every device of the message, in display order (earliest first seen first)."""
    total: int
    """Devices of this detection in this run's delivery, over all messages."""
    chunk_index: int
    chunk_count: int
    run_id: str
    run_at: str
    run_at_raw: datetime
    shared_links: tuple[LinkView, ...]
    """Links every device of the message has (the query): shown once, as message buttons."""

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def realerts(self) -> int:
        return sum(1 for d in self.devices if d.realert)

    @property
    def new(self) -> int:
        return self.count - self.realerts

    @property
    def headline(self) -> str:
        """`3 new devices`, `1 new device, 2 re-alerts`, `2 re-alerts`."""
        parts = []
        if self.new or not self.realerts:
            parts.append(plural(self.new, "new device"))
        if self.realerts:
            parts.append(plural(self.realerts, "re-alert"))
        return ", ".join(parts)

    @property
    def realert_note(self) -> str:
        if not self.realerts:
            return ""
        verb = "is" if self.realerts == 1 else "are"
        return f"{plural(self.realerts, 'device')} reported before {verb} still seen (re-alert)."

    @property
    def part_note(self) -> str:
        """For a run split into several messages: which one this is and the true total."""
        if self.chunk_count <= 1:
            return ""
        return (f"Message {self.chunk_index} of {self.chunk_count}: "
                f"{plural(self.total, 'device')} in this run in all")

    @property
    def technique_text(self) -> str:
        bits = [t.id for t in self.techniques] + list(self.tactics)
        return " · ".join(bits)

    @property
    def subject(self) -> str:
        name = display_text(self.detection_name, 120)
        part = f" (part {self.chunk_index} of {self.chunk_count})" if self.chunk_count > 1 else ""
        return f"{name}: {self.headline}{part}"

    def shown(self, limit: int) -> tuple[tuple[DeviceView, ...], int]:
        """The first `limit` devices and how many more there are."""
        limit = max(0, limit)
        return self.devices[:limit], max(0, self.count - limit)


def _links(links: Iterable[Link]) -> list[LinkView]:
    seen: set[str] = set()
    out = []
    for link in links:
        if link.url in seen or not is_safe_url(link.url):
            continue
        seen.add(link.url)
        out.append(LinkView(display_text(link.title, LINK_TITLE_MAX) or "Open", link.url))
    return out


def shared_links(sightings: Sequence[Sighting]) -> list[LinkView]:
    """Links (by URL) that every sighting carries, in the first sighting's order."""
    if not sightings:
        return []
    common = set.intersection(*({link.url for link in s.links} for s in sightings))
    return [link for link in _links(sightings[0].links) if link.url in common]


def technique(value: str) -> Technique:
    match = _TECHNIQUE.match(value.strip())
    if not match:
        return Technique(display_text(value, 20), None)
    main, sub = match.groups()
    url = f"https://attack.mitre.org/techniques/T{main}/" + (f"{sub}/" if sub else "")
    return Technique(value.strip(), url)


def tactic_name(value: str) -> str:
    """`CommandAndControl` -> `Command and Control`, as MITRE writes it."""
    words = _CAMEL.sub(" ", display_text(value, 40)).split(" ")
    small = {"And": "and", "Or": "or", "Of": "of"}
    return " ".join(small.get(w, w) if i else w for i, w in enumerate(words))


def display_order(sightings: Iterable[Sighting]) -> list[Sighting]:
    """Earliest first seen first (where an investigation starts), then by name: stable."""
    far = datetime.max
    return sorted(
        sightings,
        key=lambda s: (s.first_seen is None, s.first_seen.replace(tzinfo=None) if s.first_seen else far,
                       (s.device_name or "").lower(), s.device_key),
    )


def device_view(s: Sighting, shared: set[str]) -> DeviceView:
    name = display_text(s.device_name, NAME_MAX) or "(no name)"
    current = (s.device_name or "").strip().lower()
    others = [n for n in dict.fromkeys(s.device_names) if n and n.strip().lower() != current]
    return DeviceView(
        name=name,
        device_id=display_text(s.device_id, ID_MAX) or "(no device id)",
        other_names=tuple(display_text(n, NAME_MAX) for n in others[:OTHER_NAMES_MAX]),
        more_names=max(0, len(others) - OTHER_NAMES_MAX),
        first_seen=display_time(s.first_seen),
        last_seen=display_time(s.last_seen),
        count=int(s.count or 0),
        realert=bool(s.realert),
        source=display_text(s.source, SOURCE_MAX),
        links=tuple(link for link in _links(s.links) if link.url not in shared),
        sighting=s,
    )


def message_view(message: Message) -> MessageView:
    detection = message.detection
    ordered = display_order(message.sightings)
    shared = shared_links(ordered)
    shared_urls = {link.url for link in shared}
    return MessageView(
        detection_id=detection.id,
        detection_name=display_text(detection.name, DETECTION_NAME_MAX) or f"Detection {detection.id}",
        tactics=tuple(tactic_name(t) for t in detection.tactics),
        techniques=tuple(technique(t) for t in detection.techniques),
        devices=tuple(device_view(s, shared_urls) for s in ordered),
        total=max(message.total, len(message.sightings)),
        chunk_index=message.chunk_index,
        chunk_count=message.chunk_count,
        run_id=message.run.id,
        run_at=display_time(message.run.at),
        run_at_raw=message.run.at,
        shared_links=tuple(shared),
    )


# --- the daily digest ------------------------------------------------------------------------

ERROR_MAX = 300


@dataclass(frozen=True)
class DetectionLine:
    """One detection in the daily digest."""

    name: str
    devices: int
    new: int
    known: int
    suppressed: int
    realerts: int
    error: str
    """Display-clean query error; empty when the query ran."""

    @property
    def summary(self) -> str:
        text = f"{plural(self.devices, 'device')}, {self.new:,} new, {self.known:,} already reported"
        if self.realerts:
            text += f", {plural(self.realerts, 're-alert')}"
        if self.suppressed:
            text += f", {self.suppressed:,} suppressed"
        return text


@dataclass(frozen=True)
class DigestView:
    run_id: str
    run_at: str
    lines: tuple[DetectionLine, ...]
    """Failed queries first, then detections with new devices, then the rest, each by name."""
    new_total: int
    pending: int
    failed: int

    @property
    def errors(self) -> int:
        return sum(1 for line in self.lines if line.error)

    @property
    def headline(self) -> str:
        new = sum(line.new for line in self.lines)
        realerts = sum(line.realerts for line in self.lines)
        text = f"{plural(len(self.lines), 'detection')} checked, {plural(new, 'new device')}"
        if realerts:
            text += f", {plural(realerts, 're-alert')}"
        if self.errors:
            text += f", {plural(self.errors, 'query', 'queries')} failed"
        return text

    @property
    def subject(self) -> str:
        text = f"Alerter daily digest: {self.headline}"
        if self.failed:
            text += f", {plural(self.failed, 'delivery', 'deliveries')} failed"
        return text

    @property
    def notes(self) -> tuple[tuple[str, bool], ...]:
        """(text, is_a_problem) lines about the delivery ledger."""
        found = []
        if self.pending:
            found.append((f"{plural(self.pending, 'delivery', 'deliveries')} pending: retried every run.", False))
        if self.failed:
            found.append((f"{plural(self.failed, 'delivery', 'deliveries')} failed (gave up retrying): "
                          "see `python -m alerter state list --failed`.", True))
        if not found:
            found.append(("Every delivery went out: nothing pending.", False))
        return tuple(found)


def digest_view(digest: Digest) -> DigestView:
    lines = [
        DetectionLine(
            name=display_text(d.detection_name, DETECTION_NAME_MAX) or f"Detection {d.detection_id}",
            devices=d.devices, new=d.new, known=d.known, suppressed=d.suppressed, realerts=d.realerts,
            error=display_text(d.query_error, ERROR_MAX),
        )
        for d in digest.detections
    ]
    lines.sort(key=lambda line: (not line.error, not (line.new or line.realerts), line.name.lower()))
    return DigestView(
        run_id=digest.run.id,
        run_at=display_time(digest.run.at),
        lines=tuple(lines),
        new_total=digest.new_total,
        pending=digest.pending,
        failed=digest.failed,
    )
