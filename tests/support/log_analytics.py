"""A fake Log Analytics query API that computes its answers: the detection's KQL, as received,
run by duckdb-kql over each workspace's test rows.

It speaks the documented wire format (https://learn.microsoft.com/azure/azure-monitor/logs/api/):

    POST /v1/workspaces/{workspaceId}/query
    Authorization: Bearer <token for the endpoint's audience>
    {"query": "...", "timespan": "PT12H" | "<start>/<end>" | null, "workspaces": [...] | null}

    200 {"tables": [{"name": "PrimaryResult", "columns": [{"name", "type"}], "rows": [[...]]}]}

Kusto types on the wire: datetime as ISO 8601 with 7 fractional digits, dynamic as a JSON string,
long/int/real as numbers, bool as true/false, null as null. Like the real service it adds
`TenantId` (the workspace id) and `TimeGenerated` to every row, applies a `timespan` to
`TimeGenerated` (so a client that sends one really cuts the window), unions the rows of
`workspaces`, and answers 400 BadArgumentError for a query it cannot run (inner error
SyntaxError when the KQL does not parse, SemanticError for a table or column the workspace does
not have, nested as the service nests them), 401 without the managed identity's token, 403 for a
workspace the identity may not read, 404 for an unknown one.

Faults are scripted with `fake.then(Reply(...))` (see the helpers at the bottom: `answer` and
`result_table` for an answer of one's own, `gzipped` for one compressed on the wire), a partial
error with `fake.partial_error = partial_error(...)`.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import duckdb
import duckdb_kql
import trustme

from tests.support.http_server import FakeService, Recorded, Reply
from tests.support.identity import ManagedIdentityEndpoint

# The advanced hunting schema of the one table the detections read (Kusto types).
TABLE_SCHEMAS: dict[str, dict[str, str]] = {
    "DeviceFileCertificateInfo": {
        "Timestamp": "datetime",
        "DeviceId": "string",
        "DeviceName": "string",
        "SHA1": "string",
        "IsSigned": "bool",
        "SignatureType": "string",
        "Signer": "string",
        "SignerHash": "string",
        "Issuer": "string",
        "IssuerHash": "string",
        "CertificateSerialNumber": "string",
        "CrlDistributionPointUrls": "string",
        "CertificateCreationTime": "datetime",
        "CertificateExpirationTime": "datetime",
        "CertificateCountersignatureTime": "datetime",
        "IsTrusted": "bool",
        "IsRootSignerMicrosoft": "bool",
        "ReportId": "long",
    }
}
SENTINEL_COLUMNS = {"TimeGenerated": "datetime", "TenantId": "string", "Type": "string"}

_DUCK_TYPES = {"datetime": "TIMESTAMPTZ", "string": "VARCHAR", "long": "BIGINT", "int": "INTEGER",
               "bool": "BOOLEAN", "real": "DOUBLE", "dynamic": "JSON", "guid": "VARCHAR"}


def _kusto_type_of_duck(duck_type: str) -> str:
    text = duck_type.upper()
    if text.startswith("TIMESTAMP") or text == "DATE":
        return "datetime"
    if text in ("BIGINT", "HUGEINT", "UBIGINT"):
        return "long"
    if text in ("INTEGER", "SMALLINT", "TINYINT", "UINTEGER", "USMALLINT", "UTINYINT"):
        return "int"
    if text == "BOOLEAN":
        return "bool"
    if text in ("DOUBLE", "FLOAT", "REAL") or text.startswith("DECIMAL"):
        return "real"
    if text == "JSON" or text.endswith("[]") or text.startswith(("STRUCT", "MAP", "LIST")):
        return "dynamic"
    return "string"


def parse_time(value: Any) -> datetime | None:
    """Test rows carry times as ISO strings (7 fractional digits allowed) or datetimes."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value).strip().replace("Z", "+00:00")
    match = re.match(r"^(.*?\.\d{1,6})\d*(.*)$", text)
    if match:
        text = match.group(1) + match.group(2)
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def kusto_datetime(value: datetime) -> str:
    """Kusto writes 7 fractional digits (100 ns ticks) and a Z."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


class KqlError(Exception):
    """The engine could not run the query: the fake answers 400 with this text. `kind` is the
    service's inner error code: SyntaxError (the KQL does not parse, in any workspace) or
    SemanticError (a table or column this workspace does not have)."""

    def __init__(self, message: str, kind: str = "SemanticError") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Answer:
    columns: list[tuple[str, str]]
    rows: list[list[Any]]
    """Python values: datetimes aware, dynamic decoded, None for null."""


@dataclass
class HuntingData:
    """Rows per table; `run` executes KQL over them the way the service would (as duckdb-kql does)."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def run(self, query: str, now: datetime, *, time_filter: tuple[datetime, datetime] | None = None,
            time_column: str = "TimeGenerated") -> Answer:
        con = duckdb_kql.connect()
        try:
            for table, rows in self.tables.items():
                self._load(con, table, rows, time_filter, time_column)
            try:
                cursor = duckdb_kql.execute(con, query, query_now=now)
                description = cursor.description or []
                fetched = cursor.fetchall()
            except duckdb_kql.KqlSyntaxError as error:
                raise KqlError(" ".join(str(error).split())[:300], "SyntaxError") from None
            except (duckdb_kql.KqlError, duckdb.Error) as error:
                raise KqlError(" ".join(str(error).split())[:300], "SemanticError") from None
            columns = [(d[0], _kusto_type_of_duck(str(d[1]))) for d in description]
            out = []
            for values in fetched:
                row = []
                for (_, kind), value in zip(columns, values):
                    if kind == "dynamic" and isinstance(value, str):
                        value = json.loads(value)
                    if isinstance(value, datetime) and value.tzinfo is None:
                        value = value.replace(tzinfo=timezone.utc)
                    row.append(value)
                out.append(row)
            return Answer(columns, out)
        finally:
            con.close()

    @staticmethod
    def _load(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]],
              time_filter: tuple[datetime, datetime] | None, time_column: str) -> None:
        schema = dict(TABLE_SCHEMAS.get(table, {}))
        for row in rows:
            for name, value in row.items():
                if name not in schema:
                    schema[name] = _guess_type(name, value)
        if not schema:
            return
        names = list(schema)
        con.execute(f'CREATE TABLE "{table}" (' + ", ".join(f'"{n}" {_DUCK_TYPES[schema[n]]}' for n in names) + ")")
        values = []
        for row in rows:
            record = []
            for name in names:
                value = row.get(name)
                if schema[name] == "datetime":
                    value = parse_time(value)
                elif schema[name] == "dynamic" and value is not None:
                    value = json.dumps(value)
                record.append(value)
            if time_filter is not None:
                when = parse_time(row.get(time_column) or row.get("Timestamp"))
                if when is None or not time_filter[0] <= when <= time_filter[1]:
                    continue
            values.append(record)
        if values:
            con.executemany(f'INSERT INTO "{table}" VALUES (' + ", ".join("?" for _ in names) + ")", values)


