"""Teams: every card the notifier can produce is valid for the Adaptive Cards library and for
Teams (1.4, < 28 KB, plain text for endpoint data); delivery to a real HTTPS server."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time

import pytest

from alerter.cycle import plan_messages
from alerter.model import Delivery, DeliveryStatus, Link
from notifiers import DeliveryError, create_notifier
from notifiers.content import ELLIPSIS, NAME_MAX, REPLACEMENT, display_text, message_view
from notifiers.teams import BODY_BUDGET, CHUNK_SIZE, SHOW_MAX, TeamsNotifier, Throttle, digest_payload, encode, payload
from tests.support import cards
from tests.support.http_server import Reply
from tests.conftest import sqlite_unless_asked  # noqa: F401 - the module's state_values
from tests.support.messages import DETECTION, HOSTILE_NAMES, QUERY_URL, RUN, digest, many, message, sighting

WEBHOOK_PATH = "/workflows/0c1d2e3f/triggers/manual/paths/invoke"
SIGNATURE = "sig=Zm9vYmFyLXNlY3JldC1zaWduYXR1cmU"


def burst(count: int) -> list:
    """What the cycle hands the notifier for a burst: its own chunking, at the notifier's size."""
    deliveries = [Delivery(DETECTION.id, s.device_key, "teams", DeliveryStatus.PENDING, s) for s in many(count)]
    return [p.message for p in plan_messages(deliveries, CHUNK_SIZE, {DETECTION.id: DETECTION}, RUN)]


def variants() -> dict[str, object]:
    unicode_names = [f"станция-{i}-工作站-🖥️-{'é' * 60}" for i in range(40)]
    return {
        "one device": message([sighting(1)]),
        "one device, no links": message([sighting(1, links=False)]),
        "many devices": message(many(SHOW_MAX)),
        "more than shown": message(many(60)),
        "hostile names": message([sighting(i, name) for i, name in enumerate(HOSTILE_NAMES)]),
        "hostile detection": message(many(2), detection=DETECTION.__class__(
            id="x", name="[evil](https://evil.example) **bold** \u202e", query="", path="",
            tactics=("Command*And*Control",), techniques=("T1219", "[x](y)"))),
        "re-alerts": message([sighting(i, realert=i % 2 == 0) for i in range(5)]),
        "only re-alerts": message([sighting(i, realert=True) for i in range(3)]),
        "renamed device": message([sighting(1, names=["a.contoso.local", "b", "c", "d", "e", "f"], name="a.contoso.local")]),
        "empty name and id": message([sighting(1, name="")]),
        "wide unicode": message([sighting(i, n) for i, n in enumerate(unicode_names)]),
        "long links": message([
            sighting(1).__class__(**{**sighting(1).__dict__, "links": [Link("Device page", "https://x.example/" + "a" * 3900)]})
            for _ in range(1)] + many(30)),
        "unsafe links": message([sighting(1).__class__(**{**sighting(1).__dict__, "links": [
            Link("js", "javascript:alert(1)"), Link("plain", "http://evil.example/"), Link("data", "data:text/html,x")]})]),
        **{f"burst of 5,000 ({m.chunk_index} of {m.chunk_count})": m for m in burst(5000)},
    }


def test_every_card_variant_is_valid_for_the_library_and_for_teams() -> None:
    found = variants()
    payloads = [payload(m) for m in found.values()]
    cards.assert_valid(payloads)
    for name, body in zip(found, payloads):
        size = len(encode(body))
        assert size <= BODY_BUDGET < cards.TEAMS_MAX_BYTES, (name, size)


def test_the_validator_really_catches_bad_cards() -> None:
    good = payload(message([sighting(1)]))
    bad = json.loads(json.dumps(good))
    card = cards.card_of(bad)
    card["version"] = "1.5"
    card["body"] += [{"type": "Table", "columns": []}, {"type": "TextBlock"}, {"type": "TextBlock", "text": "x", "color": "Purple"}]
    card["actions"] = [{"type": "Action.Submit", "title": "go"}, {"type": "Action.OpenUrl", "title": "x", "url": "javascript:1"}]
    card["body"].append({"type": "TextBlock", "text": "x" * 30_000})
    good_problems, bad_problems = cards.problems([good, bad])
    assert good_problems == []
    text = "\n".join(bad_problems)
    for expected in ("UnknownElementType", "InvalidPropertyValue", "TextBlock without text", "version must be '1.4'",
                     "Action.Submit does not work", "must be https://", "size:"):
        assert expected in text


