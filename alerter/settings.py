"""Settings from the environment (Function App application settings), validated once at start.

Every error names the setting at fault and never echoes a secret value. A `local.settings.json`
style file can supply values; real environment variables win over it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path

from croniter import CroniterBadDateError, croniter

from alerter.links import is_workspace_resource_id
from alerter.redact import Redactor
from alerter.urls import is_loopback_host, url_problem

QUERY_SOURCES = ("log_analytics", "defender", "local")
STATE_STORES = ("table", "sqlite")
SMTP_SECURITY = ("starttls", "ssl", "none")
AMBIENT_SECRETS = ("IDENTITY_HEADER", "MSI_SECRET", "AZURE_CLIENT_SECRET", "AZURE_PASSWORD")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class SettingsError(ValueError):
    """One or more settings are wrong; each problem names its setting."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  {p}" for p in problems))


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `15m`, `90s`, `2w`: one number and one unit, as operators write it."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("must be a number and a unit: s, m, h, d or w (e.g. 30d, 12h)")
    amount, unit = int(match.group(1)), match.group(2).lower()
    try:
        return timedelta(**{_DURATION_UNITS[unit]: amount})
    except OverflowError:
        raise ValueError("is too long") from None


def _comma_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    alert_schedule: str = "0 0 */4 * * *"
    detections_path: Path = Path("detections")
    detections: tuple[str, ...] = ()
    query_source: str = "log_analytics"
    log_analytics_workspace_ids: tuple[str, ...] = ()
    log_analytics_workspace_resource_ids: tuple[str, ...] = ()
    """Azure resource ids of the same workspaces: only for "open in Log Analytics" links."""
    log_analytics_endpoint: str = "https://api.loganalytics.io"
    graph_endpoint: str = "https://graph.microsoft.com"
    local_data_path: Path | None = None
    state_store: str = "sqlite"
    state_path: Path = Path(".alerter/state.db")
    state_connection: str | None = field(default=None, repr=False)
    state_table_endpoint: str | None = None
    state_table_name: str = "alerterstate"
    teams_webhook_url: str | None = field(default=None, repr=False)
    webhook_url: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    email_to: tuple[str, ...] = ()
    email_from: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_security: str = "starttls"
    graph_mail_sender: str | None = None
    realert_after: timedelta | None = None
    suppressions_path: Path | None = None
    http_timeout: float = 30.0
    http_retries: int = 3
    retry_backoff_max: timedelta = timedelta(hours=1)
    give_up_after: timedelta = timedelta(days=7)
    run_budget: timedelta = timedelta(minutes=25)
    digest_at: time | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        """The delivery channels this deployment has configured, in a fixed order."""
        configured = []
        if self.webhook_url:
            configured.append("webhook")
        if self.teams_webhook_url:
            configured.append("teams")
        if self.email_to:
            configured.append("email")
        return tuple(configured)

    def redactor(self) -> Redactor:
        # The credential's own secrets too (read by azure-identity from the environment), in case
        # a library ever echoes one.
        ambient = [os.environ.get(name) for name in AMBIENT_SECRETS]
        return Redactor(
            [self.teams_webhook_url, self.webhook_url, self.webhook_secret, self.smtp_password, self.state_connection,
             *ambient]
        )

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, settings_file: Path | None = None) -> Settings:
        values: dict[str, str] = {}
        if settings_file is not None:
            values.update(read_settings_file(settings_file))
        values.update(os.environ if environ is None else environ)
        return _Parser(values).parse()


