"""`python -m alerter`: exit statuses, the summary a person reads, dry runs and previews."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alerter.cli import main
from tests.conftest import ROOT, cert_row, write_rows
from tests.support.http_server import Reply

NOW = "2026-05-31T11:00:00Z"


@pytest.fixture
def settings_file(tmp_path: Path, data_dir: Path):
    def write(**values: str) -> Path:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "local.settings.json"
        path.write_text(json.dumps({"Values": {
            "QUERY_SOURCE": "local",
            "LOCAL_DATA_PATH": str(data_dir),
            "DETECTIONS_PATH": str(ROOT / "detections"),
            "STATE_STORE": "sqlite",
            "STATE_PATH": str(tmp_path / "state.db"),
            "HTTP_TIMEOUT": "2",
            "HTTP_RETRIES": "0",
            **values,
        }}))
        return path

    return write


def run(*args: str) -> tuple[int, str, str]:
    """The CLI as an operator runs it: a real process, real exit status."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "REQUESTS_CA_BUNDLE")}
    done = subprocess.run([sys.executable, "-m", "alerter", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_a_run_prints_the_summary_and_exits_0_then_0_new(settings_file, data_dir, webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z"), cert_row("d2", "ws-2", "2026-05-30T10:00:00Z")])
    path = settings_file(WEBHOOK_URL=webhook_server.url + "/hook")
    status, out, _ = run("run", "--settings", str(path), "--now", NOW)
    assert status == 0
    assert "Remote Management and Monitoring tool - Panorama9 - File Signature: 2 devices, 2 new, 0 already reported" in out
    assert "webhook: 2 delivered, 0 left pending" in out
    status, out, _ = run("run", "--settings", str(path), "--now", NOW)
    assert status == 0
    assert ": 2 devices, 0 new, 2 already reported" in out


def test_a_dry_run_shows_what_would_be_sent_and_writes_and_sends_nothing(settings_file, data_dir, tmp_path,
                                                                          webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    path = settings_file(WEBHOOK_URL=webhook_server.url + "/hook")
    preview = tmp_path / "preview"
    status, out, _ = run("run", "--dry-run", "--preview", str(preview), "--settings", str(path), "--now", NOW)
    assert status == 0
    assert "dry run: nothing sent, nothing recorded" in out
    assert "1 devices, 1 new" in out and "Would send to webhook: 1 message(s), 1 device(s)" in out
    assert webhook_server.requests == []
    assert not (tmp_path / "state.db").exists()
    [payload] = list(preview.glob("webhook-*.json"))
    assert json.loads(payload.read_text())["sightings"][0]["deviceId"] == "d1"


def test_a_query_failure_exits_1_and_names_the_detection(settings_file, data_dir):
    write_rows(data_dir, [{"Unrelated": 1}], table="SomeOtherTable")
    status, out, _ = run("run", "--settings", str(settings_file()), "--now", NOW)
    assert status == 1
    assert "Panorama9 - File Signature: QUERY FAILED:" in out and "DeviceFileCertificateInfo" in out


def test_a_bad_detection_file_is_loud_but_the_good_ones_still_run(settings_file, data_dir, tmp_path, webhook_server):
    folder = tmp_path / "detections"
    folder.mkdir()
    (folder / "panorama9.yaml").write_text((ROOT / "detections" / "panorama9-filesig.yaml").read_text())
    (folder / "broken.yaml").write_text("id: [oops\n")
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    path = settings_file(DETECTIONS_PATH=str(folder), WEBHOOK_URL=webhook_server.url + "/hook")
    status, out, _ = run("run", "--settings", str(path), "--now", NOW)
    assert status == 1
    assert f"PROBLEM: {folder / 'broken.yaml'}: is not valid YAML" in out
    assert "1 devices, 1 new" in out and "webhook: 1 delivered" in out
    assert len(webhook_server.requests) == 1


def test_settings_and_usage_errors_exit_2(settings_file):
    status, _, err = run("run", "--settings", str(settings_file(QUERY_SOURCE="splunk")))
    assert status == 2 and "QUERY_SOURCE: must be one of" in err
    path = settings_file(QUERY_SOURCE="defender")
    status, _, err = run("run", "--settings", str(path), "--now", NOW)
    assert status == 2 and "--now works only with QUERY_SOURCE=local" in err
    status, _, err = run("run", "--now", "yesterday-ish", "--settings", str(settings_file()))
    assert status == 2 and "not an ISO 8601 time" in err


def test_no_channel_configured_fails_loudly_and_uses_up_nothing(settings_file, data_dir, tmp_path, capsys,
                                                                 webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    assert main(["run", "--settings", str(settings_file()), "--now", NOW]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: No delivery channel is configured" in out and "nothing was recorded" in out
    # Once a channel is set, the device goes out: the channel-less run consumed nothing.
    assert main(["run", "--settings", str(settings_file(WEBHOOK_URL=webhook_server.url + "/h")), "--now", NOW]) == 0
    assert [s["deviceId"] for r in webhook_server.requests for s in r.json()["sightings"]] == ["d1"]


def test_with_a_preview_and_no_channel_the_run_records_and_shows_it(settings_file, data_dir, tmp_path, capsys):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    path = settings_file()
    assert main(["run", "--settings", str(path), "--now", NOW, "--preview", str(tmp_path / "p")]) == 0
    assert "shown in the preview only" in capsys.readouterr().out
    assert main(["run", "--settings", str(path), "--now", NOW]) == 1  # still no channel: loud
    assert ": 1 devices, 0 new, 1 already reported" in capsys.readouterr().out


def test_the_sender_retries_every_run_after_a_failure_with_exit_1_until_delivered(settings_file, data_dir,
                                                                                    webhook_server):
    write_rows(data_dir, [cert_row("d1", "ws-1", "2026-05-30T10:00:00Z")])
    path = settings_file(WEBHOOK_URL=webhook_server.url + "/hook")
    webhook_server.default = Reply(503)
    assert run("run", "--settings", str(path), "--now", NOW)[0] == 1
    webhook_server.default = Reply(200)
    status, out, _ = run("run", "--settings", str(path), "--now", "2026-05-31T15:00:00Z")
    assert status == 0
    assert "Pending deliveries carried over from earlier runs: 1" in out
