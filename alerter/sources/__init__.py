"""Where a detection's KQL runs. One small interface, one registry from QUERY_SOURCE to class.

Sources know detections and settings; they never see the ledger or a notifier.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from alerter.model import Detection, Link
from alerter.settings import Settings

Row = dict[str, Any]


class QueryError(Exception):
    """The detection's query did not run. The message is safe to log and names the cause."""


@dataclass
class QueryResult:
    """Rows by where they came from (a workspace, a tenant, a local folder)."""

    batches: list[tuple[str, list[Row]]] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    """Why these rows may not be all there is (partial error, a row or size limit)."""


class Source(Protocol):
    def query(self, detection: Detection, now: datetime) -> QueryResult:
        """Run the detection's KQL unchanged. `now` is the run's clock (pinned by --now)."""
        ...

    def links(self, detection: Detection, device_id: str) -> list[Link]:
        """Investigation links for one device, built from trusted parts only."""
        ...

    def close(self) -> None: ...


# Setting value -> "module:Class"; imported on use so that Azure never loads the local engine.
SOURCES: dict[str, str] = {
    "local": "alerter.sources.local:LocalSource",
    "log_analytics": "alerter.sources.log_analytics:LogAnalyticsSource",
    "defender": "alerter.sources.defender:DefenderSource",
}


def create_source(settings: Settings) -> Source:
    module_name, _, class_name = SOURCES[settings.query_source].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise QueryError(
            f"QUERY_SOURCE={settings.query_source} needs a package that is not installed ({error.name}); "
            "install requirements-dev.txt for the local source"
        ) from None
    source_class = getattr(module, class_name)
    return source_class(settings)
