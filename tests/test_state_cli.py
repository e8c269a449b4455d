"""`python -m alerter state list | forget | retry` on both stores: what an operator types and reads.

The ledger is filled through the Store protocol (the same calls a run makes), then inspected and
changed through the command line: in-process through `alerter.cli.main` for most cases, and as a
real subprocess for exit statuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from alerter.cli import main
from alerter.ledger import Failure, Store, open_store
from alerter.model import Sighting
from alerter.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
PANORAMA9 = "7a706363-95d0-4c85-9a65-f4a4463d09cf"
PANORAMA9_NAME = "Remote Management and Monitoring tool - Panorama9 - File Signature"
ORPHAN = "0b1c2d3e-0000-4000-8000-00000000dead"  # a detection whose file is gone
EVIL_NAME = "evil\u202egnp.exe\nFAKE LINE\x1b[31m"
BACKOFF, GIVE_UP = timedelta(hours=1), timedelta(days=7)


@pytest.fixture(params=["sqlite", "table"])
def settings_file(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local.settings.json for a deployment on the store under test (real env vars would win)."""
    for name in list(os.environ):
        if name.startswith(("STATE_", "AzureWebJobs", "WEBHOOK", "TEAMS", "EMAIL")):
            monkeypatch.delenv(name)
    if request.param == "sqlite":
        ledger = {"STATE_STORE": "sqlite", "STATE_PATH": str(tmp_path / "state.db")}
    else:
        ledger = dict(request.getfixturevalue("table_state_values"))
    (tmp_path / "data").mkdir()
    values = {"QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(tmp_path / "data"),
              "DETECTIONS_PATH": str(ROOT / "detections"), "WEBHOOK_URL": "http://127.0.0.1:9/hook", **ledger}
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": values}), encoding="utf-8")
    return path


@pytest.fixture
def store(settings_file: Path) -> Iterator[Store]:
    opened = open_store(Settings.load(environ={}, settings_file=settings_file))
    yield opened
    opened.close()


def sighting(key: str, name: str, device_id: str | None = None) -> Sighting:
    return Sighting(key, key if device_id is None else device_id, name, NOW - timedelta(days=1), NOW, 1, [7],
                    "local:data", [name])


@pytest.fixture
def ledger(store: Store) -> Store:
    """sent-01 (sent), pending-02 (failed once, backing off), failed-03 (gave up), an evil name,
    and a device under a detection whose file is gone."""
    store.add_new(PANORAMA9, [sighting("sent-01", "ws-sent.corp"), sighting("pending-02", "WS-Pending.corp"),
                              sighting("failed-03", "ws-failed.corp"),
                              sighting("evil name", EVIL_NAME, device_id="")], ["webhook"], NOW)
    store.add_new(ORPHAN, [sighting("orphan-04", "ws-orphan.corp")], ["webhook"], NOW + timedelta(minutes=1))
    due = {d.device_key: d for d in store.claim(store.due("webhook", NOW), "run-1", 60)}
    store.mark_sent([due["sent-01"]], NOW + timedelta(seconds=5))
    store.mark_failed([due["pending-02"]], Failure("webhook at http://127.0.0.1:9/…: HTTP 503", NOW, BACKOFF, GIVE_UP))
    # Giving up takes the give-up window and at least two attempts.
    store.mark_failed([due["failed-03"]], Failure("webhook at http://127.0.0.1:9/…: HTTP 503", NOW, BACKOFF, GIVE_UP))
    [again] = [d for d in store.due("webhook", NOW + GIVE_UP) if d.device_key == "failed-03"]
    store.mark_failed([again], Failure("webhook at http://127.0.0.1:9/…: HTTP 410", NOW + GIVE_UP, BACKOFF, GIVE_UP))
    store.mark_sent([due["evil name"]], NOW)
    return store


