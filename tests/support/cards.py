"""Check Teams payloads the way Teams would take them.

Two checks, both needed:

- the Adaptive Cards JavaScript library (npm `adaptivecards`, the renderer family Teams uses)
  parses each card for version 1.4 and runs `validateProperties()`; every card of a test goes
  through ONE node process (tests/support/adaptive_cards.js), so a hundred cards cost one start;
- a JSON-shape check for what that library lets through: a TextBlock without text, an
  `Action.OpenUrl` to a non-https URL, `Action.Submit` (Workflows cards cannot submit), a
  version other than 1.4, the Workflows envelope, and the 28 KB size limit of a Teams message.

`markdown_fields` lists every string Teams renders as markdown, so tests can assert that no
endpoint-supplied value ever lands in one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("adaptive_cards.js")
LIBRARY = ROOT / "node_modules" / "adaptivecards" / "dist" / "adaptivecards.min.js"

TEAMS_MAX_BYTES = 28 * 1024
CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
ELEMENTS_1_4 = {
    "TextBlock", "RichTextBlock", "Image", "Media", "Container", "ColumnSet", "FactSet", "ImageSet",
    "ActionSet", "Input.Text", "Input.Number", "Input.Date", "Input.Time", "Input.Toggle", "Input.ChoiceSet",
}
ACTIONS_TEAMS_WORKFLOWS = {"Action.OpenUrl", "Action.ShowCard", "Action.ToggleVisibility", "Action.Execute"}


class CardToolsMissing(RuntimeError):
    pass


def library_events(cards: Sequence[dict[str, Any]], version: str = "1.4") -> list[list[dict[str, str]]]:
    """The library's parse and validation events for each card (an empty list: valid)."""
    node = shutil.which("node")
    if node is None or not LIBRARY.exists():
        raise CardToolsMissing("node and node_modules/adaptivecards are needed: run `npm ci` (or `make install`)")
    done = subprocess.run(
        [node, str(SCRIPT), "--version", version],
        input=json.dumps(list(cards)).encode("utf-8"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"adaptive_cards.js failed: {done.stderr.decode(errors='replace')[-2000:]}")
    events = json.loads(done.stdout)
    assert len(events) == len(cards)
    return events


def body_bytes(payload: dict[str, Any]) -> int:
    """The size of the payload as the notifier sends it: compact UTF-8 JSON."""
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def card_of(payload: dict[str, Any]) -> dict[str, Any]:
    return payload["attachments"][0]["content"]


def _walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object with a `type` in a card, with a readable path."""
    if isinstance(node, dict):
        if "type" in node:
            yield where, node
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{where}[{index}]")


def elements(card: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    return _walk(card, "card")


def markdown_fields(card: dict[str, Any]) -> list[str]:
    """Every string Teams renders as markdown: TextBlock.text, Fact.title, Fact.value."""
    found = []
    for _, node in elements(card):
        if node.get("type") == "TextBlock":
            found.append(node.get("text", ""))
        elif node.get("type") == "FactSet":
            for fact in node.get("facts", []):
                found += [fact.get("title", ""), fact.get("value", "")]
    return found


def text_runs(card: dict[str, Any]) -> list[str]:
    return [node["text"] for _, node in elements(card) if node.get("type") == "TextRun"]


def actions(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [node for _, node in elements(card) if str(node.get("type", "")).startswith("Action.")]


def _nonempty_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def shape_problems(payload: dict[str, Any], max_bytes: int = TEAMS_MAX_BYTES) -> list[str]:
    """What the library does not catch, or what Teams Workflows refuses."""
    problems: list[str] = []
    if payload.get("type") != "message":
        problems.append("envelope: type must be 'message'")
    attachments = payload.get("attachments")
    if not (isinstance(attachments, list) and len(attachments) == 1):
        return problems + ["envelope: exactly one attachment expected"]
    attachment = attachments[0]
    if attachment.get("contentType") != CARD_CONTENT_TYPE:
        problems.append("envelope: contentType must be the Adaptive Card type")
    if "contentUrl" not in attachment or attachment["contentUrl"] is not None:
        problems.append("envelope: contentUrl must be present and null")
    card = attachment.get("content")
    if not isinstance(card, dict):
        return problems + ["envelope: content must be an object"]
    if card.get("type") != "AdaptiveCard":
        problems.append("card: type must be AdaptiveCard")
    if card.get("version") != "1.4":
        problems.append(f"card: version must be '1.4' (got {card.get('version')!r})")
    if not card.get("$schema"):
        problems.append("card: $schema missing")
    if not card.get("body"):
        problems.append("card: empty body")
    if "actions" in card and not card["actions"]:
        problems.append("card: empty actions list (leave it out)")

    for where, node in elements(card):
        kind = node["type"]
        if where == "card":
            continue
        if kind.startswith("Action."):
            if kind not in ACTIONS_TEAMS_WORKFLOWS:
                problems.append(f"{where}: {kind} does not work in a Workflows card")
            if not _nonempty_text(node.get("title")):
                problems.append(f"{where}: action without a title")
            if kind == "Action.OpenUrl" and not str(node.get("url", "")).startswith("https://"):
                problems.append(f"{where}: Action.OpenUrl url must be https://")
        elif kind == "TextRun":
            if not _nonempty_text(node.get("text")):
                problems.append(f"{where}: TextRun without text")
        elif kind == "Column":
            if not isinstance(node.get("items"), list) or not node["items"]:
                problems.append(f"{where}: Column without items")
        elif kind in ELEMENTS_1_4:
            if kind == "TextBlock" and not _nonempty_text(node.get("text")):
                problems.append(f"{where}: TextBlock without text")
            if kind == "RichTextBlock" and not node.get("inlines"):
                problems.append(f"{where}: RichTextBlock without inlines")
            if kind == "Container" and not node.get("items"):
                problems.append(f"{where}: Container without items")
            if kind == "ColumnSet" and not node.get("columns"):
                problems.append(f"{where}: ColumnSet without columns")
            if kind == "ActionSet" and not node.get("actions"):
                problems.append(f"{where}: ActionSet without actions")
            if kind == "FactSet":
                facts = node.get("facts") or []
                if not facts or not all(_nonempty_text(f.get("title")) and isinstance(f.get("value"), str) for f in facts):
                    problems.append(f"{where}: FactSet needs facts with a title and a value")
        else:
            problems.append(f"{where}: element type {kind!r} is not in Adaptive Cards 1.4")

    size = body_bytes(payload)
    if size >= max_bytes:
        problems.append(f"size: {size} bytes, Teams takes less than {max_bytes}")
    return problems


def problems(payloads: Sequence[dict[str, Any]], max_bytes: int = TEAMS_MAX_BYTES) -> list[list[str]]:
    """Library events and shape problems for each payload, with one node process for all."""
    events = library_events([card_of(p) for p in payloads])
    found = []
    for payload, card_events in zip(payloads, events):
        found.append([f"adaptivecards {e['phase']}: {e['event']}: {e['message']}" for e in card_events]
                     + shape_problems(payload, max_bytes))
    return found


def assert_valid(payloads: Sequence[dict[str, Any]], max_bytes: int = TEAMS_MAX_BYTES) -> None:
    found = problems(payloads, max_bytes)
    bad = {index: p for index, p in enumerate(found) if p}
    assert not bad, f"invalid cards: {json.dumps(bad, indent=1, ensure_ascii=False)[:4000]}"
