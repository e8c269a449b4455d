"""SUPPRESSIONS_PATH: sanctioned devices, each with a reason, an owner and an optional expiry.

```yaml
- detection: "*"                 # id, name or * for every detection
  deviceName: "it-jump-*"        # a glob over the device name (case-insensitive)
  deviceId: 0f1e...              # and/or an exact DeviceId
  reason: Panorama9 is our sanctioned RMM on IT jump hosts (CHG-1234)
  owner: it-ops@contoso.com
  expires: 2026-12-31T00:00:00Z  # optional; after it the device is reported again
```
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from alerter.model import Detection, Sighting
from alerter.sightings import as_utc

ALLOWED_KEYS = {"detection", "deviceId", "deviceName", "reason", "owner", "expires"}


class SuppressionError(ValueError):
    """The suppressions file is wrong; names the file, the entry and the field."""


@dataclass(frozen=True)
class Suppression:
    detection: str
    reason: str
    owner: str
    device_id: str | None = None
    device_name_glob: str | None = None
    expires: datetime | None = None

    def applies(self, detection: Detection, sighting: Sighting, now: datetime) -> bool:
        if self.expires is not None and now >= self.expires:
            return False
        if self.detection != "*" and self.detection not in (detection.id, detection.name):
            return False
        if self.device_id is not None and sighting.device_id != self.device_id:
            return False
        if self.device_name_glob is not None:
            pattern = self.device_name_glob.lower()
            names = sighting.device_names or [sighting.device_name]
            # Every name the device had must match: renaming a machine into a sanctioned pattern
            # must not hide what it was called before.
            if not all(fnmatch.fnmatchcase(name.lower(), pattern) for name in names):
                return False
        return True


@dataclass
class Suppressions:
    entries: list[Suppression] = field(default_factory=list)

    def match(self, detection: Detection, sighting: Sighting, now: datetime) -> Suppression | None:
        for entry in self.entries:
            if entry.applies(detection, sighting, now):
                return entry
        return None


def _entry(raw: Any, where: str) -> Suppression:
    if not isinstance(raw, dict):
        raise SuppressionError(f"{where}: must be a mapping")
    unknown = set(raw) - ALLOWED_KEYS
    if unknown:
        raise SuppressionError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("detection", "reason", "owner"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SuppressionError(f"{where}: field '{key}' is required (a non-empty string)")
    device_id, glob = raw.get("deviceId"), raw.get("deviceName")
    if device_id is None and glob is None:
        raise SuppressionError(f"{where}: needs deviceId, deviceName or both")
    for key, value in (("deviceId", device_id), ("deviceName", glob)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SuppressionError(f"{where}: field '{key}' must be a non-empty string")
    if glob is not None and glob.count("[") != glob.count("]"):
        raise SuppressionError(f"{where}: field 'deviceName' is not a valid glob (unbalanced brackets)")
    expires = raw.get("expires")
    if expires is not None:
        try:
            expires = as_utc(expires if isinstance(expires, (str, datetime)) else str(expires))
        except ValueError:
            raise SuppressionError(f"{where}: field 'expires' is not an ISO 8601 time") from None
    return Suppression(
        detection=raw["detection"].strip(),
        reason=raw["reason"].strip(),
        owner=raw["owner"].strip(),
        device_id=device_id.strip() if device_id else None,
        device_name_glob=glob.strip() if glob else None,
        expires=expires,
    )


def load_suppressions(path: Path | None) -> Suppressions:
    if path is None:
        return Suppressions()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SuppressionError(f"SUPPRESSIONS_PATH {path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SuppressionError(f"SUPPRESSIONS_PATH {path}: not valid YAML{where}") from None
    if document is None:
        return Suppressions()
    if not isinstance(document, list):
        raise SuppressionError(f"SUPPRESSIONS_PATH {path}: must be a YAML list of entries")
    return Suppressions([_entry(raw, f"SUPPRESSIONS_PATH {path}: entry {i}") for i, raw in enumerate(document, 1)])
