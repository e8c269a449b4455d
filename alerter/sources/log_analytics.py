"""QUERY_SOURCE=log_analytics: the detection's KQL, unchanged, in the SOC's Sentinel workspace(s).

`azure-monitor-query`'s LogsQueryClient with DefaultAzureCredential (in Azure the Function App's
managed identity, which needs the Log Analytics Reader role on each workspace). Decisions, each
explained in docs/sources.md:

- `timespan=None`: the API's timespan is not sent, so it never cuts the query's own window
  (`now(-5d)..now()` in the seed); the query decides what it reads.
- Several workspaces: when the query's result can say where each row came from (it mentions
  `TenantId`, the workspace id column of every Log Analytics table, and the result carries it),
  the workspaces are queried together with `additional_workspaces`, one request; otherwise, or
  when that request fails, each workspace is queried on its own, so that every sighting names
  the workspace it was seen in and one workspace's failure (no role, a table it lacks: HTTP 400)
  does not hide the others' devices. Only a missing token and a syntax error stop at once.
- A partial result (`LogsQueryPartialResult`) is used and reported with the service's details;
  results at the row limit or near the size limit (bytes on the wire) are reported as possibly
  cut. Every result table is read.
- Throttling and outages (429 with or without Retry-After, 500, 502, 503, 504, dropped
  connections) are retried by azure-core's RetryPolicy, tuned to wait at least a second, to
  repeat the POST (a query changes nothing), and never to wait past the run's query budget;
  each attempt's read timeout and the service's `Prefer: wait` are cut to the budget left.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from alerter.sightings import DEVICE_ID_COLUMNS, DEVICE_NAME_COLUMNS
from alerter.sources import QueryError, QueryResult, Row
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
    retries.

    Every attempt's read timeout is the client's (HTTP_TIMEOUT plus the service's wait) cut to
    what is left of the budget: azure-core itself only cuts the connection timeout, so a slow
    answer would otherwise be waited for past the budget."""

    def __init__(
        self,
        deadline: Deadline,
        retries: int,
        *,
        read_timeout: float | None = None,
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
        self.read_timeout = read_timeout
        self.retry_after_max = retry_after_max
        self.last_refusal: str = ""
        """Why the policy stopped retrying early (a long Retry-After, the budget), for the error text."""

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        settings["methods"] = frozenset({"GET", "POST"})
        settings["timeout"] = max(1.0, self.deadline.remaining())
        self.last_refusal = ""
        return settings

    def _configure_timeout(self, request: Any, absolute_timeout: float, is_response_error: bool) -> None:
        super()._configure_timeout(request, absolute_timeout, is_response_error)
        remaining = self.deadline.remaining()
        read_timeout = self.read_timeout if self.read_timeout is not None else remaining
        request.context.options["read_timeout"] = max(MIN_ATTEMPT_SECONDS / 10, min(read_timeout, remaining))

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
        if not self._fits(wait):
            return False
        return super().is_retry(settings, response)

    def increment(self, settings: dict[str, Any], response: Any = None, error: Any = None) -> bool:
        if error is not None and settings["total"]:
            # A dropped connection or a read timeout: retried only if the wait and an attempt still fit.
            if not self._fits(backoff_seconds(len(settings["history"]) + 1, settings["backoff"])):
                return False
        return super().increment(settings, response=response, error=error)

    def _fits(self, wait: float) -> bool:
        if wait + MIN_ATTEMPT_SECONDS > self.deadline.remaining():
            self.last_refusal = "the run's query budget (RUN_BUDGET) is used up"
            return False
        return True


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
        read_timeout = settings.http_timeout + QUERY_WAIT_SECONDS
        self.retry_policy = QueryRetryPolicy(self.deadline, self.retries, read_timeout=read_timeout)
        self.client = LogsQueryClient(
            self.credential,
            endpoint=self.endpoint,
            retry_policy=self.retry_policy,
            connection_timeout=settings.http_timeout,
            read_timeout=read_timeout,
        )

    # --- the Source interface -------------------------------------------------------------------

    def query(self, detection: Detection, now: datetime) -> QueryResult:
        """`now` is not used: the service's clock is the query's clock (`--now` is for local replay)."""
        try:
            if len(self.workspaces) > 1 and _MENTIONS_TENANT_ID.search(detection.query):
                together = self._query_together(detection)
                if together is not None:
                    return together
            return self._query_each(detection)
        except _SameEverywhere as error:
            raise QueryError(str(error)) from None  # asking the other workspaces would fail the same way

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
        None when the result does not carry TenantId, or when the request failed for a reason that
        may be one workspace's (a missing role, a table it lacks, an outage): then each workspace is
        queried on its own, so that one workspace cannot hide the others' devices."""
        primary, others = self.workspaces[0], list(self.workspaces[1:])
        try:
            tables, incomplete = self._run(detection, primary, others)
        except _SameEverywhere:
            raise
        except QueryError as error:
            if self.deadline.expired:
                raise  # nothing is left to ask each workspace with
            log.warning("detection %s: %s; querying each workspace on its own", detection.name, error)
            return None
        if any("TenantId" not in table.columns for table in tables):
            log.info(
                "detection %s: the result has no TenantId column; querying each workspace on its own", detection.name
            )
            return None
        by_workspace: dict[str, list[list[Row]]] = {}
        for table in tables:
            grouped: dict[str, list[Row]] = {}
            for row in table.rows:
                tenant = str(row.get("TenantId") or "").lower()
                label = tenant if tenant in self.workspaces or _GUID.match(tenant) else "unattributed"
                grouped.setdefault(label, []).append(row)
            for label, rows in grouped.items():
                by_workspace.setdefault(label, []).append(rows)
        batches = [(f"{LABEL}:{workspace}", rows) for workspace, parts in by_workspace.items() for rows in parts]
        return QueryResult(batches=batches, incomplete=incomplete)

    def _query_each(self, detection: Detection) -> QueryResult:
        """Each workspace on its own. A workspace that fails (a missing role, a table it does not
        have, an outage) is reported and the others' rows are still used; only a failure that
        would repeat everywhere (no token, a syntax error) stops at once."""
        result = QueryResult()
        failures: list[tuple[str, QueryError]] = []
        answered = 0
        for workspace in self.workspaces:
            try:
                tables, incomplete = self._run(detection, workspace, None)
            except _SameEverywhere:
                raise
            except QueryError as error:
                failures.append((workspace, error))
                continue
            answered += 1
            result.batches.extend((f"{LABEL}:{workspace}", table.rows) for table in tables)
            result.incomplete.extend(incomplete)
        if failures and not answered:
            if len(failures) == 1:
                raise failures[0][1]
            raise QueryError("; ".join(str(e) for _, e in failures))
        for workspace, error in failures:
            result.incomplete.append(f"{error} (the devices of workspace {workspace} are missing from this run)")
        return result

    # --- one request ----------------------------------------------------------------------------

    def _run(
        self, detection: Detection, workspace: str, additional: list[str] | None
    ) -> tuple[list[_Table], list[str]]:
        """The answer's tables, each typed by its own columns, and why they may be incomplete."""
        scope = f"workspace {workspace}" + (f" (with {', '.join(additional)})" if additional else "")
        if self.deadline.expired:
            raise QueryError(f"{scope}: not queried, the run's query budget (RUN_BUDGET) is used up; the next run retries")
        responses: list[Any] = []
        # The service may run the query as long as the budget has left (at most its default 3 minutes).
        server_timeout = max(1, min(QUERY_WAIT_SECONDS, int(self.deadline.remaining())))
        try:
            response = self.client.query_workspace(
                workspace,
                detection.query,
                timespan=None,
                server_timeout=server_timeout,
                additional_workspaces=additional or None,
                raw_response_hook=responses.append,
            )
        except ClientAuthenticationError as error:
            if getattr(error, "response", None) is None:
                raise _SameEverywhere(credential_problem(error)) from None
            raise QueryError(self._http_problem(error, scope, len(responses))) from None
        except DecodeError:
            raise QueryError(self._malformed(scope, responses)) from None
        except HttpResponseError as error:
            if error.status_code is None:
                # query_workspace re-raises every error of the pipeline as a plain HttpResponseError;
                # one without a status never reached the service: the credential gave no token.
                raise _SameEverywhere(credential_problem(error)) from None
            if 200 <= error.status_code < 300:
                raise QueryError(self._malformed(scope, responses)) from None  # a DecodeError, re-raised
            problem = self._http_problem(error, scope, len(responses))
            if error.status_code == 400 and _is_syntax_error(error):
                raise _SameEverywhere(problem) from None  # the KQL itself: every workspace refuses it
            raise QueryError(problem) from None
        except (ServiceRequestError, ServiceResponseError) as error:
            why = [type(error).__name__]
            if "CERTIFICATE_VERIFY_FAILED" in str(error) or "SSLError" in str(error):
                why.append("TLS certificate not trusted? see REQUESTS_CA_BUNDLE")
            if self.retry_policy.last_refusal:
                why.append(self.retry_policy.last_refusal)
            elif self.deadline.expired:
                why.append("no answer before the run's query budget (RUN_BUDGET) was used up")
            timed_out = "timed out" in str(error).lower() or "Timeout" in type(error).__name__
            what = "no answer in time from" if timed_out else "could not reach"
            raise QueryError(
                f"{scope}: {what} Log Analytics at {self.where} ({'; '.join(why)}); the next run retries"
            ) from None
        except AzureError as error:
            raise QueryError(f"{scope}: the query failed ({type(error).__name__}: {str(error)[:300]})") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as error:
            # The client parses the body and builds its tables itself: a body that is not JSON
            # (an HTML page, a cut-off answer), JSON nested too deep, or JSON of another shape
            # fails in there.
            raise QueryError(self._malformed(scope, responses, error)) from None

        try:
            tables, incomplete = self._tables(response, scope)
        except (TypeError, KeyError, IndexError, AttributeError) as error:
            raise QueryError(self._malformed(scope, responses, error)) from None
        size = _wire_size(responses[-1]) if responses else None
        rows = sum(len(table.rows) for table in tables)
        reason = limit_reason("Log Analytics", rows, self.row_limit, size, self.size_limit)
        if reason:
            incomplete.append(f"{scope}: {reason}")
        log.info("detection %s: %s returned %d rows", detection.name, scope, rows)
        return tables, incomplete

    def _tables(self, response: Any, scope: str) -> tuple[list[_Table], list[str]]:
        incomplete: list[str] = []
        if isinstance(response, LogsQueryPartialResult):
            found = response.partial_data or []
            incomplete.append(f"{scope}: partial result: {_partial_error_text(response.partial_error)}")
        elif isinstance(response, LogsQueryResult):
            found = response.tables or []
        else:  # pragma: no cover - the client returns one of the two
            raise QueryError(f"{scope}: unexpected answer type {type(response).__name__}")
        if not found:
            if incomplete:
                return [], incomplete
            raise QueryError(f"{scope}: the answer has no result table")
        tables: list[_Table] = []
        for number, table in enumerate(found, start=1):
            columns = [str(name) for name in table.columns]
            if len(columns) != len(table.columns_types):
                raise QueryError(f"{scope}: result table {number} declares {len(columns)} columns and "
                                 f"{len(table.columns_types)} types; nothing was taken from it")
            where = f"{scope}: result" + (f" table {number} ({table.name})" if len(found) > 1 else "")
            rows = typed_rows(list(zip(columns, table.columns_types)), (list(row) for row in table.rows), where=where)
            if number > 1 and rows and not set(columns) & _DEVICE_COLUMNS:
                # A later table without a device column cannot be read as sightings; say so rather
                # than drop its rows without a word.
                incomplete.append(
                    f"{scope}: result table {number} ({table.name}) has no DeviceId or DeviceName column; "
                    f"its {len(rows)} rows were not read"
                )
                continue
            tables.append(_Table(columns, rows))
        return tables, incomplete

    def _malformed(self, scope: str, responses: list[Any], error: BaseException | None = None) -> str:
        status = _status(responses[-1]) if responses else None
        tried = f" after {len(responses)} attempts" if len(responses) > 1 else ""
        if error is not None and not responses:
            # Nothing came back: the client failed before or while sending, not on an answer.
            return (f"{scope}: the Log Analytics client failed before an answer came "
                    f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); the next run retries")
        answered = f"HTTP {status} " if status else ""
        if error is None or _is_decode_error(error):
            what = "something that is not the query API's JSON (an HTML error page or a cut-off body)"
        else:
            what = (f"JSON that is not a query result as the API documents it (reading it failed with "
                    f"{type(error).__name__})")
        return (
            f"{scope}: Log Analytics at {self.where} answered {answered}with {what}{tried}; "
            "nothing was taken from it, the next run retries"
        )

    def _http_problem(self, error: HttpResponseError, scope: str, attempts: int) -> str:
        status = error.status_code
        code, message = _service_error(error)
        said = f"{code}: {message}" if code and message else (code or message or (error.reason or "").strip())
        head = f"{scope}: Log Analytics answered HTTP {status}" + (f" ({said})" if said else "")
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if status == 400:
            if _is_syntax_error(error):
                return f"{head}: the query was refused as written; fix the detection's KQL (not retried)"
            return (f"{head}: this workspace refused the query (a table or column it does not have, or KQL it "
                    "cannot run); not retried")
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
    """No token was had, or the KQL has a syntax error: every other workspace would fail the same way.
    (Any other HTTP 400 may be one workspace's: a table it does not have, a column its schema lacks.)"""


@dataclass
class _Table:
    columns: list[str]
    rows: list[Row]


_DEVICE_COLUMNS = frozenset(DEVICE_ID_COLUMNS + DEVICE_NAME_COLUMNS)


def _is_syntax_error(error: HttpResponseError) -> bool:
    """The service said the KQL does not parse (inner code SyntaxError or SYN..., or "syntax error" in
    a message): a fault of the query, the same in every workspace."""
    body: Any = None
    response = getattr(error, "response", None)
    if response is not None:
        try:
            body = response.json()
        except Exception:  # noqa: BLE001 - no JSON: nothing says it is a syntax error
            return False
    detail = body.get("error") if isinstance(body, dict) else None
    for _ in range(32):  # innererror nests a few levels; a hostile body cannot keep us here
        if not isinstance(detail, dict):
            return False
        code = str(detail.get("code") or "")
        if code.lower() == "syntaxerror" or code.upper().startswith("SYN0"):
            return True
        if "syntax error" in str(detail.get("message") or "").lower():
            return True
        detail = detail.get("innererror")
    return False


def _is_decode_error(error: BaseException) -> bool:
    return isinstance(error, (DecodeError, json.JSONDecodeError, UnicodeDecodeError))


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


def _wire_size(pipeline_response: Any) -> int | None:
    """The answer's size as it came over the wire: compressed when the service compressed it, which
    is how its 64 MB limit counts. urllib3 counts those bytes (`raw.tell()`); without that count an
    uncompressed body's length is the same thing, and a compressed one's is unknown (None: the row
    limit and the service's partial error still speak)."""
    try:
        http_response = pipeline_response.http_response
        raw = getattr(getattr(http_response, "internal_response", None), "raw", None)
        counted = raw.tell() if raw is not None and hasattr(raw, "tell") else None
        if isinstance(counted, int) and counted > 0:
            return counted
        encoding = (http_response.headers.get("Content-Encoding") or "identity").strip().lower()
        return len(http_response.body()) if encoding == "identity" else None
    except Exception:  # noqa: BLE001 - the size is a hint, not a requirement
        return None