def test_a_burst_of_5000_devices_is_five_cards_with_the_true_total() -> None:
    messages = burst(5000)
    assert len(messages) == 5
    for m in messages:
        card = cards.card_of(payload(m))
        words = " ".join(cards.markdown_fields(card))
        shown = sum(1 for run in cards.text_runs(card) if run.startswith("fin-ws-"))
        assert 0 < shown <= SHOW_MAX
        assert f"{len(m.sightings) - shown:,} more devices not listed" in words
        assert f"Message {m.chunk_index} of 5: 5,000 devices in this run in all" in words
        assert "1,000 new devices" in words
    # Earliest first seen first: the first card starts with the first device of the burst.
    assert "fin-ws-0000.contoso.local" in cards.text_runs(cards.card_of(payload(messages[0])))


def test_a_card_shrinks_its_list_to_fit_and_says_how_many_more() -> None:
    # 20 long names with long device links cannot all fit in 26 KB.
    heavy = [sighting(i, name=f"dev-{i:03d}-" + "n" * 200) for i in range(40)]
    for s in heavy:
        s.links = [Link("Device page", f"https://security.microsoft.com/machines/v2/{s.device_id}/overview?" + "p" * 900),
                   Link("Open the query", QUERY_URL)]
    body = payload(message(heavy))
    card = cards.card_of(body)
    shown = [r for r in cards.text_runs(card) if r.startswith("dev-")]
    assert 3 < len(shown) < SHOW_MAX
    assert len(encode(body)) <= BODY_BUDGET
    assert f"{40 - len(shown):,} more devices not listed in this card." in " ".join(cards.markdown_fields(card))
    assert [a["title"] for a in card["actions"]] == ["Open the query"]


def test_endpoint_values_are_plain_text_never_markdown_or_links() -> None:
    m = message([sighting(i, name) for i, name in enumerate(HOSTILE_NAMES)])
    card = cards.card_of(payload(m))
    markdown = "\n".join(cards.markdown_fields(card))
    runs = cards.text_runs(card)
    # No hostile value (or a piece of one) is in a field Teams renders as markdown.
    for needle in ("evil", "click", "**", "__", "<at>", "<script", "![", "`", "~~", "# Heading", "=cmd", "\u202e"):
        assert needle not in markdown, needle
    # Each one is shown, as text, in a TextRun (markdown-free by the schema).
    assert "[click](https:\u2060//evil.example/phish)" in runs
    assert "**x**" in runs
    assert "<at>Security Team</at>" in runs
    assert "<script>alert(1)</script>&amp;" in runs
    assert "- item  1. item # Heading > quote" in runs
    assert REPLACEMENT + "exe.txt" in runs
    # The only links are the ones built from trusted parts.
    for action in cards.actions(card):
        assert action["url"].startswith("https://security.microsoft.com/"), action
    # Bidi and zero-width controls never reach the card; very long values end in an ellipsis.
    text = json.dumps(card, ensure_ascii=False)
    for control in ("\u202e", "\u200b", "\u2066", "\u2069", "\r", "\n"):
        assert control not in text
    long_name = next(r for r in runs if r.startswith("WWW"))
    assert len(long_name) == NAME_MAX and long_name.endswith(ELLIPSIS)


def test_display_text_rules() -> None:
    assert display_text("[click](https://evil)") == "[click](https:\u2060//evil)"
    assert display_text("**x**") == "**x**"
    assert display_text("a\u202eb\u200bc\u2066d\u2069") == f"a{REPLACEMENT}b{REPLACEMENT}c{REPLACEMENT}d{REPLACEMENT}"
    assert display_text("line1\nline2\ttab\r") == "line1 line2 tab"
    assert display_text("go to WWW.evil.example") == "go to WWW\u2060.evil.example"
    assert display_text("x" * 100, 10) == "x" * 9 + ELLIPSIS
    assert display_text(None) == "" and display_text(12) == "12"
    assert display_text("fin-ws-0142.contoso.local") == "fin-ws-0142.contoso.local"  # ordinary names untouched


def test_the_detection_name_is_also_kept_out_of_markdown() -> None:
    hostile = variants()["hostile detection"]
    card = cards.card_of(payload(hostile))
    assert "evil" not in " ".join(cards.markdown_fields(card))
    assert "[evil](https:\u2060//evil.example) **bold** " + REPLACEMENT in cards.text_runs(card)


