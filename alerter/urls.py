"""URL rules shared by every outbound call: https only, except loopback for development."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost"}


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str) -> str | None:
    """Why this URL may not be used, or None. Never echoes the URL (it may carry a signature)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL"
    if parts.scheme == "http" and not is_loopback_host(host):
        return "must use https:// (plain http:// is allowed only for localhost and 127.0.0.0/8)"
    return None


def describe_url(url: str) -> str:
    """The part of a URL that is safe to log: scheme and host, never path or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme}://{host}{port}/…"
