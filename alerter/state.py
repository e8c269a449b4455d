"""`alerter state list | forget | retry`: the operator's view into the ledger, on any store."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

from alerter.detections import load_detections
from alerter.ledger import DeviceRecord, Store
from alerter.model import DeliveryStatus
from alerter.settings import Settings

EXIT_OK, EXIT_USAGE = 0, 2


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def _detection_names(settings: Settings) -> dict[str, str]:
    loaded = load_detections(settings.detections_path, every_file=True)
    return {d.id: d.name for d in loaded.detections}


def _resolve_detection(wanted: str, names: dict[str, str]) -> str:
    for detection_id, name in names.items():
        if wanted in (detection_id, name):
            return detection_id
    return wanted  # an id of a detection whose file is gone is still valid in the ledger


def _record_json(record: DeviceRecord, names: dict[str, str]) -> dict[str, Any]:
    s = record.sighting
    return {
        "detectionId": record.detection_id,
        "detectionName": names.get(record.detection_id, ""),
        "deviceKey": s.device_key,
        "deviceId": s.device_id,
        "deviceName": s.device_name,
        "firstReported": _time(record.first_reported_at),
        "firstSeen": _time(s.first_seen),
        "lastSeen": _time(s.last_seen),
        "deliveries": {
            d.channel: {
                "status": d.status.value,
                "attempts": d.attempts,
                "nextAttempt": _time(d.next_attempt_at) if d.status is DeliveryStatus.PENDING else None,
                "sent": _time(d.sent_at) if d.sent_at else None,
                "lastError": d.last_error or None,
            }
            for d in record.deliveries
        },
    }


def cmd_list(args: argparse.Namespace, store: Store, settings: Settings, json_out: bool) -> int:
    names = _detection_names(settings)
    detection_id = _resolve_detection(args.detection, names) if args.detection else None
    records = store.records(detection_id)
    wanted = {status for flag, status in ((args.pending, "pending"), (args.failed, "failed")) if flag}
    if wanted:
        records = [r for r in records if any(d.status.value in wanted for d in r.deliveries)]
    if json_out:
        print(json.dumps([_record_json(r, names) for r in records], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not records:
        print("No devices in the ledger" + (" matching the filter." if wanted or detection_id else "."))
        return EXIT_OK
    current = None
    for record in records:
        if record.detection_id != current:
            current = record.detection_id
            print(f"{names.get(current, current)} ({current})")
        s = record.sighting
        # Device names come from endpoints: repr() shows control and bidi characters as escapes.
        print(f"  {s.device_name!r} id={s.device_id!r} first reported {_time(record.first_reported_at)}")
        for d in record.deliveries:
            detail = {
                DeliveryStatus.SENT: f"sent {_time(d.sent_at)}",
                DeliveryStatus.PENDING: f"pending, {d.attempts} attempts, next {_time(d.next_attempt_at)}",
                DeliveryStatus.FAILED: f"FAILED after {d.attempts} attempts",
            }[d.status]
            error = f" — {d.last_error!r}" if d.last_error and d.status is not DeliveryStatus.SENT else ""
            print(f"    {d.channel}: {detail}{error}")
    print(f"{len(records)} device(s)")
    return EXIT_OK


def cmd_forget(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    detection_id = _resolve_detection(args.detection, _detection_names(settings))
    matches = [
        r.sighting.device_key
        for r in store.records(detection_id)
        if args.device in (r.sighting.device_key, r.sighting.device_id)
        or args.device.lower() == r.sighting.device_name.lower()
    ]
    if not matches:
        print(f"No device {args.device!r} under detection {detection_id} in the ledger.")
        return EXIT_USAGE
    for key in dict.fromkeys(matches):
        store.forget(detection_id, key)
        print(f"Forgot {key!r} under {detection_id}: it will be reported again when next seen.")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, store: Store) -> int:
    count = store.retry_failed(datetime.now(timezone.utc), args.channel)
    print(f"{count} deliveries are due now; the next run sends them.")
    return EXIT_OK


def state_command(args: argparse.Namespace, store: Store, settings: Settings, json_out: bool = False) -> int:
    if args.state_command == "list":
        return cmd_list(args, store, settings, json_out)
    if args.state_command == "forget":
        return cmd_forget(args, store, settings)
    return cmd_retry(args, store)
