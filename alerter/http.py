"""One way to make outbound HTTPS calls: a requests session with bounded timeouts and retries.

urllib3's Retry does the in-run retrying (429 with Retry-After, 5xx, connection errors), so no
channel or source writes its own loop. Errors are turned into messages that never contain the
URL: webhook URLs carry their signature in the query string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError, ResponseError
from urllib3.util import Retry

from alerter.urls import describe_url

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_MAX_SECONDS = 60
"""A Retry-After longer than this is not waited out inside a run: the next run retries."""


class HttpCallError(Exception):
    """A call failed after its retries. The message is safe to log and to store."""

    def __init__(self, message: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class HttpPolicy:
    timeout: float = 30.0
    retries: int = 3
    backoff_factor: float = 0.5


class BoundedRetry(Retry):
    """urllib3's Retry, except that a Retry-After beyond RETRY_AFTER_MAX_SECONDS ends the in-run
    retries at once: the caller gets that response (and its Retry-After) instead of a long sleep."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def, override]
        if response is not None:
            wait = retry_after_seconds(response.headers.get("Retry-After"))  # urllib3's own caps it
            if wait is not None and wait > RETRY_AFTER_MAX_SECONDS:
                raise MaxRetryError(_pool, url or "", ResponseError(
                    f"Retry-After {wait:g} s is longer than a run waits ({RETRY_AFTER_MAX_SECONDS:g} s)"))
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def session(policy: HttpPolicy, retry_class: type[BoundedRetry] = BoundedRetry, **retry_options: Any) -> requests.Session:
    """A session whose every request retries per `policy`; `retry_options` adjust the Retry."""
    options: dict[str, Any] = {
        "total": policy.retries,
        "connect": policy.retries,
        "read": policy.retries,
        "status": policy.retries,
        "other": 0,
        "allowed_methods": None,  # POST too: a duplicate message is better than a lost one
        "status_forcelist": RETRY_STATUSES,
        "backoff_factor": policy.backoff_factor,
        "backoff_max": 30,
        "respect_retry_after_header": True,
        "retry_after_max": RETRY_AFTER_MAX_SECONDS,
        "raise_on_status": False,
        **retry_options,
    }
    http = requests.Session()
    adapter = HTTPAdapter(max_retries=retry_class(**options))
    http.mount("https://", adapter)
    http.mount("http://", adapter)
    return http


def post(
    http: requests.Session, url: str, policy: HttpPolicy, *, what: str, **kwargs: Any
) -> requests.Response:
    """POST and return a 2xx response, or raise HttpCallError naming `what` and the host only."""
    where = describe_url(url)
    try:
        response = http.post(url, timeout=policy.timeout, **kwargs)
    except requests.exceptions.RetryError:
        raise HttpCallError(f"{what} at {where}: gave up after {policy.retries} retries") from None
    except requests.exceptions.Timeout:
        raise HttpCallError(f"{what} at {where}: no answer within {policy.timeout:g} s") from None
    except requests.exceptions.SSLError:
        raise HttpCallError(f"{what} at {where}: TLS handshake failed (certificate not trusted?)") from None
    except requests.exceptions.ConnectionError as error:
        # urllib3 wraps a read timeout after the last retry in a connection error.
        reason = getattr(error.args[0], "reason", None) if error.args else None
        if isinstance(reason, ReadTimeoutError):
            raise HttpCallError(f"{what} at {where}: no answer within {policy.timeout:g} s") from None
        raise HttpCallError(f"{what} at {where}: connection failed") from None
    except requests.exceptions.RequestException as error:
        raise HttpCallError(f"{what} at {where}: {type(error).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise HttpCallError(
            f"{what} at {where}: HTTP {response.status_code} {response.reason or ''}".rstrip(),
            status=response.status_code,
            retry_after=response.headers.get("Retry-After"),
        )
    return response

