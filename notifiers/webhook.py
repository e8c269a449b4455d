"""WEBHOOK_URL: the generic JSON webhook (Logic App / Power Automate mail flow, SOAR, ...).

Payload schema `alerter.sightings/1` (interfaces.md). With WEBHOOK_SECRET set, the header
`X-Alerter-Signature: sha256=<hex>` is an HMAC-SHA256 of the exact body bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from alerter.http import HttpCallError, HttpPolicy, post, session
from alerter.model import Digest, Message, Sighting
from alerter.settings import Settings
from notifiers import DeliveryError, Rendered

SCHEMA = "alerter.sightings/1"
DIGEST_SCHEMA = "alerter.digest/1"
SIGNATURE_HEADER = "X-Alerter-Signature"
CHUNK_SIZE = 500


def utc_z(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z") if value else None


def sighting_json(s: Sighting) -> dict[str, Any]:
    return {
        "deviceId": s.device_id,
        "deviceName": s.device_name,
        "deviceNames": s.device_names,
        "firstSeen": utc_z(s.first_seen),
        "lastSeen": utc_z(s.last_seen),
        "count": s.count,
        "reportIds": s.report_ids,
        "source": s.source,
        "realert": s.realert,
        "links": [{"title": link.title, "url": link.url} for link in s.links],
    }


def payload(message: Message) -> dict[str, Any]:
    detection = message.detection
    return {
        "schema": SCHEMA,
        "detection": {
            "id": detection.id,
            "name": detection.name,
            "tactics": list(detection.tactics),
            "techniques": list(detection.techniques),
        },
        "run": {"id": message.run.id, "at": utc_z(message.run.at)},
        "sightings": [sighting_json(s) for s in message.sightings],
        "total": message.total,
        "chunk": {"index": message.chunk_index, "count": message.chunk_count},
    }


def digest_payload(digest: Digest) -> dict[str, Any]:
    return {
        "schema": DIGEST_SCHEMA,
        "run": {"id": digest.run.id, "at": utc_z(digest.run.at)},
        "detections": [
            {
                "id": d.detection_id,
                "name": d.detection_name,
                "devices": d.devices,
                "new": d.new,
                "alreadyReported": d.known,
                "suppressed": d.suppressed,
                "realerts": d.realerts,
                "queryError": d.query_error or None,
            }
            for d in digest.detections
        ],
        "newTotal": digest.new_total,
        "pending": digest.pending,
        "failed": digest.failed,
    }


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookNotifier:
    channel = "webhook"
    chunk_size = CHUNK_SIZE

    def __init__(self, settings: Settings) -> None:
        self.url = settings.webhook_url
        self.secret = settings.webhook_secret
        self.policy = HttpPolicy(timeout=settings.http_timeout, retries=settings.http_retries)
        self._http = session(self.policy)

    def body(self, message: Message) -> bytes:
        # Attacker-controlled names go through as JSON strings, byte for byte.
        return json.dumps(payload(message), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def render(self, message: Message) -> list[Rendered]:
        name = f"webhook-{message.detection.id}-{message.chunk_index}.json"
        pretty = json.dumps(payload(message), ensure_ascii=False, indent=2).encode("utf-8")
        return [Rendered(name, pretty)]

    def render_digest(self, digest: Digest) -> list[Rendered]:
        pretty = json.dumps(digest_payload(digest), ensure_ascii=False, indent=2).encode("utf-8")
        return [Rendered("webhook-digest.json", pretty)]

    def send(self, message: Message) -> None:
        self._post(self.body(message))

    def send_digest(self, digest: Digest) -> None:
        self._post(json.dumps(digest_payload(digest), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))

    def _post(self, body: bytes) -> None:
        if not self.url:
            raise DeliveryError("WEBHOOK_URL is not set")
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            post(self._http, self.url, self.policy, what="webhook", data=body, headers=headers)
        except HttpCallError as error:
            raise DeliveryError.from_http(error) from None

    def close(self) -> None:
        self._http.close()
