"""The Functions entry point: the registered timer, its binding, and a real run through it."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
from azure.functions.timer import TimerRequest

from tests.conftest import ROOT, cert_row, write_rows


@pytest.fixture
def function_app_module():
    import function_app

    return importlib.reload(function_app)  # get_functions() may be called once per app object


def test_the_timer_is_registered_with_the_schedule_setting_and_the_monitor(function_app_module):
    [function] = function_app_module.app.get_functions()
    binding = function.get_bindings()[0].get_dict_repr()
    assert function.get_function_name() == "alerter_timer"
    assert binding["type"] == "timerTrigger"
    assert binding["schedule"] == "%ALERT_SCHEDULE%"
    assert binding["useMonitor"] is True
    assert binding["runOnStartup"] is False


def _configure(monkeypatch, data_dir, tmp_path, webhook_url: str) -> None:
    for name, value in {
        "QUERY_SOURCE": "local",
        "LOCAL_DATA_PATH": str(data_dir),
        "DETECTIONS_PATH": str(ROOT / "detections"),
        "STATE_STORE": "sqlite",
        "STATE_PATH": str(tmp_path / "state.db"),
        "WEBHOOK_URL": webhook_url,
        "HTTP_RETRIES": "0",
        "HTTP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(name, value)


def test_invoking_the_timer_runs_a_cycle_end_to_end(function_app_module, monkeypatch, data_dir, tmp_path,
                                                     webhook_server):
    # The live clock: rows from a minute ago are inside the 5-day window.
    from datetime import datetime, timedelta, timezone

    recent = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_rows(data_dir, [cert_row("d1", "ws-1", recent), cert_row("d2", "ws-2", recent)])
    _configure(monkeypatch, data_dir, tmp_path, webhook_server.url + "/hook")
    [function] = function_app_module.app.get_functions()
    function.get_user_function()(TimerRequest(past_due=False))
    delivered = Counter(s["deviceId"] for r in webhook_server.requests for s in r.json()["sightings"])
    assert delivered == Counter({"d1": 1, "d2": 1})


def test_a_failed_cycle_raises_so_the_host_records_a_failed_run(function_app_module, monkeypatch, data_dir,
                                                                tmp_path, webhook_server):
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_rows(data_dir, [cert_row("d1", "ws-1", now)])
    _configure(monkeypatch, data_dir, tmp_path, webhook_server.url + "/hook")
    from tests.support.http_server import Reply

    webhook_server.default = Reply(500)
    [function] = function_app_module.app.get_functions()
    with pytest.raises(function_app_module.CycleFailed, match="failed; what worked is recorded"):
        function.get_user_function()(TimerRequest(past_due=True))