def test_card_content_one_device_exact() -> None:
    card = cards.card_of(payload(message([sighting(7, realert=True)])))
    runs = cards.text_runs(card)
    assert runs[:2] == ["Remote Management and Monitoring tool - Panorama9 - File Signature", "T1219 · Command and Control"]
    assert cards.markdown_fields(card)[:2] == ["1 re-alert", "1 device reported before is still seen (re-alert)."]
    assert "fin-ws-0007.contoso.local" in runs and "0000000000000000000000000000000000000007" in runs
    assert ["First seen ", "2026-05-30 09:19 UTC", " · Last seen ", "2026-05-31 08:01 UTC", " · 5 records"] == runs[4:9]
    assert "RE-ALERT" in cards.markdown_fields(card)
    # One device: its links are the card's buttons (nothing to share them with).
    assert [(a["title"], a["url"]) for a in card["actions"]] == [
        ("Device page", "https://security.microsoft.com/machines/v2/0000000000000000000000000000000000000007/overview"),
        ("Open the query", QUERY_URL),
    ]
    assert card["msteams"] == {"width": "Full"}
    assert f"Run 2026-05-31 11:00 UTC · run id {RUN.id}" in cards.markdown_fields(card)


def test_shared_links_are_card_buttons_and_device_links_stay_with_their_device() -> None:
    card = cards.card_of(payload(message(many(3))))
    assert [a["title"] for a in card["actions"]] == ["Open the query"]
    device_buttons = [a for a in cards.actions(card) if a["title"] == "Device page"]
    assert len(device_buttons) == 3
    no_links = cards.card_of(payload(message(many(3, links=False))))
    assert "actions" not in no_links and cards.actions(no_links) == []


def test_the_same_content_model_as_mail() -> None:
    view = message_view(message([sighting(2), sighting(1, realert=True)]))
    assert [d.name for d in view.devices] == ["fin-ws-0001.contoso.local", "fin-ws-0002.contoso.local"]
    assert view.headline == "1 new device, 1 re-alert"


# --- delivery ----------------------------------------------------------------------------------


@pytest.fixture
def teams(https_server, make_settings):
    def build(**overrides: str) -> TeamsNotifier:
        url = f"{https_server.url}{WEBHOOK_PATH}?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&{SIGNATURE}"
        notifier = create_notifier("teams", make_settings(TEAMS_WEBHOOK_URL=url, **overrides))
        assert isinstance(notifier, TeamsNotifier)
        return notifier

    return build


def assert_no_secret(text: str) -> None:
    assert "Zm9vYmFy" not in text and "workflows" not in text and "sig=" not in text


def test_delivery_posts_the_exact_payload(https_server, teams) -> None:
    https_server.default = Reply(202)
    m = message(many(3))
    notifier = teams()
    try:
        notifier.send(m)
    finally:
        notifier.close()
    [request] = https_server.requests
    assert request.method == "POST" and request.path == WEBHOOK_PATH
    assert request.query["sig"] == ["Zm9vYmFyLXNlY3JldC1zaWduYXR1cmU"]
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.body == encode(payload(m))
    assert request.json() == payload(m)
    assert len(request.body) < cards.TEAMS_MAX_BYTES


def test_429_retry_after_is_waited_out_within_the_run(https_server, teams) -> None:
    https_server.then(Reply(429, headers={"Retry-After": "1"}))
    https_server.default = Reply(202)
    notifier = teams()
    started = time.monotonic()
    try:
        notifier.send(message([sighting(1)]))
    finally:
        notifier.close()
    assert time.monotonic() - started >= 0.95
    assert len(https_server.requests) == 2
    assert https_server.requests[0].body == https_server.requests[1].body


def test_429_that_persists_leaves_the_delivery_to_the_next_run(https_server, teams) -> None:
    https_server.default = Reply(429, headers={"Retry-After": "0"})
    notifier = teams(HTTP_RETRIES="1")
    try:
        with pytest.raises(DeliveryError) as caught:
            notifier.send(message([sighting(1)]))
    finally:
        notifier.close()
    assert len(https_server.requests) == 2
    assert "Teams webhook" in str(caught.value) and ("429" in str(caught.value) or "gave up" in str(caught.value))
    assert_no_secret(str(caught.value))


def test_500_is_a_delivery_error_without_the_url(https_server, teams) -> None:
    https_server.default = Reply(500, body="Internal error at /workflows/0c1d2e3f?sig=Zm9vYmFy")
    notifier = teams(HTTP_RETRIES="0")
    try:
        with pytest.raises(DeliveryError) as caught:
            notifier.send(message([sighting(1)]))
    finally:
        notifier.close()
    assert "HTTP 500" in str(caught.value) and https_server.url.split("//")[1] in str(caught.value)
    assert_no_secret(str(caught.value))