def read_settings_file(path: Path) -> dict[str, str]:
    """The `Values` object of a Functions `local.settings.json`-style file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError([f"--settings {path}: cannot read the file ({error.strerror})"]) from None
    except json.JSONDecodeError as error:
        raise SettingsError([f"--settings {path}: not valid JSON (line {error.lineno}: {error.msg})"]) from None
    values = document.get("Values") if isinstance(document, dict) else None
    if not isinstance(values, dict):
        raise SettingsError([f"--settings {path}: expected an object with a \"Values\" object"])
    bad = [k for k, v in values.items() if not isinstance(v, (str, int, float, bool))]
    if bad:
        raise SettingsError([f"--settings {path}: Values.{k} must be a string" for k in bad])
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


class _Parser:
    """Reads each setting once, collecting every problem before failing."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[str] = []

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.values.get(name)
        if value is None or not str(value).strip():
            return default
        return str(value).strip()

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{name}: {message}")

    def failed(self, name: str) -> bool:
        """Whether a setting already has a problem: its dependants are not checked against a guess."""
        return any(p.startswith(f"{name}: ") for p in self.problems)

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = (self.get(name) or default).lower()
        if value not in allowed:
            self.problem(name, f"must be one of {', '.join(allowed)} (got {value!r})")
            return default
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problem(name, f"must be a whole number (got {raw!r})")
            return default
        if not low <= value <= high:
            self.problem(name, f"must be between {low} and {high} (got {value})")
            return default
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problem(name, f"must be a number of seconds (got {raw!r})")
            return default
        if not low <= value <= high:
            self.problem(name, f"must be between {low:g} and {high:g} seconds (got {value:g})")
            return default
        return value

    def duration(self, name: str, default: timedelta | None) -> timedelta | None:
        raw = self.get(name)
        if raw is None or raw.lower() == "never":
            return default
        try:
            value = parse_duration(raw)
        except ValueError as error:
            self.problem(name, f"{error} (got {raw!r})")
            return default
        if value <= timedelta(0):
            self.problem(name, "must be longer than zero")
            return default
        return value

    def time_of_day(self, name: str) -> time | None:
        raw = self.get(name)
        if raw is None or raw.lower() in ("off", "never"):
            return None
        try:
            value = time.fromisoformat(raw)
        except ValueError:
            value = None
        if value is None or value.tzinfo is not None:
            self.problem(name, f"must be a UTC time of day like 09:00, or off (got {raw!r})")
            return None
        return value

    def url(self, name: str, default: str | None = None, secret: bool = False) -> str | None:
        value = self.get(name, default)
        if value is not None and (why := url_problem(value)):
            # Secret URLs carry signatures: describe the problem, never the value.
            self.problem(name, why if secret else f"{why} (got {value!r})")
        return value

    def parse(self) -> Settings:
        source = self.choice("QUERY_SOURCE", QUERY_SOURCES, "log_analytics")
        connection = self.get("STATE_CONNECTION") or self.get("AzureWebJobsStorage")
        table_endpoint = self.url("STATE_TABLE_ENDPOINT")
        if table_endpoint is None and (account := self.get("AzureWebJobsStorage__accountName")):
            table_endpoint = f"https://{account}.table.core.windows.net"
        store_default = "table" if (connection or table_endpoint) else "sqlite"
        store = self.choice("STATE_STORE", STATE_STORES, store_default)

        workspaces = tuple(_comma_list(self.get("LOG_ANALYTICS_WORKSPACE_ID")))
        for workspace in workspaces:
            if not _GUID.match(workspace):
                self.problem("LOG_ANALYTICS_WORKSPACE_ID", f"{workspace!r} is not a workspace id (a GUID)")
        if source == "log_analytics" and not workspaces and not self.failed("QUERY_SOURCE"):
            self.problem("LOG_ANALYTICS_WORKSPACE_ID", "is required when QUERY_SOURCE is log_analytics")

        resource_ids = tuple(_comma_list(self.get("LOG_ANALYTICS_WORKSPACE_RESOURCE_ID")))
        for resource_id in resource_ids:
            if not is_workspace_resource_id(resource_id):
                self.problem(
                    "LOG_ANALYTICS_WORKSPACE_RESOURCE_ID",
                    f"{resource_id!r} is not a workspace resource id (/subscriptions/…/resourceGroups/…/providers/"
                    "Microsoft.OperationalInsights/workspaces/…)",
                )

        local_data = self.get("LOCAL_DATA_PATH")
        if source == "local":
            if local_data is None:
                self.problem("LOCAL_DATA_PATH", "is required when QUERY_SOURCE is local")
            elif not Path(local_data).is_dir():
                self.problem("LOCAL_DATA_PATH", f"{local_data!r} is not a folder")

        schedule = self.get("ALERT_SCHEDULE", Settings.alert_schedule) or Settings.alert_schedule
        if len(schedule.split()) != 6 or not croniter.is_valid(schedule, second_at_beginning=True):
            self.problem(
                "ALERT_SCHEDULE", f"must be an NCRONTAB expression with six fields, seconds first (got {schedule!r})"
            )
        else:
            try:
                croniter(schedule, second_at_beginning=True).get_next()
            except (CroniterBadDateError, ValueError):
                self.problem("ALERT_SCHEDULE", f"never fires (got {schedule!r})")

        if store == "table" and not (connection or table_endpoint):
            self.problem("STATE_STORE", "is table, but neither STATE_CONNECTION, AzureWebJobsStorage nor "
                         "STATE_TABLE_ENDPOINT is set")
        table_name = self.get("STATE_TABLE_NAME", Settings.state_table_name) or Settings.state_table_name
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", table_name):
            self.problem("STATE_TABLE_NAME", "must be 3-63 letters and digits, starting with a letter")

        email_to = tuple(_comma_list(self.get("EMAIL_TO")))
        email_from = self.get("EMAIL_FROM")
        smtp_host = self.get("SMTP_HOST")
        graph_sender = self.get("GRAPH_MAIL_SENDER")
        for address in (*email_to, *([email_from] if email_from else [])):
            if "@" not in address:
                self.problem("EMAIL_TO" if address in email_to else "EMAIL_FROM", f"{address!r} is not an address")
        if email_to and not email_from and not graph_sender:
            self.problem("EMAIL_FROM", "is required with EMAIL_TO")
        if email_to and not smtp_host and not graph_sender:
            self.problem("SMTP_HOST", "is required with EMAIL_TO unless GRAPH_MAIL_SENDER is set")

        smtp_security = self.choice("SMTP_SECURITY", SMTP_SECURITY, "starttls")
        if smtp_security == "none" and smtp_host and not is_loopback_host(smtp_host):
            self.problem("SMTP_SECURITY", "none (no TLS) is allowed only for a loopback SMTP_HOST")

        webhook_secret = self.get("WEBHOOK_SECRET")
        webhook_url = self.url("WEBHOOK_URL", secret=True)
        if webhook_secret and not webhook_url:
            self.problem("WEBHOOK_SECRET", "is set but WEBHOOK_URL is not")

        suppressions = self.get("SUPPRESSIONS_PATH")
        if suppressions and not Path(suppressions).is_file():
            self.problem("SUPPRESSIONS_PATH", f"{suppressions!r} is not a file")

        detections_path = Path(self.get("DETECTIONS_PATH", "detections") or "detections")
        if not detections_path.is_dir():
            self.problem("DETECTIONS_PATH", f"{str(detections_path)!r} is not a folder")

        settings = Settings(
            alert_schedule=schedule,
            detections_path=detections_path,
            detections=tuple(_comma_list(self.get("DETECTIONS"))),
            query_source=source,
            log_analytics_workspace_ids=workspaces,
            log_analytics_workspace_resource_ids=resource_ids,
            log_analytics_endpoint=self.url("LOG_ANALYTICS_ENDPOINT", Settings.log_analytics_endpoint)
            or Settings.log_analytics_endpoint,
            graph_endpoint=self.url("GRAPH_ENDPOINT", Settings.graph_endpoint) or Settings.graph_endpoint,
            local_data_path=Path(local_data) if local_data else None,
            state_store=store,
            state_path=Path(self.get("STATE_PATH", str(Settings.state_path)) or Settings.state_path),
            state_connection=connection,
            state_table_endpoint=table_endpoint,
            state_table_name=table_name,
            teams_webhook_url=self.url("TEAMS_WEBHOOK_URL", secret=True),
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            email_to=email_to,
            email_from=email_from,
            smtp_host=smtp_host,
            smtp_port=self.integer("SMTP_PORT", 587, 1, 65535),
            smtp_username=self.get("SMTP_USERNAME"),
            smtp_password=self.get("SMTP_PASSWORD"),
            smtp_security=smtp_security,
            graph_mail_sender=graph_sender,
            realert_after=self.duration("REALERT_AFTER", None),
            suppressions_path=Path(suppressions) if suppressions else None,
            http_timeout=self.number("HTTP_TIMEOUT", 30.0, 0.1, 600),
            http_retries=self.integer("HTTP_RETRIES", 3, 0, 10),
            retry_backoff_max=self.duration("RETRY_BACKOFF_MAX", timedelta(hours=1)) or timedelta(hours=1),
            give_up_after=self.duration("DELIVERY_GIVE_UP_AFTER", timedelta(days=7)) or timedelta(days=7),
            run_budget=self.duration("RUN_BUDGET", timedelta(minutes=25)) or timedelta(minutes=25),
            digest_at=self.time_of_day("DIGEST_AT"),
        )
        if self.problems:
            raise SettingsError(self.problems)
        return settings
