"""Shared fixtures: real servers on loopback, settings for a scratch deployment, the sample data."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alerter.settings import Settings  # noqa: E402
from tests.support.http_server import RecordingServer  # noqa: E402

# Real parts started per session: the managed-identity endpoint and Azurite (Table Storage).
pytest_plugins = ["tests.support.identity", "tests.support.azurite"]

DEMO_NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
PANORAMA9_ID = "7a706363-95d0-4c85-9a65-f4a4463d09cf"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def trust_ca(ca_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trust the test CA the standard way (REQUESTS_CA_BUNDLE), as an operator would."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))
    return ca_bundle


@pytest.fixture
def webhook_server() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


@pytest.fixture
def https_server(ca: trustme.CA, trust_ca: Path) -> Iterator[RecordingServer]:
    with RecordingServer(ca=ca) as server:
        yield server


def write_rows(folder: Path, rows: list[dict[str, Any]], table: str = "DeviceFileCertificateInfo") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{table}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def cert_row(device_id: str, name: str, when: str, signer: str = "Panorama9, Inc.", report: int = 1) -> dict[str, Any]:
    return {"Timestamp": when, "DeviceId": device_id, "DeviceName": name, "Signer": signer, "ReportId": report}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def ledger_values(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings for the ledger the test runs on (the fixture's param; SQLite when unparametrized):
    Table Storage goes through a real Azurite, a fresh table per test."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return {"STATE_STORE": "sqlite", "STATE_PATH": str(tmp_path / "state.db")}
    return dict(request.getfixturevalue("table_state_values"))


# The same behaviour must hold on each store: by default every test that reads settings runs on both.
state_values = pytest.fixture(params=["sqlite", "table"], name="state_values")(ledger_values)

sqlite_unless_asked = pytest.fixture(name="state_values")(ledger_values)
"""For modules whose tests send or query but do not exercise the ledger: `from tests.conftest
import sqlite_unless_asked` makes their `state_values` SQLite, unless a test is BOTH_STORES."""

BOTH_STORES = pytest.mark.parametrize("state_values", ["sqlite", "table"], indirect=True)


@pytest.fixture
def make_settings(data_dir: Path, state_values: dict[str, str]):
    """Settings for a scratch deployment: local source over data_dir, the store under test."""

    def build(**overrides: str) -> Settings:
        values = {
            "QUERY_SOURCE": "local",
            "LOCAL_DATA_PATH": str(data_dir),
            "DETECTIONS_PATH": str(ROOT / "detections"),
            "HTTP_TIMEOUT": "2",
            "HTTP_RETRIES": "1",
            **state_values,
            **overrides,
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        return Settings.load(environ={k: v for k, v in values.items() if v is not None})

    return build
