"""One way to make outbound HTTPS calls: a requests session with bounded timeouts and retries.

urllib3's Retry does the in-run retrying (429 with Retry-After, 5xx, connection errors), so no
channel or source writes its own loop. Errors are turned into messages that never contain the
URL: webhook URLs carry their signature in the query string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
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

    @property
    def worst_case_seconds(self) -> float:
        """An upper bound on one call with all its retries, used to size claim leases."""
        waits = sum(min(RETRY_AFTER_MAX_SECONDS, self.backoff_factor * 2**i) for i in range(self.retries))
        return (self.retries + 1) * self.timeout * 2 + waits + self.retries * RETRY_AFTER_MAX_SECONDS


def session(policy: HttpPolicy, statuses: frozenset[int] = RETRY_STATUSES) -> requests.Session:
    retry = Retry(
        total=policy.retries,
        connect=policy.retries,
        read=policy.retries,
        status=policy.retries,
        other=0,
        allowed_methods=None,  # POST too: a duplicate message is better than a lost one
        status_forcelist=statuses,
        backoff_factor=policy.backoff_factor,
        backoff_max=30,
        respect_retry_after_header=True,
        retry_after_max=RETRY_AFTER_MAX_SECONDS,
        raise_on_status=False,
    )
    http = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
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
    except requests.exceptions.ConnectionError:
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