def _guess_type(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "real"
    if isinstance(value, (list, dict)):
        return "dynamic"
    if isinstance(value, datetime) or name in ("Timestamp", "TimeGenerated") or name.endswith("Time"):
        return "datetime"
    return "string"


_DURATION = re.compile(r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
                       r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or text.strip() in ("P", "PT"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return timedelta(days=parts.get("d", 0), hours=parts.get("h", 0), minutes=parts.get("m", 0),
                     seconds=parts.get("s", 0))


def parse_timespan(text: str, now: datetime) -> tuple[datetime, datetime]:
    """`PT12H`, `<start>/<end>`, `<start>/<duration>` as the query API accepts them."""
    if "/" not in text:
        return now - parse_duration(text), now
    start_text, end_text = text.split("/", 1)
    start = parse_time(start_text)
    end = start + parse_duration(end_text) if end_text.startswith("P") else parse_time(end_text)
    return start, end


_INNER = {
    # The service's wording: a general inner error, and the engine's own message nested under it.
    "SyntaxError": ("A recognition error occurred in the query.", "SYN0002"),
    "SemanticError": ("A semantic error occurred.", "SEM0100"),
}


def service_error(status: int, code: str, message: str, inner: str | None = None,
                  inner_code: str = "SyntaxError") -> Reply:
    """The query API's error body. With `inner`, a 400 as the service nests it:
    innererror {code: SyntaxError | SemanticError, message, innererror {code: SYN.../SEM..., message: inner}}."""
    error: dict[str, Any] = {"message": message, "code": code, "correlationId": "00000000-0000-0000-0000-000000000001"}
    if inner:
        general, engine_code = _INNER.get(inner_code, (inner_code, inner_code))
        error["innererror"] = {"code": inner_code, "message": general,
                               "innererror": {"code": engine_code, "message": inner}}
    return Reply(status, {"error": error})


class FakeLogAnalytics(FakeService):
    """`with FakeLogAnalytics(ca, identity, now, {workspace_id: {table: rows}}) as fake:`;
    `fake.url` is the LOG_ANALYTICS_ENDPOINT."""

    def __init__(
        self,
        ca: trustme.CA,
        identity: ManagedIdentityEndpoint,
        now: datetime,
        workspaces: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    ) -> None:
        self.identity = identity
        self.now = now
        self.workspaces = {w.lower(): {t: list(r) for t, r in tables.items()} for w, tables in workspaces.items()}
        self.denied: set[str] = set()
        """Workspaces the managed identity has no role on (403)."""
        self.partial_error: dict[str, Any] | None = None
        """When set, every computed answer also carries this `error` object (a partial result)."""
        self.audience: str | None = None
        """The token audience the service accepts; default: its own URL (the client's endpoint)."""
        self.answers: list[tuple[str, dict[str, Any], int]] = []
        """(workspace, request body, rows answered) for every computed answer."""
        self._lock = threading.Lock()
        super().__init__(ca)

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.requests if r.method == "POST"]

    # --- the protocol -------------------------------------------------------------------------

    def _answer(self, recorded: Recorded) -> Reply:
        match = re.fullmatch(r"/v1/workspaces/([^/]+)/query", recorded.path)
        if recorded.method != "POST" or not match:
            return service_error(404, "PathNotFoundError", f"The requested path does not exist: {recorded.path}")
        if not self.identity.authorized(recorded, self.audience or self.url):
            return service_error(401, "AuthorizationRequiredError", "Valid authentication was not provided")
        workspace = match.group(1).lower()
        try:
            body = json.loads(recorded.body or b"{}")
        except json.JSONDecodeError:
            return service_error(400, "BadArgumentError", "The request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("query"), str) or not body["query"].strip():
            return service_error(400, "BadArgumentError", "The request had some invalid properties",
                                 "query is required")
        scope = [workspace] + [str(w).lower() for w in (body.get("workspaces") or [])]
        for name in scope:
            if name not in self.workspaces:
                return service_error(404, "WorkspaceNotFoundError", f"Workspace {name} not found")
            if name in self.denied:
                return service_error(
                    403, "InsufficientAccessError",
                    "The provided credentials have insufficient access to perform the requested operation",
                )
        time_filter = None
        if body.get("timespan"):
            try:
                time_filter = parse_timespan(str(body["timespan"]), self.now)
            except ValueError as error:
                return service_error(400, "BadArgumentError", "The request had some invalid properties", str(error))
        data = HuntingData()
        for name in dict.fromkeys(scope):
            for table, rows in self.workspaces[name].items():
                sentinel_rows = [
                    {**row, "TenantId": name, "Type": table, "TimeGenerated": row.get("TimeGenerated") or row.get("Timestamp")}
                    for row in rows
                ]
                data.tables.setdefault(table, []).extend(sentinel_rows)
        try:
            answer = data.run(body["query"], self.now, time_filter=time_filter)
        except KqlError as error:
            return service_error(400, "BadArgumentError", "The request had some invalid properties", str(error),
                                 error.kind)
        with self._lock:
            self.answers.append((workspace, body, len(answer.rows)))
        document: dict[str, Any] = {"tables": [wire_table(answer)]}
        if self.partial_error is not None:
            document["error"] = self.partial_error
        return Reply(200, document, {"Content-Type": "application/json; charset=utf-8"})



def wire_value(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "datetime":
        return kusto_datetime(value)
    if kind == "dynamic":
        return json.dumps(value)
    return value


def wire_table(answer: Answer, name: str = "PrimaryResult") -> dict[str, Any]:
    return {
        "name": name,
        "columns": [{"name": n, "type": t} for n, t in answer.columns],
        "rows": [[wire_value(t, v) for (_, t), v in zip(answer.columns, row)] for row in answer.rows],
    }


# --- scripted faults ---------------------------------------------------------------------------


def partial_error(*inner_messages: str) -> dict[str, Any]:
    """The `error` object of a partial result, as the service words it."""
    return {
        "message": "There were some errors when processing your query.",
        "code": "PartialError",
        "correlationId": "00000000-0000-0000-0000-000000000002",
        "details": [
            {
                "code": "EngineError",
                "message": "Something went wrong processing your query on the server.",
                "innererror": {"code": "-2133196797", "message": text, "severity": 2, "severityName": "Error"},
            }
            for text in inner_messages
        ],
    }


def throttled(retry_after: str | None = None) -> Reply:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    reply = service_error(429, "ThrottledError", "Your request was throttled: too many requests in the queue")
    reply.headers.update(headers)
    return reply


def unavailable(status: int = 503, retry_after: str | None = None) -> Reply:
    reply = service_error(status, "ServiceUnavailableError", "The service is temporarily unavailable")
    if retry_after is not None:
        reply.headers["Retry-After"] = retry_after
    return reply


def html_page(status: int = 200) -> Reply:
    return Reply(status, "<!DOCTYPE html><html><body><h1>Service Unavailable</h1></body></html>",
                 {"Content-Type": "text/html"})


def truncated(document: dict[str, Any]) -> Reply:
    """A JSON answer cut in the middle (a proxy that gave up), sent with a matching length."""
    text = json.dumps(document)
    return Reply(200, text[: len(text) // 2], {"Content-Type": "application/json; charset=utf-8"})


def rows_of(answer_table: dict[str, Any]) -> Iterator[dict[str, Any]]:
    names = [c["name"] for c in answer_table["columns"]]
    for row in answer_table["rows"]:
        yield dict(zip(names, row))


# --- scripted answers --------------------------------------------------------------------------


def result_table(columns: list[tuple[str, str]], rows: list[list[Any]], name: str = "PrimaryResult") -> dict[str, Any]:
    """One table of a scripted answer, on the wire as the service writes it."""
    return {"name": name, "columns": [{"name": n, "type": t} for n, t in columns], "rows": rows}


def answer(*tables: dict[str, Any]) -> Reply:
    """A scripted 200 answer with these tables."""
    return Reply(200, {"tables": list(tables)}, {"Content-Type": "application/json; charset=utf-8"})


def gzipped(document: Any) -> Reply:
    """A 200 answer compressed on the wire (`Content-Encoding: gzip`), as the service sends a big one."""
    body = gzip.compress(json.dumps(document).encode("utf-8"), mtime=0)
    return Reply(200, body, {"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip"})
