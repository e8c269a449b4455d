"""What the two Azure sources share: the run's query budget, the credential, Kusto value types,
and error texts that tell an operator which role is missing.

Nothing here logs or returns a token: errors name the service, the workspace or tenant, the
HTTP status and the service's own error code and message, never a header.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from alerter.http import RETRY_AFTER_MAX_SECONDS
from alerter.sightings import as_utc
from alerter.sources import QueryError

QUERY_BUDGET_SHARE = 0.6
"""Share of RUN_BUDGET that all queries of a run may use, retries included; the rest is for delivery."""

MIN_BACKOFF_SECONDS = 1.0
"""The first retry waits this long (doubling after), so that a throttled service gets room to breathe."""

MIN_ATTEMPT_SECONDS = 1.0
"""A retry is made only if, after its wait, at least this much of the query budget is left for the
attempt itself (whose timeouts are then cut to what is left)."""


@dataclass
class Deadline:
    """A point on the monotonic clock by which every query (and its retries) must be done."""

    at: float

    @classmethod
    def after(cls, budget: timedelta, share: float = QUERY_BUDGET_SHARE) -> Deadline:
        return cls(time.monotonic() + max(1.0, budget.total_seconds() * share))

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0


def backoff_seconds(retry_number: int, factor: float = MIN_BACKOFF_SECONDS, cap: float = RETRY_AFTER_MAX_SECONDS) -> float:
    """Exponential backoff: factor, 2*factor, 4*factor ... for retry 1, 2, 3 ..., at most cap."""
    return min(cap, factor * 2 ** max(0, retry_number - 1))


def default_credential() -> Any:
    """DefaultAzureCredential: the Function App's managed identity in Azure (AZURE_CLIENT_ID selects a
    user-assigned one), the Azure CLI login on a workstation. Imported here so that the local source
    never needs azure-identity."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def credential_problem(error: Exception) -> str:
    """A short, safe text for a credential that could not produce a token."""
    text = str(getattr(error, "message", None) or error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return (
        "no Azure credential produced a token: in Azure, turn on the Function App's managed identity "
        "(set AZURE_CLIENT_ID for a user-assigned one); on a workstation, run `az login` "
        f"({first[:300]})"
    )


# --- Kusto values ----------------------------------------------------------------------------

# Graph's advanced hunting names types the .NET way; Log Analytics uses Kusto's names.
_TYPE_ALIASES = {
    "string": "string",
    "datetime": "datetime",
    "date": "datetime",
    "long": "long",
    "int64": "long",
    "int": "int",
    "int32": "int",
    "bool": "bool",
    "boolean": "bool",
    "real": "real",
    "double": "real",
    "decimal": "decimal",
    "dynamic": "dynamic",
    "object": "dynamic",
    "guid": "guid",
    "timespan": "timespan",
}


def kusto_type(name: str | None) -> str:
    return _TYPE_ALIASES.get(str(name or "").strip().lower(), "string")


class ValueProblem(ValueError):
    pass


_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,19}")
"""A Kusto long as text: ASCII digits only (str.isdigit() accepts '²' and other digits int() refuses),
at most 19 of them (a long has 19), so that a hostile cell cannot make int() parse thousands."""

_NULL_TEXT = "None"
"""azure-monitor-query turns every guid and timespan cell into text with str(), a null one too:
it arrives as "None", which no guid or timespan can be."""


def kusto_value(kind: str, value: Any) -> Any:
    """One cell as Python: datetime -> aware UTC datetime, dynamic -> decoded JSON, long/int -> int,
    bool -> bool, real -> float; null stays None. Anything the conversion cannot take (a
    datetime past year 9999 in UTC, digits Python will not read, JSON nested too deep) is a
    ValueProblem, never another exception."""
    if value is None:
        return None
    try:
        return _convert(kind, value)
    except ValueProblem:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        raise ValueProblem(f"not a {kind}: {_sample(value)} ({type(error).__name__})") from None


def _sample(value: Any) -> str:
    try:
        return repr(str(value)[:40])
    except Exception:  # noqa: BLE001 - str() of a hostile value: describe it by its type only
        return type(value).__name__


def _convert(kind: str, value: Any) -> Any:
    if kind == "datetime":
        if value == "":
            return None
        return as_utc(value)
    if kind == "dynamic":
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if kind in ("long", "int"):
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
            return int(value.strip())
        raise ValueProblem(f"not a whole number: {_sample(value)}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueProblem(f"not a bool: {_sample(value)}")
    if kind == "real":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return float(value)
    if kind in ("guid", "timespan"):
        text = str(value)
        return None if text == _NULL_TEXT else text
    if kind == "decimal":
        return str(value)
    return value


def typed_rows(
    columns: list[tuple[str, str]], rows: Iterable[Mapping[str, Any] | list[Any] | tuple[Any, ...]], *, where: str
) -> list[dict[str, Any]]:
    """Rows (lists in column order, or dicts by name) to dicts of Python values by the declared types."""
    kinds = [(name, kusto_type(kind)) for name, kind in columns]
    out: list[dict[str, Any]] = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Mapping, list, tuple)):
            raise QueryError(f"{where}: row {number} is not a row ({type(row).__name__})")
        if not isinstance(row, Mapping) and len(row) > len(kinds):
            raise QueryError(f"{where}: row {number} has {len(row)} values for {len(kinds)} columns")
        record: dict[str, Any] = {}
        for index, (name, kind) in enumerate(kinds):
            if isinstance(row, Mapping):
                raw = row.get(name)
            else:
                raw = row[index] if index < len(row) else None
            try:
                record[name] = kusto_value(kind, raw)
            except ValueProblem as problem:
                raise QueryError(f"{where}: row {number}, column {name} ({kind}): {problem}") from None
        out.append(record)
    return out


def limit_reason(service: str, rows: int, row_limit: int, size: int | None = None, size_limit: int | None = None) -> str | None:
    """Why a result at or near the service's limits may be cut, or None."""
    if rows >= row_limit:
        return (
            f"{service} returned {rows:,} rows, its limit is {row_limit:,}: the result is probably cut and "
            "some devices may be missing; narrow the query (summarize by device) so that it stays under the limit"
        )
    if size is not None and size_limit is not None and size >= size_limit * 0.95:
        return (
            f"{service} returned {size / 1048576:.1f} MB, near its {size_limit / 1048576:.0f} MB limit: the result "
            "may be cut and some devices may be missing; narrow the query so that it returns less data"
        )
    return None

