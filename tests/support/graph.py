"""A fake Microsoft Graph advanced hunting API that computes its answers: the KQL, as received,
run by duckdb-kql over the test rows (the same engine as the fake Log Analytics, so that both
sources can be compared on the same data).

As documented (https://learn.microsoft.com/graph/api/security-security-runhuntingquery):

    POST /v1.0/security/runHuntingQuery
    Authorization: Bearer <token for the Graph audience>
    {"Query": "...", "Timespan": "P30D" (optional; default: the 30 days the service keeps)}

    200 {"schema": [{"name", "type"}], "results": [{column: value}]}

Types are named the .NET way (String, DateTime, Int64, Boolean, Double, Object); datetimes have 7
fractional digits. `casing="upper"` answers with `Schema`/`Results`/`Name`/`Type`, as some
responses in Microsoft's documentation do. Results are cut at `row_limit` (100,000), silently, as
the service does. Faults are scripted with `fake.server.then(Reply(...))`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import trustme

from tests.support.http_server import FakeService, Recorded, Reply
from tests.support.identity import ManagedIdentityEndpoint
from tests.support.log_analytics import HuntingData, KqlError, kusto_datetime, parse_timespan

GRAPH_TYPES = {"string": "String", "datetime": "DateTime", "long": "Int64", "int": "Int32", "bool": "Boolean",
               "real": "Double", "dynamic": "Object", "guid": "String"}
ROW_LIMIT = 100_000
RETENTION = timedelta(days=30)


def graph_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message,
                                    "innerError": {"date": "2026-05-31T11:00:00", "request-id": "r-1"}}},
                 dict(headers or {}))


class FakeGraph(FakeService):
    """`with FakeGraph(ca, identity, now, {table: rows}) as fake:`; `fake.url` is the GRAPH_ENDPOINT."""

    def __init__(
        self,
        ca: trustme.CA,
        identity: ManagedIdentityEndpoint,
        now: datetime,
        tables: Mapping[str, list[dict[str, Any]]],
        *,
        casing: str = "lower",
        dynamic_as: str = "json",
    ) -> None:
        self.identity = identity
        self.now = now
        self.tables = {t: list(r) for t, r in tables.items()}
        self.casing = casing
        self.dynamic_as = dynamic_as
        """"json": dynamic values as JSON arrays/objects; "string": as JSON text in a string."""
        self.row_limit = ROW_LIMIT
        self.permitted = True
        """False: the identity lacks ThreatHunting.Read.All (403)."""
        self.answers: list[tuple[dict[str, Any], int]] = []
        self._lock = threading.Lock()
        super().__init__(ca)

    def _answer(self, recorded: Recorded) -> Reply:
        if recorded.method != "POST" or recorded.path != "/v1.0/security/runHuntingQuery":
            return graph_error(404, "UnknownError", "Resource not found")
        if not self.identity.authorized(recorded, self.url):
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.")
        if not self.permitted:
            return graph_error(403, "Forbidden", "Missing application roles. API required roles: ThreatHunting.Read.All")
        try:
            body = json.loads(recorded.body or b"{}")
        except json.JSONDecodeError:
            return graph_error(400, "BadRequest", "The request body is not valid JSON")
        query = body.get("Query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            return graph_error(400, "BadRequest", "Query is required")
        try:
            window = parse_timespan(body["Timespan"], self.now) if body.get("Timespan") else (self.now - RETENTION, self.now)
        except ValueError as error:
            return graph_error(400, "BadRequest", str(error))
        data = HuntingData(self.tables)
        try:
            answer = data.run(query, self.now, time_filter=window, time_column="Timestamp")
        except KqlError as error:
            return graph_error(400, "BadRequest", f"Query could not be parsed: {error}")
        rows = answer.rows[: self.row_limit]
        with self._lock:
            self.answers.append((body, len(rows)))
        upper = self.casing == "upper"
        schema = [{("Name" if upper else "name"): n, ("Type" if upper else "type"): GRAPH_TYPES.get(t, "String")}
                  for n, t in answer.columns]
        results = [{n: self._value(t, v) for (n, t), v in zip(answer.columns, row)} for row in rows]
        document = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.security.huntingQueryResults",
            ("Schema" if upper else "schema"): schema,
            ("Results" if upper else "results"): results,
        }
        return Reply(200, document, {"Content-Type": "application/json; odata.metadata=minimal; charset=utf-8"})

    def _value(self, kind: str, value: Any) -> Any:
        if value is None:
            return None
        if kind == "datetime":
            return kusto_datetime(value)
        if kind == "dynamic" and self.dynamic_as == "string":
            return json.dumps(value)
        return value



def quota_exceeded(retry_after: str | None = "900") -> Reply:
    """The tenant's CPU quota for hunting is used up until the next 15-minute cycle."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return graph_error(429, "TooManyRequests",
                       "The request was throttled: you exceeded the allocated CPU resources for advanced hunting.",
                       headers)
