"""Settings: validated once, every error names its setting, secrets are never echoed."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from alerter.settings import Settings, SettingsError
from tests.conftest import ROOT

SIGNED = "https://prod-01.westeurope.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=S3cr3tSig"


def load(**values: str) -> Settings:
    base = {"QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(ROOT / "samples" / "demo"),
            "DETECTIONS_PATH": str(ROOT / "detections")}
    return Settings.load(environ={**base, **values})


def problems(**values: str) -> list[str]:
    with pytest.raises(SettingsError) as error:
        load(**values)
    return error.value.problems


def test_defaults_follow_the_interface():
    settings = load()
    assert settings.alert_schedule == "0 0 */4 * * *"
    assert settings.state_store == "sqlite"
    assert settings.state_path == Path(".alerter/state.db")
    assert settings.state_table_name == "alerterstate"
    assert settings.channels == ()
    assert settings.realert_after is None
    assert settings.smtp_port == 587 and settings.smtp_security == "starttls"


def test_the_state_store_defaults_to_table_when_a_storage_connection_exists():
    assert load(AzureWebJobsStorage="UseDevelopmentStorage=true").state_store == "table"
    assert load(AzureWebJobsStorage__accountName="alertersa").state_table_endpoint == (
        "https://alertersa.table.core.windows.net"
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"QUERY_SOURCE": "splunk"}, "QUERY_SOURCE: must be one of log_analytics, defender, local"),
        ({"QUERY_SOURCE": "log_analytics"}, "LOG_ANALYTICS_WORKSPACE_ID: is required when QUERY_SOURCE is log_analytics"),
        ({"QUERY_SOURCE": "log_analytics", "LOG_ANALYTICS_WORKSPACE_ID": "not-a-guid"},
         "LOG_ANALYTICS_WORKSPACE_ID: 'not-a-guid' is not a workspace id"),
        ({"LOCAL_DATA_PATH": "/nonexistent/folder"}, "LOCAL_DATA_PATH: '/nonexistent/folder' is not a folder"),
        ({"ALERT_SCHEDULE": "0 */4 * * *"}, "ALERT_SCHEDULE: must be an NCRONTAB expression with six fields"),
        ({"ALERT_SCHEDULE": "0 0 */4 * * * *"}, "ALERT_SCHEDULE: must be an NCRONTAB expression with six fields"),
        ({"STATE_STORE": "table"}, "STATE_STORE: is table, but neither"),
        ({"SMTP_PORT": "smtp"}, "SMTP_PORT: must be a whole number"),
        ({"REALERT_AFTER": "monthly"}, "REALERT_AFTER: must be a number and a unit"),
        ({"EMAIL_TO": "soc@contoso.com"}, "EMAIL_FROM: is required with EMAIL_TO"),
        ({"EMAIL_TO": "soc@contoso.com", "EMAIL_FROM": "a@contoso.com"}, "SMTP_HOST: is required with EMAIL_TO"),
        ({"SMTP_HOST": "smtp.contoso.com", "SMTP_SECURITY": "none"}, "SMTP_SECURITY: none (no TLS) is allowed only"),
        ({"WEBHOOK_SECRET": "k3y-value"}, "WEBHOOK_SECRET: is set but WEBHOOK_URL is not"),
        ({"DETECTIONS_PATH": "/nonexistent"}, "DETECTIONS_PATH: '/nonexistent' is not a folder"),
        ({"STATE_TABLE_NAME": "bad-name"}, "STATE_TABLE_NAME: must be 3-63 letters and digits"),
    ],
)
def test_each_bad_setting_is_named(values: dict[str, str], expected: str):
    assert any(p.startswith(expected) for p in problems(**values)), problems(**values)


def test_every_problem_is_reported_at_once():
    found = problems(QUERY_SOURCE="splunk", SMTP_PORT="x", REALERT_AFTER="soon")
    assert [p.split(":")[0] for p in found] == ["QUERY_SOURCE", "SMTP_PORT", "REALERT_AFTER"]


def test_a_secret_url_is_never_echoed_in_an_error():
    http_url = SIGNED.replace("https://", "http://")
    found = problems(TEAMS_WEBHOOK_URL=http_url, WEBHOOK_URL=http_url)
    text = "\n".join(found)
    assert "TEAMS_WEBHOOK_URL: must use https://" in text and "WEBHOOK_URL: must use https://" in text
    assert "S3cr3tSig" not in text and "workflows" not in text
    assert "S3cr3tSig" not in repr(load(WEBHOOK_URL=SIGNED))


def test_loopback_http_is_allowed_for_development():
    assert load(WEBHOOK_URL="http://127.0.0.1:8080/hook").channels == ("webhook",)
    assert load(WEBHOOK_URL="http://localhost:8080/hook").channels == ("webhook",)


def test_durations_and_channels():
    settings = load(REALERT_AFTER="30d", WEBHOOK_URL=SIGNED, TEAMS_WEBHOOK_URL=SIGNED,
                    EMAIL_TO="soc@contoso.com, ir@contoso.com", EMAIL_FROM="alerter@contoso.com",
                    SMTP_HOST="smtp.contoso.com")
    assert settings.realert_after == timedelta(days=30)
    assert settings.channels == ("webhook", "teams", "email")
    assert settings.email_to == ("soc@contoso.com", "ir@contoso.com")


def test_a_settings_file_supplies_values_and_the_environment_wins(tmp_path: Path):
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {
        "QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(ROOT / "samples" / "demo"),
        "DETECTIONS_PATH": str(ROOT / "detections"), "STATE_PATH": "from-file.db", "SMTP_PORT": 2525}}))
    settings = Settings.load(environ={"STATE_PATH": "from-env.db"}, settings_file=path)
    assert settings.state_path == Path("from-env.db")
    assert settings.smtp_port == 2525


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "not valid JSON (line 1"), ('{"Values": []}', 'expected an object with a "Values" object')],
)
def test_a_bad_settings_file_is_named(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "local.settings.json"
    path.write_text(content)
    with pytest.raises(SettingsError, match="--settings"):
        Settings.load(environ={}, settings_file=path)
    try:
        Settings.load(environ={}, settings_file=path)
    except SettingsError as error:
        assert expected in str(error)


def test_the_sample_settings_file_lists_every_documented_setting():
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    documented = [
        "ALERT_SCHEDULE", "DETECTIONS_PATH", "DETECTIONS", "QUERY_SOURCE", "LOG_ANALYTICS_WORKSPACE_ID",
        "LOG_ANALYTICS_ENDPOINT", "GRAPH_ENDPOINT", "LOCAL_DATA_PATH", "STATE_STORE", "STATE_PATH",
        "STATE_CONNECTION", "STATE_TABLE_ENDPOINT", "STATE_TABLE_NAME", "TEAMS_WEBHOOK_URL", "WEBHOOK_URL",
        "WEBHOOK_SECRET", "EMAIL_TO", "EMAIL_FROM", "SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME", "SMTP_PASSWORD",
        "SMTP_SECURITY", "GRAPH_MAIL_SENDER", "REALERT_AFTER", "SUPPRESSIONS_PATH",
    ]
    assert [name for name in documented if name not in sample] == []
    readme = (ROOT / "README.md").read_text()
    assert [name for name in sample if name.isupper() and f"`{name}`" not in readme] == []


def test_the_credentials_own_secrets_are_masked_too(monkeypatch):
    monkeypatch.setenv("IDENTITY_HEADER", "hdr-5f0c7b1e9a")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "cs~8Q_Zt1pLmN")
    redact = load().redactor()
    assert redact("header hdr-5f0c7b1e9a secret cs~8Q_Zt1pLmN") == "header *** secret ***"
