"""QUERY_SOURCE=defender: the detection's KQL, unchanged, in Defender XDR advanced hunting.

Microsoft Graph `POST {GRAPH_ENDPOINT}/v1.0/security/runHuntingQuery` with a token for
`{GRAPH_ENDPOINT}/.default` from DefaultAzureCredential (in Azure the Function App's managed
identity, which needs the ThreatHunting.Read.All application permission). For SOCs that do not
stream the Device* tables into Sentinel; `Timestamp` is native here.

- No `Timespan` is sent: the service then reads its default, all 30 days it keeps, so the
  query's own window (`now(-5d)..now()`) is never cut.
- The HTTP session is the project's (alerter.http): bounded timeouts, urllib3's Retry for 429
  (with the quota's Retry-After), 5xx and dropped connections; here its Retry is the budgeted
  one below, which never waits past the run's query budget nor longer than a minute for one
  Retry-After (the CPU quota resets every 15 minutes: the next run retries instead), and every
  attempt's connect and read timeouts are cut to what is left of the budget (BudgetTimeout).
- Both casings of the answer (`schema`/`results` and `Schema`/`Results`, `name`/`Name`) are read.
- 100,000 rows is the service's cap: a result that reaches it is reported as possibly cut.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import requests
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util import Retry, Timeout

from alerter.http import RETRY_AFTER_MAX_SECONDS, RETRY_STATUSES, BoundedRetry, HttpPolicy, retry_after_seconds, session
from alerter.links import Portals, advanced_hunting_link, device_link
from alerter.model import Detection, Link
from alerter.settings import Settings
from alerter.sources import QueryError, QueryResult
from alerter.sources._azure import (
    MIN_ATTEMPT_SECONDS,
    MIN_BACKOFF_SECONDS,
    Deadline,
    backoff_seconds,
    credential_problem,
    default_credential,
    limit_reason,
    typed_rows,
)
from alerter.urls import describe_url

log = logging.getLogger(__name__)

LABEL = "defender"
ROW_LIMIT = 100_000
QUERY_WAIT_SECONDS = 180
"""Advanced hunting stops a query after 3 minutes: the read timeout allows for that."""
PERMISSION_HINT = (
    "the Function App's managed identity needs the Microsoft Graph application permission "
    "'ThreatHunting.Read.All' with admin consent; see docs/sources.md"
)


class BudgetRetry(BoundedRetry):
    """BoundedRetry that waits at least a second before a retry and refuses a retry whose wait
    leaves less than MIN_ATTEMPT_SECONDS of the run's query budget for the attempt itself (whose
    timeouts BudgetTimeout cuts to what is left): the response (429, 503 ...) or the error then
    goes back to the caller, which fails the detection for this run."""

    def __init__(self, *args: Any, deadline: Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def new(self, **kw: Any) -> BudgetRetry:
        fresh = super().new(**kw)
        fresh.deadline = self.deadline
        return fresh

    def get_backoff_time(self) -> float:
        errors = len([h for h in self.history if h.redirect_location is None])
        return backoff_seconds(errors, self.backoff_factor or MIN_BACKOFF_SECONDS, self.backoff_max)

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None,
                  error: Exception | None = None, _pool: Any = None, _stacktrace: Any = None) -> Retry:
        if self.deadline is not None:
            wait = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
            if wait is None:
                wait = backoff_seconds(len(self.history) + 1, self.backoff_factor or MIN_BACKOFF_SECONDS,
                                       self.backoff_max)
            if wait <= RETRY_AFTER_MAX_SECONDS and wait + MIN_ATTEMPT_SECONDS > self.deadline.remaining():
                raise MaxRetryError(_pool, url or "", ResponseError("the run's query budget (RUN_BUDGET) is used up"))
        return super().increment(method, url, response, error, _pool, _stacktrace)


class BudgetTimeout(Timeout):
    """urllib3's Timeout, cut for every attempt to what is left of the run's query budget.

    urllib3 clones the request's Timeout for every attempt, retries included; this clone takes
    the connect and read timeouts as they are, but never longer than the budget has left then.
    (A read timeout bounds each wait for data, so a body trickled byte by byte can still run a
    little over; a service that answers late, the common case, cannot.)"""

    def __init__(self, *, connect: float, read: float, deadline: Deadline) -> None:
        super().__init__(connect=connect, read=read)
        self.deadline = deadline

    def clone(self) -> Timeout:
        left = max(MIN_ATTEMPT_SECONDS / 10, self.deadline.remaining())
        return Timeout(connect=min(float(self._connect), left), read=min(float(self._read), left))


class DefenderSource:
    row_limit = ROW_LIMIT

    def __init__(self, settings: Settings, *, credential: Any = None) -> None:
        self.endpoint = settings.graph_endpoint.rstrip("/")
        self.url = f"{self.endpoint}/v1.0/security/runHuntingQuery"
        self.scope = f"{self.endpoint}/.default"
        self.where = describe_url(self.endpoint)
        self.deadline = Deadline.after(settings.run_budget)
        self.policy = HttpPolicy(timeout=settings.http_timeout, retries=settings.http_retries,
                                 backoff_factor=MIN_BACKOFF_SECONDS)
        # A hunting query changes nothing: repeating the POST is safe.
        self.http = session(self.policy, BudgetRetry, backoff_max=RETRY_AFTER_MAX_SECONDS, deadline=self.deadline)
        self.portals = Portals.for_endpoints(graph=self.endpoint)
        self._own_credential = credential is None
        self.credential = credential if credential is not None else default_credential()

    # --- the Source interface -------------------------------------------------------------------

    def query(self, detection: Detection, now: datetime) -> QueryResult:
        """`now` is not used: the service's clock is the query's clock (`--now` is for local replay)."""
        if self.deadline.expired:
            raise QueryError("not queried: the run's query budget (RUN_BUDGET) is used up; the next run retries")
        response = self._post(detection)
        try:
            answer = response.json()
        except ValueError:
            raise QueryError(
                f"Microsoft Graph at {self.where} answered with something that is not JSON (an HTML error page or a "
                "cut-off body); nothing was taken from it, the next run retries"
            ) from None
        except RecursionError:
            raise QueryError(
                f"Microsoft Graph at {self.where} answered with JSON nested too deep to read; nothing was taken from it"
            ) from None
        if not isinstance(answer, dict):
            raise QueryError(f"Microsoft Graph at {self.where} answered with JSON that is not a hunting result")
        schema = _either(answer, "schema", "Schema")
        results = _either(answer, "results", "Results")
        if not isinstance(schema, list) or not isinstance(results, list):
            raise QueryError(
                f"Microsoft Graph at {self.where} answered without schema and results; nothing was taken from it"
            )
        columns = []
        for column in schema:
            if not isinstance(column, dict):
                raise QueryError("the hunting result's schema is malformed")
            columns.append((str(_either(column, "name", "Name") or ""), str(_either(column, "type", "Type") or "")))
        if not all(isinstance(row, dict) for row in results):
            raise QueryError("the hunting result's rows are malformed")
        rows = typed_rows(columns, results, where="advanced hunting result")
        incomplete = []
        reason = limit_reason("Advanced hunting", len(rows), self.row_limit)
        if reason:
            incomplete.append(reason)
        log.info("detection %s: advanced hunting returned %d rows", detection.name, len(rows))
        return QueryResult(batches=[(LABEL, rows)], incomplete=incomplete)

    def links(self, detection: Detection, device_id: str) -> list[Link]:
        found = [link for link in (device_link(device_id, self.portals),) if link is not None]
        found.append(advanced_hunting_link(detection, self.portals))
        return found

    def close(self) -> None:
        self.http.close()
        if self._own_credential and hasattr(self.credential, "close"):
            self.credential.close()

    # --- one request ----------------------------------------------------------------------------

    def _token(self) -> str:
        try:
            return self.credential.get_token(self.scope).token
        except Exception as error:  # noqa: BLE001 - azure-identity raises several types; all mean "no token"
            raise QueryError(credential_problem(error)) from None

    def _post(self, detection: Detection) -> requests.Response:
        token = self._token()
        body = json.dumps({"Query": detection.query}).encode("utf-8")
        # requests hands a urllib3 Timeout through as it is; urllib3 clones it for every attempt.
        timeout = BudgetTimeout(connect=self.policy.timeout, read=self.policy.timeout + QUERY_WAIT_SECONDS,
                                deadline=self.deadline)
        try:
            response = self.http.post(
                self.url,
                data=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8"},
                timeout=timeout,
            )
        except requests.exceptions.RetryError as error:
            raise QueryError(f"advanced hunting at {self.where}: gave up retrying ({_reason(error)}); "
                             "the next run retries") from None
        except requests.exceptions.Timeout:
            raise QueryError(f"advanced hunting at {self.where}: no answer in time; the next run retries") from None
        except requests.exceptions.SSLError:
            raise QueryError(f"advanced hunting at {self.where}: TLS handshake failed (certificate not trusted? "
                             "REQUESTS_CA_BUNDLE)") from None
        except requests.exceptions.ConnectionError as error:
            raise QueryError(f"advanced hunting at {self.where}: connection failed ({_reason(error)}); "
                             "the next run retries") from None
        except requests.exceptions.RequestException as error:
            raise QueryError(f"advanced hunting at {self.where}: {type(error).__name__}") from None
        if 200 <= response.status_code < 300:
            return response
        raise QueryError(self._http_problem(response))

    def _http_problem(self, response: requests.Response) -> str:
        status = response.status_code
        code, message = _graph_error(response)
        said = f"{code}: {message}" if code and message else (code or message or (response.reason or ""))
        head = f"advanced hunting at {self.where} answered HTTP {status}" + (f" ({said})" if said else "")
        if status == 400:
            return f"{head}: the query was refused as written; fix the detection's KQL (not retried)"
        if status in (401, 403):
            return f"{head}: {PERMISSION_HINT}"
        if status in RETRY_STATUSES:
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is not None and wait > RETRY_AFTER_MAX_SECONDS:
                why = f"Retry-After {wait:g} s is longer than a run waits ({RETRY_AFTER_MAX_SECONDS:g} s)"
            elif self.deadline.remaining() < RETRY_AFTER_MAX_SECONDS:
                why = "the run's query budget (RUN_BUDGET) is (nearly) used up"
            else:
                why = f"still failing after {self.policy.retries} retries"
            return f"{head}: {why}; the next run retries"
        return head


def _either(mapping: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in mapping:
            return mapping[name]
    return None


def _graph_error(response: requests.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code") or ""), " ".join(str(error.get("message") or "").split())[:500]


def _reason(error: Exception) -> str:
    """The innermost reason of a requests/urllib3 error, without the URL."""
    inner: Any = error.args[0] if error.args else error
    reason = getattr(inner, "reason", None)
    if reason is not None:
        inner = reason
    text = str(inner)
    return text if "http" not in text.lower() else type(inner).__name__
