"""QUERY_SOURCE=log_analytics: the detection's KQL, unchanged, in the SOC's Sentinel workspace(s).

`azure-monitor-query`'s LogsQueryClient with DefaultAzureCredential (in Azure the Function App's
managed identity, which needs the Log Analytics Reader role on each workspace). Decisions, each
explained in docs/sources.md:

- `timespan=None`: the API's timespan is not sent, so it never cuts the query's own window
  (`now(-5d)..now()` in the seed); the query decides what it reads.
- Several workspaces: when the query's result can say where each row came from (it mentions
  `TenantId`, the workspace id column of every Log Analytics table, and the result carries it),
  the workspaces are queried together with `additional_workspaces`, one request; otherwise each
  workspace is queried on its own, so that every sighting names the workspace it was seen in.
- A partial result (`LogsQueryPartialResult`) is used and reported with the service's details;
  results at the row or size limit are reported as possibly cut.
- Throttling and outages (429 with or without Retry-After, 500, 502, 503, 504, dropped
  connections) are retried by azure-core's RetryPolicy, tuned to wait at least a second, to
  repeat the POST (a query changes nothing), and never to wait past the run's query budget.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import RetryPolicy
from azure.monitor.query import LogsQueryClient, LogsQueryPartialResult, LogsQueryResult

from alerter.http import RETRY_AFTER_MAX_SECONDS, RETRY_STATUSES
from alerter.links import Portals, advanced_hunting_link, device_link, log_analytics_link
from alerter.model import Detection, Link
from alerter.settings import Settings
from alerter.sources import QueryError, QueryResult, Row
from alerter.sources._azure import (
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

LABEL = "log_analytics"
ROW_LIMIT = 500_000
SIZE_LIMIT_BYTES = 64 * 1024 * 1024
QUERY_WAIT_SECONDS = 180
"""`Prefer: wait=180`: how long the service may run one query (its default; 600 is the maximum)."""
ROLE_HINT = (
    "the Function App's managed identity needs the 'Log Analytics Reader' role on the workspace "
    "(or on its resource group); see docs/sources.md"
)
_MENTIONS_TENANT_ID = re.compile(r"\bTenantId\b")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class QueryRetryPolicy(RetryPolicy):
    """azure-core's RetryPolicy, bounded by the run's query budget.

    azure-core retries a POST only on 500/503/504 or when Retry-After is present, and its first
    retry does not wait. A Log Analytics query is a read, so it is repeated on 429 without
    Retry-After too; every retry waits (1 s, 2 s, 4 s ... or the Retry-After); and no wait may go
    past the deadline or past RETRY_AFTER_MAX_SECONDS: then the error goes up and the next run
    retries."""

    def __init__(
        self,
        deadline: Deadline,
        retries: int,
        *,
        backoff: float = MIN_BACKOFF_SECONDS,
        retry_after_max: float = RETRY_AFTER_MAX_SECONDS,
    ) -> None:
        super().__init__(
            retry_total=retries,
            retry_connect=retries,
            retry_read=retries,
            retry_status=retries,
            retry_backoff_factor=backoff,
            retry_backoff_max=retry_after_max,
            retry_on_status_codes=sorted(RETRY_STATUSES),
        )
        self.deadline = deadline
        self.retry_after_max = retry_after_max
        self.last_refusal: str = ""
        """Why the policy stopped retrying early (a long Retry-After, the budget), for the error text."""

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        settings["methods"] = frozenset({"GET", "POST"})
        settings["timeout"] = max(1.0, self.deadline.remaining())
        self.last_refusal = ""
        return settings

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return backoff_seconds(len(settings["history"]), settings["backoff"], settings["max_backoff"])

    def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
        status = response.http_response.status_code
        if status not in RETRY_STATUSES:
            return False  # 400, 401, 403, 404 never get better by asking again, Retry-After or not
        if not settings["total"]:
            return False
        retry_after = self.get_retry_after(response)
        wait = retry_after if retry_after else backoff_seconds(len(settings["history"]) + 1, settings["backoff"])
        if retry_after is not None and retry_after > self.retry_after_max:
            self.last_refusal = f"Retry-After {retry_after:g} s is longer than a run waits ({self.retry_after_max:g} s)"
            return False
        if wait + 1.0 > self.deadline.remaining():
            self.last_refusal = "the run's query budget (RUN_BUDGET) is used up"
            return False
        return super().is_retry(settings, response)


class LogAnalyticsSource:
    row_limit = ROW_LIMIT
    size_limit = SIZE_LIMIT_BYTES

    def __init__(
        self,
        settings: Settings,
        *,
        credential: Any = None,
        workspace_resource_ids: Sequence[str] | None = None,
    ) -> None:
        if not settings.log_analytics_workspace_ids:
            raise QueryError("LOG_ANALYTICS_WORKSPACE_ID is required for QUERY_SOURCE=log_analytics")
        self.workspaces: tuple[str, ...] = tuple(dict.fromkeys(w.lower() for w in settings.log_analytics_workspace_ids))
        self.endpoint = settings.log_analytics_endpoint.rstrip("/")
        self.where = describe_url(self.endpoint)
        self.deadline = Deadline.after(settings.run_budget)
        self.retries = settings.http_retries
        self.portals = Portals.for_endpoints(log_analytics=self.endpoint, graph=settings.graph_endpoint)
        if workspace_resource_ids is None:
            workspace_resource_ids = settings.log_analytics_workspace_resource_ids  # for the portal links
        self.workspace_resource_ids = tuple(workspace_resource_ids)
        self._own_credential = credential is None
        self.credential = credential if credential is not None else default_credential()
        self.retry_policy = QueryRetryPolicy(self.deadline, self.retries)
        self.client = LogsQueryClient(
            self.credential,
            endpoint=self.endpoint,
            retry_policy=self.retry_policy,
            connection_timeout=settings.http_timeout,
            read_timeout=settings.http_timeout + QUERY_WAIT_SECONDS,
        )

    # --- the Source interface -------------------------------------------------------------------

    def query(self, detection: Detection, now: datetime) -> QueryResult:
        """`now` is not used: the service's clock is the query's clock (`--now` is for local replay)."""
        if len(self.workspaces) > 1 and _MENTIONS_TENANT_ID.search(detection.query):
            together = self._query_together(detection)
            if together is not None:
                return together
        return self._query_each(detection)

    def links(self, detection: Detection, device_id: str) -> list[Link]:
        found = [link for link in (device_link(device_id, self.portals),) if link is not None]
        found.append(advanced_hunting_link(detection, self.portals))
        for resource_id in self.workspace_resource_ids:
            link = log_analytics_link(detection, resource_id, self.portals)
            if link is not None:
                found.append(link)
        return found

    def close(self) -> None:
        self.client.close()
        if self._own_credential and hasattr(self.credential, "close"):
            self.credential.close()

    # --- how workspaces are queried -------------------------------------------------------------

    def _query_together(self, detection: Detection) -> QueryResult | None:
        """One request over every workspace; rows are attributed by their TenantId (the workspace id).
        None when the result does not carry TenantId: then each workspace is queried on its own."""
        primary, others = self.workspaces[0], list(self.workspaces[1:])
        columns, rows, incomplete = self._run(detection, primary, others)
        if "TenantId" not in columns:
            log.info(
                "detection %s: the result has no TenantId column; querying each workspace on its own", detection.name
            )
            return None
        by_workspace: dict[str, list[Row]] = {}
        for row in rows:
            tenant = str(row.get("TenantId") or "").lower()
            label = tenant if tenant in self.workspaces or _GUID.match(tenant) else "unattributed"
            by_workspace.setdefault(label, []).append(row)
        batches = [(f"{LABEL}:{workspace}", found) for workspace, found in by_workspace.items()]
        return QueryResult(batches=batches, incomplete=incomplete)

    def _query_each(self, detection: Detection) -> QueryResult:
        result = QueryResult()
        failures: list[tuple[str, QueryError]] = []
        for workspace in self.workspaces:
            try:
                _, rows, incomplete = self._run(detection, workspace, None)
            except _SameEverywhere as error:
                raise QueryError(str(error)) from None  # asking the other workspaces would fail the same way
            except QueryError as error:
                failures.append((workspace, error))
                continue
            result.batches.append((f"{LABEL}:{workspace}", rows))
            result.incomplete.extend(incomplete)
        if failures and not result.batches:
            if len(failures) == 1:
                raise failures[0][1]
            raise QueryError("; ".join(str(e) for _, e in failures))
        for workspace, error in failures:
            result.incomplete.append(f"{error} (the devices of workspace {workspace} are missing from this run)")
        return result

    # --- one request ----------------------------------------------------------------------------

    def _run(
        self, detection: Detection, workspace: str, additional: list[str] | None
    ) -> tuple[list[str], list[Row], list[str]]:
        scope = f"workspace {workspace}" + (f" (with {', '.join(additional)})" if additional else "")
        if self.deadline.expired:
            raise QueryError(f"{scope}: not queried, the run's query budget (RUN_BUDGET) is used up; the next run retries")
        responses: list[Any] = []
        try:
            response = self.client.query_workspace(
                workspace,
                detection.query,
                timespan=None,
                server_timeout=QUERY_WAIT_SECONDS,
                additional_workspaces=additional or None,
                raw_response_hook=responses.append,
            )
        except ClientAuthenticationError as error:
            if getattr(error, "response", None) is None:
                raise _SameEverywhere(credential_problem(error)) from None
            raise QueryError(self._http_problem(error, scope, len(responses))) from None
        except (DecodeError, ValueError):
            # The generated client parses the body itself: an HTML page or a cut-off body is a ValueError.
            raise QueryError(self._malformed(scope, responses)) from None
        except HttpResponseError as error:
            if error.status_code is None:
                # query_workspace re-raises every error of the pipeline as a plain HttpResponseError;
                # one without a status never reached the service: the credential gave no token.
                raise _SameEverywhere(credential_problem(error)) from None
            if 200 <= error.status_code < 300:
                raise QueryError(self._malformed(scope, responses)) from None  # a DecodeError, re-raised
            problem = self._http_problem(error, scope, len(responses))
            if error.status_code == 400:
                raise _SameEverywhere(problem) from None
            raise QueryError(problem) from None
        except (ServiceRequestError, ServiceResponseError) as error:
            why = [type(error).__name__]
            if "CERTIFICATE_VERIFY_FAILED" in str(error) or "SSLError" in str(error):
                why.append("TLS certificate not trusted? see REQUESTS_CA_BUNDLE")
            if self.retry_policy.last_refusal:
                why.append(self.retry_policy.last_refusal)
            raise QueryError(
                f"{scope}: could not reach Log Analytics at {self.where} ({'; '.join(why)}); the next run retries"
            ) from None
        except AzureError as error:
            raise QueryError(f"{scope}: the query failed ({type(error).__name__}: {str(error)[:300]})") from None

        size = _body_size(responses[-1]) if responses else None
        incomplete: list[str] = []
        if isinstance(response, LogsQueryPartialResult):
            tables = response.partial_data or []
            incomplete.append(f"{scope}: partial result: {_partial_error_text(response.partial_error)}")
        elif isinstance(response, LogsQueryResult):
            tables = response.tables or []
        else:  # pragma: no cover - the client returns one of the two
            raise QueryError(f"{scope}: unexpected answer type {type(response).__name__}")
        if not tables:
            if incomplete:
                return [], [], incomplete
            raise QueryError(f"{scope}: the answer has no result table")
        table = tables[0]
        declared = list(zip(table.columns, table.columns_types))
        rows = typed_rows(declared, (list(row) for row in table.rows), where=f"{scope}: result")
        reason = limit_reason("Log Analytics", len(rows), self.row_limit, size, self.size_limit)
        if reason:
            incomplete.append(f"{scope}: {reason}")
        log.info("detection %s: %s returned %d rows", detection.name, scope, len(rows))
        return list(table.columns), rows, incomplete

    def _malformed(self, scope: str, responses: list[Any]) -> str:
        status = _status(responses[-1]) if responses else None
        answered = f"HTTP {status} " if status else ""
        tried = f" after {len(responses)} attempts" if len(responses) > 1 else ""
        return (
            f"{scope}: Log Analytics at {self.where} answered {answered}with something that is not the query API's "
            f"JSON (an HTML error page or a cut-off body){tried}; nothing was taken from it, the next run retries"
        )

    def _http_problem(self, error: HttpResponseError, scope: str, attempts: int) -> str:
        status = error.status_code
        code, message = _service_error(error)
        said = f"{code}: {message}" if code and message else (code or message or (error.reason or "").strip())
        head = f"{scope}: Log Analytics answered HTTP {status}" + (f" ({said})" if said else "")
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if status == 400:
            return f"{head}: the query was refused as written; fix the detection's KQL (not retried)"
        if status in (401, 403):
            return f"{head}: {ROLE_HINT}"
        if status == 404:
            return f"{head}: check LOG_ANALYTICS_WORKSPACE_ID (the workspace id GUID, not its name) and LOG_ANALYTICS_ENDPOINT"
        if status in RETRY_STATUSES:
            why = self.retry_policy.last_refusal
            return (
                f"{head}{tried}" + (f"; not retried further: {why}" if why else "")
                + "; the next run retries"
            )
        return f"{head}{tried}"


class _SameEverywhere(QueryError):
    """The KQL was refused (HTTP 400) or no token was had: every other workspace would fail the same way."""


def _service_error(error: HttpResponseError) -> tuple[str, str]:
    """The service's own error code and innermost message, from the JSON error body if there is one."""
    body: Any = None
    response = getattr(error, "response", None)
    if response is not None:
        try:
            body = response.json()
        except Exception:  # noqa: BLE001 - an HTML page or no body: no details to add
            body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        return "", ""
    code = str(detail.get("code") or "")
    message = str(detail.get("message") or "")
    inner = detail.get("innererror")
    while isinstance(inner, dict):
        if inner.get("message"):
            message = f"{message} ({inner.get('message')})" if message else str(inner.get("message"))
        inner = inner.get("innererror")
    return code, " ".join(message.split())[:500]


def _partial_error_text(error: Any) -> str:
    """The partial error's code and every detail's innermost message: what the operator needs."""
    if error is None:
        return "the service reported a partial error without details"
    parts: list[str] = []
    for detail in getattr(error, "details", None) or []:
        if not isinstance(detail, Mapping):
            continue
        text = str(detail.get("message") or "")
        inner = detail.get("innererror")
        while isinstance(inner, Mapping):
            if inner.get("message"):
                text = str(inner["message"])
            inner = inner.get("innererror")
        code = str(detail.get("code") or "")
        if text or code:
            parts.append(f"{code}: {text}" if code and text else (text or code))
    head = str(getattr(error, "code", "") or "PartialError")
    message = str(getattr(error, "message", "") or "")
    if parts:
        return f"{head}: " + "; ".join(" ".join(p.split())[:500] for p in parts)
    return f"{head}: {message}" if message else head


def _status(pipeline_response: Any) -> int | None:
    try:
        return int(pipeline_response.http_response.status_code)
    except Exception:  # noqa: BLE001
        return None


def _body_size(pipeline_response: Any) -> int | None:
    try:
        return len(pipeline_response.http_response.body())
    except Exception:  # noqa: BLE001 - the size is a hint, not a requirement
        return None
