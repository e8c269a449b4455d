"""Benchmark: the Table Storage ledger on Azurite, 10,000 devices, one detection, a local webhook sink.

Three cycles over the same query result (local source, the real azure-data-tables client, a
real Azurite started here on a free loopback port):

1. first run: every device is new (written in transactions of 100, claimed, sent, marked);
2. steady-state rerun: every device is known (the known set read with one paged query);
3. naive rerun: the same rerun with the known set looked up with one request per device, the way
   a ledger without a partition design would (written here only, for the comparison).

The steady-state rerun must be at least 5 times faster than the naive one (issue 5); the script
exits 1 if it is not.

    python bench/table_bench.py [--devices 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.core.exceptions import ResourceNotFoundError  # noqa: E402

from alerter import ledger  # noqa: E402
from alerter.cycle import run_cycle  # noqa: E402
from alerter.ledger import KnownDevice  # noqa: E402
from alerter.ledger.table import LAST_SENT, STATUSES, TableStore, known_device, table_key  # noqa: E402
from alerter.model import RunReport  # noqa: E402
from alerter.settings import Settings  # noqa: E402
from tests.support.azurite import AzuriteServer  # noqa: E402
from tests.support.http_server import RecordingServer  # noqa: E402

NOW = datetime(2026, 5, 31, 11, 0, tzinfo=timezone.utc)
RATIO_REQUIRED = 5.0


class CountingTableStore(TableStore):
    """The real store; remembers how many requests each opened instance sent, and where."""

    opened: ClassVar[list[CountingTableStore]] = []

    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        super().__init__(settings, read_only=read_only)
        self.known_seconds = 0.0
        self.known_requests = 0
        CountingTableStore.opened.append(self)

    def known(self, detection_id: str) -> dict[str, KnownDevice]:
        started, before = time.perf_counter(), self.request_count
        try:
            return self._known(detection_id)
        finally:
            self.known_seconds += time.perf_counter() - started
            self.known_requests += self.request_count - before

    def _known(self, detection_id: str) -> dict[str, KnownDevice]:
        return super().known(detection_id)


class NaiveTableStore(CountingTableStore):
    """The comparison: the known set looked up one device at a time (a GET per device in the
    query result), instead of one paged partition query."""

    lookup_keys: ClassVar[list[str]] = []

    def _known(self, detection_id: str) -> dict[str, KnownDevice]:
        partition, _ = table_key(detection_id)
        found: dict[str, KnownDevice] = {}
        for key in self.lookup_keys:
            try:
                entity = self._table.get_entity(partition, table_key(key)[0], select=[STATUSES, LAST_SENT])
            except ResourceNotFoundError:
                continue
            found[key] = known_device(key, entity)
        return found


def write_dataset(folder: Path, devices: int) -> list[str]:
    """One matching row per device, plus a row another signer wrote (filtered out by the query)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    with (folder / "DeviceFileCertificateInfo.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(devices):
            device_id = f"{i:08x}{'b3f1c2d4' * 4}"
            keys.append(device_id)
            for signer, minute in (("Panorama9, Inc.", i % 60), ("Microsoft Corporation", 0)):
                handle.write(json.dumps({
                    "Timestamp": f"2026-05-30T09:{minute:02d}:00Z", "DeviceId": device_id,
                    "DeviceName": f"ws-{i:05d}.contoso.local", "Signer": signer, "ReportId": i,
                }) + "\n")
    return keys


BENCH_STORES = {"table_counting": "CountingTableStore", "table_naive": "NaiveTableStore"}
"""Registered beside the real stores for this process only: the cycle picks them by name."""


def timed_cycle(settings: Settings, store_name: str) -> tuple[float, RunReport, CountingTableStore]:
    for name, class_name in BENCH_STORES.items():
        ledger.STORES[name] = f"{__name__}:{class_name}"
    before = len(CountingTableStore.opened)
    started = time.perf_counter()
    report = run_cycle(replace(settings, state_store=store_name), now=NOW)
    seconds = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(f"the {store_name} cycle failed: {report.problems or report.detections}")
    [store] = CountingTableStore.opened[before:]
    return seconds, report, store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="alerter-table-bench-") as scratch, AzuriteServer() as azurite, \
            RecordingServer() as sink:
        keys = write_dataset(Path(scratch) / "data", args.devices)
        NaiveTableStore.lookup_keys = keys
        settings = Settings.load(environ={
            "QUERY_SOURCE": "local", "LOCAL_DATA_PATH": str(Path(scratch) / "data"),
            "DETECTIONS_PATH": str(ROOT / "detections"), "STATE_STORE": "table",
            "STATE_CONNECTION": azurite.connection_string, "STATE_TABLE_NAME": "bench",
            "WEBHOOK_URL": sink.url + "/hook",
        })

        first_s, first, first_store = timed_cycle(settings, "table_counting")
        posts = len(sink.requests)
        delivered = sum(len(r.json()["sightings"]) for r in sink.requests)
        assert first.detections[0].new == args.devices and delivered == args.devices, (first.detections, delivered)

        steady_s, steady, steady_store = timed_cycle(settings, "table_counting")
        naive_s, naive, naive_store = timed_cycle(settings, "table_naive")
        for report in (steady, naive):
            assert report.detections[0].new == 0 and report.detections[0].known == args.devices
        assert len(sink.requests) == posts, "a rerun must send nothing"

    ratio = naive_s / steady_s
    rows: list[tuple[str, float, Any]] = [
        ("first run", first_s, first_store),
        ("steady rerun", steady_s, steady_store),
        ("naive rerun", naive_s, naive_store),
    ]
    print(f"Table Storage ledger on Azurite, {args.devices:,} devices, one detection, webhook sink")
    for label, seconds, store in rows:
        print(f"{label + ':':15} {seconds:7.2f} s  {store.request_count:6,} Table requests  "
              f"(known set: {store.known_seconds:6.2f} s, {store.known_requests:,} requests)")
    print(f"first run delivered {delivered:,} sightings in {posts} webhook POSTs; the reruns sent nothing")
    print(f"naive / steady: {ratio:.1f}x (required: at least {RATIO_REQUIRED:g}x) -> "
          f"{'OK' if ratio >= RATIO_REQUIRED else 'TOO SLOW'}")
    return 0 if ratio >= RATIO_REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