def test_a_hung_webhook_times_out(https_server, teams) -> None:
    https_server.default = Reply(202, delay=1.5)
    notifier = teams(HTTP_TIMEOUT="0.4", HTTP_RETRIES="0")
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError) as caught:
            notifier.send(message([sighting(1)]))
    finally:
        notifier.close()
    assert time.monotonic() - started < 1.4
    # alerter.http reports a read timeout after the last retry as "connection failed" (urllib3 wraps it).
    assert "no answer within 0.4 s" in str(caught.value) or "connection failed" in str(caught.value)
    assert_no_secret(str(caught.value))


def test_no_more_than_four_requests_a_second_retries_included(https_server, teams) -> None:
    # The second send gets a 500, which urllib3 retries at once: the throttle spaces the retry too.
    replies = [Reply(202), Reply(500)]
    arrivals: list[float] = []

    def answer(recorded) -> Reply:
        arrivals.append(time.monotonic())
        return replies.pop(0) if replies else Reply(202)

    https_server.responder = answer
    notifier = teams(HTTP_RETRIES="1")
    try:
        for i in range(4):
            notifier.send(message([sighting(i)]))
    finally:
        notifier.close()
    assert len(arrivals) == 5
    # From the second request on, all go over the open connection: no handshake blurs the gaps.
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]
    assert min(gaps) >= 0.24, gaps


def test_throttle_spaces_calls() -> None:
    now = [100.0]
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        now[0] += seconds

    throttle = Throttle(4, clock=lambda: now[0], sleep=sleep)  # no margin: exact numbers
    for _ in range(3):
        throttle.wait()
    now[0] += 1.0
    throttle.wait()
    assert slept == [0.25, 0.25]


def test_missing_url_is_a_clear_error(make_settings) -> None:
    notifier = TeamsNotifier(make_settings())
    with pytest.raises(DeliveryError, match="TEAMS_WEBHOOK_URL is not set"):
        notifier.send(message([sighting(1)]))
    notifier.close()


# --- the daily digest -------------------------------------------------------------------------


def test_digest_cards_are_valid_and_fit() -> None:
    hostile = digest(2, error="HTTP 400 [x](https://evil.example) **bad** query")
    hostile.detections[0].detection_name = "[evil](https://evil.example) **digest**"
    payloads = [digest_payload(d) for d in (digest(1), digest(3, pending=2, failed=1, error="no workspace"),
                                             digest(400, pending=5), hostile)]
    cards.assert_valid(payloads)
    assert all(len(encode(p)) <= BODY_BUDGET for p in payloads)
    big = cards.card_of(payloads[2])
    assert any(t.startswith("…and ") and t.endswith(" more detections.") for t in cards.markdown_fields(big))
    card = cards.card_of(payloads[3])
    assert "evil" not in " ".join(cards.markdown_fields(card))
    assert "[evil](https:\u2060//evil.example) **digest**" in cards.text_runs(card)
    failing = cards.card_of(payloads[1])
    words = cards.markdown_fields(failing)
    assert "3 detections checked, 2 new devices, 1 re-alert, 1 query failed" in words
    assert "1 delivery failed (gave up retrying): see `python -m alerter state list --failed`." in words
    assert "Query failed: no workspace" in cards.text_runs(failing)


def test_digest_is_sent_like_a_message(https_server, teams) -> None:
    https_server.default = Reply(202)
    notifier = teams()
    try:
        notifier.send_digest(digest(2))
        assert notifier.render_digest(digest(2))[0].filename == "teams-digest.json"
    finally:
        notifier.close()
    [request] = https_server.requests
    assert request.json() == digest_payload(digest(2))


# --- the picture (make card-preview) ----------------------------------------------------------


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser")), reason="no Chromium installed")
def test_card_preview_renders_a_png(tmp_path) -> None:
    source = tmp_path / "teams.json"
    source.write_text(json.dumps(payload(message(many(2) + [sighting(5, HOSTILE_NAMES[0], realert=True)]))))
    done = subprocess.run(["node", str(cards.ROOT / "tools" / "card_preview.js"), str(source), str(tmp_path / "card.png")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    png = (tmp_path / "card.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 712 and 300 < height < 2000  # measured to fit the rendered card


def test_a_retry_after_past_the_run_is_not_slept(https_server, teams) -> None:
    https_server.default = Reply(429, headers={"Retry-After": "3600"})
    notifier = teams(HTTP_RETRIES="2")
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError) as caught:
            notifier.send(message([sighting(1)]))
    finally:
        notifier.close()
    assert time.monotonic() - started < 5 and len(https_server.requests) == 1
    assert caught.value.retry_after == pytest.approx(3600, abs=5)
