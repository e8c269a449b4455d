"""What only the Table Storage ledger has to prove: keys, batching, conflicts, durability, outages,
identity-based access. Real Azurite, the real azure-data-tables client; the contract itself is in
test_ledger_contract.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from azure.data.tables import TableClient

from alerter.cycle import run_cycle
from alerter.ledger import LEASE_SECONDS, LedgerError, open_store
from alerter.ledger.table import (
    BATCH_MAX,
    HASHED,
    KEY_BYTES_MAX,
    PART_CHARS,
    TableStore,
    escape_key,
    table_key,
    unescape_key,
)
from alerter.model import Sighting
from alerter.settings import Settings
from tests.support.azurite import ACCOUNT_KEY, AzuriteServer, TcpProxy, connection_string, wall_clock_ahead
from tests.support.http_server import Recorded, RecordingServer, Reply

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
DET = "7a706363-95d0-4c85-9a65-f4a4463d09cf"
FORBIDDEN = set("/\\#?") | {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)}


def sighting(key: str, name: str | None = None, **changes: Any) -> Sighting:
    name = f"host-{key[:20]}" if name is None else name
    return replace(Sighting(key, key, name, NOW - timedelta(days=1), NOW, 1, [1], "local:t", [name]), **changes)


def table_settings(connection: str, table: str, **changes: Any) -> Settings:
    return Settings(state_store="table", state_connection=connection, state_table_name=table,
                    http_retries=0, http_timeout=5, **changes)


@pytest.fixture
def settings(table_state_values: dict[str, str]) -> Settings:
    return table_settings(table_state_values["STATE_CONNECTION"], table_state_values["STATE_TABLE_NAME"])


@pytest.fixture
def store(settings: Settings) -> Iterator[TableStore]:
    opened = open_store(settings)
    assert isinstance(opened, TableStore)
    yield opened
    opened.close()


@pytest.fixture
def raw_table(settings: Settings, store: TableStore) -> Iterator[TableClient]:
    """The same table through the SDK alone: what an operator sees in Storage Explorer."""
    assert settings.state_connection
    client = TableClient.from_connection_string(settings.state_connection, settings.state_table_name)
    yield client
    client.close()


# --- keys -------------------------------------------------------------------------------------

HOSTILE_KEYS = [
    "plain-host.contoso.local", "a/b", "a\\b", "a#b", "a?b", "50%", "it's", "bang!", "!2F", "%2F", "!u0041",
    "\x00", "\t\r\n", "\x7f\x80\x9f", "\u202eevil", "主机", "🖥", "\ud800lone", "trailing ", "",
]


def test_escaping_is_reversible_and_leaves_no_forbidden_character() -> None:
    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x00, 0x250)] + ["🖥", "\ud800", "\udfff", "\ufffe", "!", "%", "'"]
    samples = HOSTILE_KEYS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2_000)]
    for text in samples:
        escaped = escape_key(text)
        assert unescape_key(escaped) == text
        assert not FORBIDDEN & set(escaped), repr(text)
        assert "%" not in escaped and "'" not in escaped
        escaped.encode("utf-8")  # no lone surrogate left: the wire is UTF-8
    assert escape_key("fin-ws-0142.contoso.local") == "fin-ws-0142.contoso.local"
    assert escape_key("corp/fin-ws#1?") == "corp!2Ffin-ws!231!3F"
    assert escape_key("100%!") == "100!25!21"


def test_keys_too_long_are_hashed_within_the_limit_and_stay_distinct() -> None:
    base = "p" * 600
    one, hashed = table_key(base + "-one")
    two, _ = table_key(base + "-two")
    assert hashed and one != two and HASHED in one and one.startswith("p" * 100)
    for text in ("x" * 512, "é" * 512, "🖥" * 256, "/" * 200, "🖥" * 10_000, "/" * 5_000):
        key, _ = table_key(text)
        assert len(key.encode("utf-16-le")) <= KEY_BYTES_MAX
    assert table_key("x" * 512) == ("x" * 512, False)  # exactly 1 KiB is still a plain key
    assert table_key("/" * 170)[1] is False and table_key("/" * 171)[1] is True  # escaped: 510 vs 513 units


def test_keys_are_stored_escaped_and_read_back_exactly(store: TableStore, raw_table: TableClient) -> None:
    keys = HOSTILE_KEYS + ["k" * 600, "🖥" * 300]
    assert sorted(store.add_new(DET, [sighting(k) for k in keys], ["webhook"], NOW)) == sorted(keys)
    stored = {e["RowKey"]: e for e in raw_table.list_entities()}
    assert "a!2Fb" in stored and "it!27s" in stored and "plain-host.contoso.local" in stored
    assert {e["PartitionKey"] for e in stored.values()} == {DET}
    for row_key in stored:
        assert not FORBIDDEN & set(row_key)
        assert len(row_key.encode("utf-16-le")) <= KEY_BYTES_MAX
    assert sorted(store.known(DET)) == sorted(keys)
    assert sorted(d.device_key for d in store.due("webhook", NOW)) == sorted(keys)
    assert store.add_new(DET, [sighting(k) for k in keys], ["webhook"], NOW) == []
    for key in keys:
        assert store.forget(DET, key), repr(key)
    assert list(raw_table.list_entities()) == []


# --- sizes ------------------------------------------------------------------------------------


def test_a_hostile_name_of_thousands_of_characters_is_kept_whole(store: TableStore) -> None:
    name = ("\u202e<img src=x onerror=alert(1)>\x00" + "名" * 40 + "🖥") * 60  # ~4,000 chars, ~20 KB as JSON
    assert len(name) > 3_000
    store.add_new(DET, [sighting("dev-1", name, device_names=[name, name[::-1]])], ["webhook"], NOW)
    [due] = store.due("webhook", NOW)
    assert due.sighting.device_name == name and due.sighting.device_names == [name, name[::-1]]


def test_a_sighting_larger_than_an_entity_is_trimmed_not_lost(store: TableStore, raw_table: TableClient) -> None:
    names = [f"{i:04d}" + "名" * 3_000 for i in range(300)]  # ~5.4 MB as JSON: far beyond 1 MiB
    huge = sighting("dev-huge", names[0], device_names=names, report_ids=list(range(150)))
    assert store.add_new(DET, [huge, sighting("dev-small")], ["webhook"], NOW) == ["dev-huge", "dev-small"]
    entity = raw_table.get_entity(DET, "dev-huge")
    assert entity["sighting_parts"] > 1
    assert all(len(v) <= PART_CHARS for v in entity.values() if isinstance(v, str))
    [record] = [r for r in store.records(DET) if r.sighting.device_key == "dev-huge"]
    kept = record.sighting
    assert kept.device_name == names[0], "the display name survives whole"
    assert 1 <= len(kept.device_names) < len(names) and kept.device_names[0].startswith("0000")
    assert kept.device_id == "dev-huge"
    assert kept.report_ids == list(range(150)) and kept.links == huge.links, "ours, not the attacker's: kept whole"
    assert len(store.due("webhook", NOW)) == 2


# --- batching and paging ----------------------------------------------------------------------


class TransactionSpy:
    """Wraps the SDK client's submit_transaction: records each transaction's size, then sends it."""

    def __init__(self, store: TableStore) -> None:
        self.sizes: list[int] = []
        self._submit = store._table.submit_transaction
        store._table.submit_transaction = self  # type: ignore[method-assign]

    def __call__(self, operations: Any, **kwargs: Any) -> Any:
        operations = list(operations)
        self.sizes.append(len(operations))
        return self._submit(operations, **kwargs)


def test_new_devices_are_written_in_transactions_of_at_most_100(store: TableStore) -> None:
    spy = TransactionSpy(store)
    keys = [f"dev-{i:04d}" for i in range(250)]
    before = store.request_count
    assert sorted(store.add_new(DET, [sighting(k) for k in keys], ["webhook", "teams"], NOW)) == keys
    assert spy.sizes == [100, 100, 50]
    assert store.request_count - before == 3

    # The rest of a cycle is batched too: a paged read, then one transaction per 100 changes.
    before = store.request_count
    due = store.due("webhook", NOW)
    assert len(due) == 250 and store.request_count - before == 1
    claimed = store.claim(due, "run", 60)
    store.mark_sent(claimed, NOW)
    assert len(claimed) == 250
    assert spy.sizes[3:] == [100, 100, 50, 100, 100, 50]
    assert store.request_count - before == 1 + 6
    assert max(spy.sizes) <= BATCH_MAX


def test_large_sightings_are_batched_under_the_4_mib_transaction_limit(store: TableStore) -> None:
    names = ["名" * 3_000 + f"-{i}" for i in range(20)]  # ~380,000 characters of JSON per sighting
    spy = TransactionSpy(store)
    big = [sighting(f"big-{i:02d}", names[0], device_names=names) for i in range(12)]
    assert sorted(store.add_new(DET, big, ["webhook"], NOW)) == [s.device_key for s in big]
    assert len(spy.sizes) > 1 and sum(spy.sizes) == 12  # one transaction would be ~5 MB: refused (413)

    store.mark_sent(store.claim(store.due("webhook", NOW), "run", 60), NOW)  # the entities are cached now
    later = NOW + timedelta(days=31)
    fresh = [replace(s, device_names=list(reversed(names)), realert=True) for s in big]
    before = len(spy.sizes)
    assert store.requeue(DET, fresh, ["webhook"], later) == 12
    assert len(spy.sizes) - before > 1 and sum(spy.sizes[before:]) == 12
    due = store.due("webhook", later)
    assert len(due) == 12 and all(d.sighting.device_names == list(reversed(names)) for d in due)


def test_the_known_set_is_one_paged_query_not_a_request_per_device(store: TableStore) -> None:
    store.add_new(DET, [sighting(f"dev-{i:04d}") for i in range(250)], ["webhook"], NOW)
    before = store.request_count
    assert len(store.known(DET)) == 250
    assert store.request_count - before == 1
    store.page_size = 100
    before = store.request_count
    assert len(store.known(DET)) == 250
    assert store.request_count - before == 3  # pages of 100, continuation tokens followed


def test_a_transaction_that_conflicts_halfway_still_creates_all_the_others_once(
    settings: Settings, store: TableStore
) -> None:
    keys = [f"dev-{i:03d}" for i in range(100)]
    other_run = open_store(settings)
    try:
        taken = sighting(keys[50], "created by the other run")
        assert other_run.add_new(DET, [taken], ["webhook"], NOW - timedelta(minutes=5)) == [keys[50]]
    finally:
        other_run.close()
    spy = TransactionSpy(store)
    created = store.add_new(DET, [sighting(k) for k in keys], ["webhook"], NOW)
    assert spy.sizes == [100], "one transaction was tried and rolled back"
    assert created == keys[:50] + keys[51:]
    records = {r.sighting.device_key: r for r in store.records(DET)}
    assert sorted(records) == keys
    assert records[keys[50]].sighting.device_name == "created by the other run"
    assert records[keys[50]].first_reported_at == NOW - timedelta(minutes=5)
    assert store.counts() == {"webhook": {"pending": 100}}


# --- durability, outages ----------------------------------------------------------------------


def cert_rows(count: int, prefix: str = "dev") -> list[dict[str, Any]]:
    return [
        {"Timestamp": "2026-05-30T09:00:00Z", "DeviceId": f"{prefix}-{i:04d}", "DeviceName": f"{prefix}-{i:04d}.corp",
         "Signer": "Panorama9, Inc.", "ReportId": i}
        for i in range(count)
    ]


def write_data(folder: Path, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "DeviceFileCertificateInfo.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    return folder


def run_values(data: Path, webhook_url: str) -> dict[str, str]:
    return {
        "QUERY_SOURCE": "local",
        "LOCAL_DATA_PATH": str(data),
        "DETECTIONS_PATH": str(ROOT / "detections"),
        "WEBHOOK_URL": webhook_url,
        "HTTP_TIMEOUT": "5",
        "HTTP_RETRIES": "0",
    }


def delivered(server: RecordingServer) -> list[str]:
    return [s["deviceId"] for r in server.requests if r.method == "POST" for s in r.json()["sightings"]]


def test_the_ledger_survives_an_azurite_restart(azurite_on_disk: AzuriteServer, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", cert_rows(3))
    with RecordingServer() as hook:
        values = {**run_values(data, hook.url + "/hook"), "STATE_STORE": "table",
                  "STATE_CONNECTION": azurite_on_disk.connection_string, "STATE_TABLE_NAME": "durable"}
        settings = Settings.load(environ=values)
        first = run_cycle(settings, now=NOW)
        assert first.ok and first.detections[0].new == 3
        assert sorted(delivered(hook)) == ["dev-0000", "dev-0001", "dev-0002"]

        azurite_on_disk.restart()  # stopped (SIGINT: it saves and exits), started again on the same folder and port

        second = run_cycle(settings, now=NOW + timedelta(hours=4))
        assert second.ok and second.detections[0].new == 0 and second.detections[0].known == 3
        assert len(hook.requests) == 1, "nothing was sent twice"
    store = open_store(settings)
    try:
        assert store.counts() == {"webhook": {"sent": 3}}
    finally:
        store.close()


def test_unreachable_storage_is_a_ledger_error_that_names_the_endpoint_not_the_key(
    azurite: AzuriteServer, azurite_table: str
) -> None:
    proxy = TcpProxy(azurite.port)  # never started: nothing listens on its port
    settings = table_settings(connection_string(proxy.port), azurite_table)
    with pytest.raises(LedgerError) as caught:
        open_store(settings)
    message = str(caught.value)
    assert f"127.0.0.1:{proxy.port}" in message and "STATE_CONNECTION" in message and "cannot connect" in message
    assert ACCOUNT_KEY not in message and ACCOUNT_KEY[:12] not in message

    with proxy:  # reachable at open, gone at the next call
        store = open_store(settings)
        proxy.down()
        with pytest.raises(LedgerError, match="cannot connect|connection broke"):
            store.known(DET)
        store.close()

    with pytest.raises(LedgerError, match="not a storage connection string"):
        open_store(table_settings("AccountName=x;" + "Nonsense", azurite_table))


def run_cli(settings_file: Path, *args: str, later: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m alerter ...` as the timer runs it; `later`: with the wall clock a lease ahead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATE_", "AzureWebJobs", "WEBHOOK"))}
    if later is not None:
        env = wall_clock_ahead(later, LEASE_SECONDS + 30, env)
    return subprocess.run(
        [sys.executable, "-m", "alerter", *args, "--settings", str(settings_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_a_run_without_storage_fails_loudly_sends_nothing_and_the_next_run_catches_up(
    azurite: AzuriteServer, azurite_table: str, tmp_path: Path
) -> None:
    data = write_data(tmp_path / "data", cert_rows(3))
    proxy = TcpProxy(azurite.port)
    with RecordingServer() as hook:
        values = {**run_values(data, hook.url + "/hook"), "STATE_STORE": "table",
                  "STATE_CONNECTION": connection_string(proxy.port), "STATE_TABLE_NAME": azurite_table}
        settings_file = tmp_path / "local.settings.json"
        settings_file.write_text(json.dumps({"Values": values}), encoding="utf-8")

        down = run_cli(settings_file, "run", "--now", NOW.isoformat())
        assert down.returncode == 1, down.stdout + down.stderr
        assert f"127.0.0.1:{proxy.port}" in down.stdout + down.stderr
        assert ACCOUNT_KEY not in down.stdout + down.stderr
        assert hook.requests == [], "nothing is sent that cannot be recorded"

        # The storage goes away while a message is on the wire: it was received, but the run
        # cannot record it, fails, and the next run sends it again (at least once, never lost).
        hook.responder = lambda request: (proxy.down(), Reply(200))[1]
        proxy.up()
        mid = run_cli(settings_file, "run", "--now", NOW.isoformat())
        assert mid.returncode == 1, mid.stdout + mid.stderr
        assert sorted(delivered(hook)) == ["dev-0000", "dev-0001", "dev-0002"]

        hook.responder = None
        proxy.up()
        try:
            # The failed run still holds its claims (nothing could release them) until the lease
            # runs out: the next run is the one after that.
            held = run_cli(settings_file, "run", "--now", NOW.isoformat())
            assert held.returncode == 0 and len(hook.requests) == 1, "a live lease is respected"
            caught_up = run_cli(settings_file, "run", "--now", NOW.isoformat(), later=tmp_path / "later")
            assert caught_up.returncode == 0, caught_up.stdout + caught_up.stderr
            assert sorted(delivered(hook)) == ["dev-0000", "dev-0000", "dev-0001", "dev-0001", "dev-0002", "dev-0002"]
            quiet = run_cli(settings_file, "run", "--now", NOW.isoformat())
            assert quiet.returncode == 0 and len(hook.requests) == 2, "the last run has nothing left to send"
            listing = run_cli(settings_file, "state", "list", "--json")
            assert {d["deviceId"]: d["deliveries"]["webhook"]["status"] for d in json.loads(listing.stdout)} == {
                "dev-0000": "sent", "dev-0001": "sent", "dev-0002": "sent",
            }
        finally:
            proxy.down()


# --- identity-based access --------------------------------------------------------------------

STORAGE_AUDIENCE = "https://storage.azure.com"


def fake_table_service(managed_identity: Any) -> Any:
    """Answers the two calls a store makes first (create table, query a partition) the way the
    service does, for requests that carry the token the managed identity issued for Storage."""

    def answer(request: Recorded) -> Reply:
        if not managed_identity.authorized(request, STORAGE_AUDIENCE):
            return Reply(403, {"odata.error": {"code": "AuthorizationFailure", "message": {"value": "no"}}})
        if request.method == "POST" and request.path.endswith("/Tables"):
            return Reply(409, {"odata.error": {"code": "TableAlreadyExists", "message": {"value": "exists"}}},
                         {"x-ms-error-code": "TableAlreadyExists"})
        if request.method == "GET" and "alerterstate()" in request.path:
            return Reply(200, {"value": []}, {"Content-Type": "application/json;odata=minimalmetadata"})
        return Reply(400, {"odata.error": {"code": "InvalidInput", "message": {"value": request.path}}})

    return answer


def test_identity_based_access_uses_the_managed_identity_token_for_storage(
    managed_identity: Any, https_server: RecordingServer
) -> None:
    https_server.responder = fake_table_service(managed_identity)
    endpoint = https_server.url + "/devstoreaccount1"
    settings = Settings.load(environ={"STATE_TABLE_ENDPOINT": endpoint, "QUERY_SOURCE": "local",
                                      "LOCAL_DATA_PATH": str(ROOT), "DETECTIONS_PATH": str(ROOT / "detections"),
                                      "HTTP_RETRIES": "0"})
    assert settings.state_store == "table" and settings.state_connection is None
    store = open_store(settings)
    try:
        assert store.known(DET) == {}
    finally:
        store.close()
    assert managed_identity.resources() and set(managed_identity.resources()) == {STORAGE_AUDIENCE}
    assert [r.method for r in https_server.requests] == ["POST", "GET"]
    assert all(managed_identity.authorized(r, STORAGE_AUDIENCE) for r in https_server.requests)


def test_identity_refused_is_a_ledger_error_without_secrets(
    managed_identity: Any, https_server: RecordingServer
) -> None:
    managed_identity.refuse = 400
    https_server.responder = fake_table_service(managed_identity)
    settings = Settings(state_store="table", state_table_endpoint=https_server.url + "/devstoreaccount1",
                        http_retries=0, http_timeout=5)
    with pytest.raises(LedgerError) as caught:
        open_store(settings)
    message = str(caught.value)
    assert "STATE_TABLE_ENDPOINT" in message and https_server.url.split("//")[1] in message
    assert "DefaultAzureCredential" in message
    assert not any(secret in message for secret in managed_identity.secret_values)
    assert https_server.requests == [], "no request goes out without a token"
