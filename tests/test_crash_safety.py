"""Crash safety, shown: a real `python -m alerter run` is killed (SIGKILL) while a message is on
the wire, and the runs after it deliver every device at least once and at most twice.

The webhook receiver is a real HTTP server on loopback. It answers the first message, then holds
the second one open until the process is dead. So at the moment of the kill the ledger holds:
message 1 marked sent, message 2 claimed (leased to the dead run) and received by the receiver,
message 3 pending and not yet claimed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from alerter.ledger import LEASE_SECONDS, open_store
from alerter.settings import Settings
from notifiers.webhook import CHUNK_SIZE
from tests.support.azurite import wall_clock_ahead
from tests.support.http_server import Recorded, RecordingServer, Reply

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
DEVICES = 2 * CHUNK_SIZE + 200  # three webhook messages: 500, 500, 200
HTTP_TIMEOUT, HTTP_RETRIES = 30, 0


@pytest.fixture(params=["sqlite", "table"])
def ledger_values(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"STATE_STORE": "sqlite", "STATE_PATH": str(tmp_path / "state.db")}
    return dict(request.getfixturevalue("table_state_values"))


class HoldingReceiver:
    """Answers 200, except message number `hold` (1-based), which it keeps open until released."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.release = threading.Event()
        self.holding = threading.Event()
        self._seen = 0
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        with self._lock:
            self._seen += 1
            number = self._seen
        if number == self.hold:
            self.holding.set()
            self.release.wait(timeout=120)
            return Reply(drop=True)  # the client is gone by now
        return Reply(200)


def devices_received(server: RecordingServer) -> Counter[str]:
    return Counter(s["deviceId"] for r in server.requests for s in r.json()["sightings"])


def test_a_run_killed_mid_delivery_loses_nothing_and_duplicates_at_most_once(
    ledger_values: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with (data / "DeviceFileCertificateInfo.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(DEVICES):
            handle.write(json.dumps({"Timestamp": "2026-05-30T09:00:00Z", "DeviceId": f"dev-{i:05d}",
                                     "DeviceName": f"ws-{i:05d}.corp", "Signer": "Panorama9, Inc.",
                                     "ReportId": i}) + "\n")
    receiver = HoldingReceiver(hold=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATE_", "AzureWebJobs", "WEBHOOK"))}
    with RecordingServer(responder=receiver) as hook:
        values = {
            "QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(data), "DETECTIONS_PATH": str(ROOT / "detections"),
            "WEBHOOK_URL": hook.url + "/hook", "HTTP_TIMEOUT": str(HTTP_TIMEOUT), "HTTP_RETRIES": str(HTTP_RETRIES),
            **ledger_values,
        }
        settings_file = tmp_path / "local.settings.json"
        settings_file.write_text(json.dumps({"Values": values}), encoding="utf-8")
        command = [sys.executable, "-m", "alerter", "run", "--settings", str(settings_file), "--now", NOW.isoformat()]

        try:
            doomed = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                assert receiver.holding.wait(timeout=60), "the run never sent its second message"
                time.sleep(0.2)  # it is blocked reading the answer
                assert doomed.poll() is None
                os.kill(doomed.pid, signal.SIGKILL)
                assert doomed.wait(timeout=30) == -signal.SIGKILL
            finally:
                if doomed.poll() is None:
                    doomed.kill()
                    doomed.wait()
                if doomed.stderr:
                    doomed.stderr.close()
        finally:
            receiver.release.set()
        assert [len(r.json()["sightings"]) for r in hook.requests] == [CHUNK_SIZE, CHUNK_SIZE]
        first_message = {s["deviceId"] for s in hook.requests[0].json()["sightings"]}
        in_flight = {s["deviceId"] for s in hook.requests[1].json()["sightings"]}

        settings = Settings.load(environ=values)
        store = open_store(settings)
        try:
            assert store.counts() == {"webhook": {"sent": CHUNK_SIZE, "pending": DEVICES - CHUNK_SIZE}}
        finally:
            store.close()

        # The next run, right away: it sends what was never claimed, and leaves the dead run's
        # claims alone while their lease lasts (a live run could still be sending them).
        right_away = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert right_away.returncode == 0, right_away.stdout + right_away.stderr
        assert "0 new" in right_away.stdout
        assert len(hook.requests) == 3 and len(hook.requests[2].json()["sightings"]) == DEVICES - 2 * CHUNK_SIZE

        # A run after the lease ran out takes the dead run's claims over and sends them again.
        later_env = wall_clock_ahead(tmp_path / "later", LEASE_SECONDS + 30, env)
        later = subprocess.run(command, cwd=ROOT, env=later_env, capture_output=True, text=True, timeout=120)
        assert later.returncode == 0, later.stdout + later.stderr
        assert len(hook.requests) == 4
        assert {s["deviceId"] for s in hook.requests[3].json()["sightings"]} == in_flight

        # And one more run has nothing left to send.
        quiet = subprocess.run(command, cwd=ROOT, env=later_env, capture_output=True, text=True, timeout=120)
        assert quiet.returncode == 0 and len(hook.requests) == 4, quiet.stdout + quiet.stderr

    received = devices_received(hook)
    assert set(received) == {f"dev-{i:05d}" for i in range(DEVICES)}, "every device was delivered"
    assert max(received.values()) <= 2, "no device was delivered more than twice"
    assert {d for d, n in received.items() if n == 2} == in_flight, "only the message in flight was repeated"
    assert all(received[d] == 1 for d in first_message)
    store = open_store(settings)
    try:
        assert store.counts() == {"webhook": {"sent": DEVICES}}
    finally:
        store.close()
