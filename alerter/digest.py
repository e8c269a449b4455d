"""DIGEST_AT: once a day, tell every channel the alerter is alive and what it checked.

Silence from a detector is ambiguous: nothing found, or nothing running. The digest goes out
with the first scheduled run at or after DIGEST_AT (UTC) each day, decided from the schedule
itself, so it needs no state: a run sends it when the previous tick of ALERT_SCHEDULE was
before today's digest time. A run started by hand in between may send a second one that day.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta

from croniter import croniter


def digest_due(now: datetime, schedule: str, digest_at: time | None) -> bool:
    if digest_at is None:
        return False
    today = now.replace(hour=digest_at.hour, minute=digest_at.minute, second=0, microsecond=0)
    if now < today:
        return False
    # The tick this run belongs to, then the one before it.
    ticks = croniter(schedule, now + timedelta(seconds=1), second_at_beginning=True)
    ticks.get_prev(datetime)
    previous: datetime = ticks.get_prev(datetime)
    return previous < today