def cli(capsys: pytest.CaptureFixture[str], settings_file: Path, *args: str) -> tuple[int, str, str]:
    code = main(["state", *args, "--settings", str(settings_file)])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_device_per_detection_with_its_deliveries(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, settings_file, "list")
    assert code == 0
    lines = out.splitlines()
    assert f"{PANORAMA9_NAME} ({PANORAMA9})" in lines
    assert f"{ORPHAN} ({ORPHAN})" in lines, "a detection without a file is listed by its id"
    assert lines[-1] == "5 device(s)"

    def block(name: str) -> list[str]:
        """The device's line and its channel lines (the exact layout is state.py's to choose)."""
        start = next(i for i, line in enumerate(lines) if line.startswith(f"  {name!r} "))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
        return lines[start:end]

    sent, pending, failed = block("ws-sent.corp"), block("WS-Pending.corp"), block("ws-failed.corp")
    assert "sent-01" in sent[0] and "first reported 2026-05-31T11:00:00Z" in sent[0]
    assert sent[1:] == ["    webhook: sent 2026-05-31T11:00:05Z"]
    assert len(pending) == 2 and pending[1].startswith("    webhook: pending, 1 attempts, next 2026-05-31T11:01:00Z")
    assert "HTTP 503" in pending[1]
    assert len(failed) == 2 and failed[1].startswith("    webhook: FAILED after 2 attempts") and "HTTP 410" in failed[1]
    assert "first reported 2026-05-31T11:01:00Z" in block("ws-orphan.corp")[0]
    # The attacker's name is shown escaped: no bidi override, no injected line, no terminal escape.
    assert "first reported 2026-05-31T11:00:00Z" in block(EVIL_NAME)[0]
    assert "\u202e" not in out and "\x1b" not in out and "FAKE LINE" not in [line.strip() for line in lines]


def test_list_filters_pending_failed_and_by_detection(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def devices(*args: str) -> list[str]:
        code, out, _ = cli(capsys, settings_file, "list", "--json", *args)
        assert code == 0
        return sorted(d["deviceKey"] for d in json.loads(out))

    assert devices() == ["evil name", "failed-03", "orphan-04", "pending-02", "sent-01"]
    assert devices("--pending") == ["orphan-04", "pending-02"]
    assert devices("--failed") == ["failed-03"]
    assert devices("--pending", "--failed") == ["failed-03", "orphan-04", "pending-02"]
    assert devices("--detection", PANORAMA9_NAME) == ["evil name", "failed-03", "pending-02", "sent-01"]
    assert devices("--detection", ORPHAN) == ["orphan-04"]
    code, out, _ = cli(capsys, settings_file, "list", "--failed", "--detection", ORPHAN)
    assert (code, out.strip()) == (0, "No devices in the ledger matching the filter.")


def test_list_json_is_complete_and_machine_readable(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, settings_file, "list", "--json")
    assert code == 0
    by_key = {d["deviceKey"]: d for d in json.loads(out)}
    assert by_key["pending-02"] == {
        "detectionId": PANORAMA9, "detectionName": PANORAMA9_NAME, "deviceKey": "pending-02",
        "deviceId": "pending-02", "deviceName": "WS-Pending.corp", "firstReported": "2026-05-31T11:00:00Z",
        "firstSeen": "2026-05-30T11:00:00Z", "lastSeen": "2026-05-31T11:00:00Z",
        "deliveries": {"webhook": {"status": "pending", "attempts": 1, "nextAttempt": "2026-05-31T11:01:00Z",
                                   "sent": None, "lastError": "webhook at http://127.0.0.1:9/…: HTTP 503"}},
    }
    assert by_key["sent-01"]["deliveries"]["webhook"] == {
        "status": "sent", "attempts": 1, "nextAttempt": None, "sent": "2026-05-31T11:00:05Z", "lastError": None,
    }
    assert by_key["failed-03"]["deliveries"]["webhook"]["status"] == "failed"
    assert by_key["evil name"]["deviceName"] == EVIL_NAME, "JSON carries the name exactly"
    assert by_key["orphan-04"]["detectionName"] == ""


def test_forget_makes_the_device_new_again(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, settings_file, "forget", PANORAMA9_NAME, "ws-pending.CORP")  # by name, any case
    assert code == 0 and "Forgot 'pending-02'" in out
    code, out, _ = cli(capsys, settings_file, "forget", PANORAMA9, "sent-01")  # by device id
    assert code == 0
    code, out, _ = cli(capsys, settings_file, "forget", PANORAMA9, "no-such-device")
    assert code == 2 and "No device 'no-such-device'" in out
    code, out, _ = cli(capsys, settings_file, "forget", ORPHAN, "pending-02")
    assert code == 2, "forget is per detection"
    assert sorted(ledger.known(PANORAMA9)) == ["evil name", "failed-03"]
    assert ledger.add_new(PANORAMA9, [sighting("pending-02", "WS-Pending.corp")], ["webhook"], NOW) == ["pending-02"]


def test_retry_makes_failed_and_backed_off_deliveries_due_now(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = datetime.now(timezone.utc)
    assert {d.device_key for d in ledger.due("webhook", NOW + timedelta(minutes=1))} == {"orphan-04", "pending-02"}
    code, out, _ = cli(capsys, settings_file, "retry", "--channel", "teams")
    assert (code, out.strip()) == (0, "0 deliveries are due now; the next run sends them.")
    code, out, _ = cli(capsys, settings_file, "retry")
    assert (code, out.strip()) == (0, "3 deliveries are due now; the next run sends them.")
    due = {d.device_key: d for d in ledger.due("webhook", datetime.now(timezone.utc))}
    assert sorted(due) == ["failed-03", "orphan-04", "pending-02"]
    assert due["failed-03"].created_at is not None and due["failed-03"].created_at >= before
    code, out, _ = cli(capsys, settings_file, "list", "--failed", "--json")
    assert json.loads(out) == []


def test_an_empty_ledger(store: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, settings_file, "list")
    assert (code, out.strip()) == (0, "No devices in the ledger.")
    code, out, _ = cli(capsys, settings_file, "list", "--json")
    assert (code, json.loads(out)) == (0, [])


def test_state_as_a_subprocess(ledger: Store, settings_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATE_", "AzureWebJobs", "WEBHOOK"))}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alerter", "state", *args, "--settings", str(settings_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    listing = run("list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert len(json.loads(listing.stdout)) == 5
    forgotten = run("forget", PANORAMA9, "failed-03")
    assert forgotten.returncode == 0, forgotten.stderr
    assert run("forget", PANORAMA9, "failed-03").returncode == 2
    assert run("retry").returncode == 0
    assert run("frobnicate").returncode == 2


def test_state_on_unreachable_table_storage_fails_and_names_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.azurite import ACCOUNT_KEY, connection_string, free_port

    for name in list(os.environ):
        if name.startswith(("STATE_", "AzureWebJobs")):
            monkeypatch.delenv(name)
    port = free_port()
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {
        "QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(tmp_path), "DETECTIONS_PATH": str(ROOT / "detections"),
        "AzureWebJobsStorage": connection_string(port), "HTTP_RETRIES": "0",
    }}), encoding="utf-8")
    code, out, err = cli(capsys, path, "list")
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "cannot connect" in err
    assert ACCOUNT_KEY not in out + err


def test_dry_run_and_state_agree_on_what_is_owed(
    ledger: Store, settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --dry-run` reports the carried-over deliveries that `state list --pending` shows."""
    settings = Settings.load(environ={}, settings_file=settings_file)
    from alerter.cycle import run_cycle

    report = run_cycle(replace(settings, detections=("no-such-detection",)), now=NOW + timedelta(hours=1),
                       dry_run=True)
    code, out, _ = cli(capsys, settings_file, "list", "--pending", "--json")
    assert code == 0
    assert report.pending_carried_over == len(json.loads(out)) == 2
