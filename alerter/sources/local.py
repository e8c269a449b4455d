"""QUERY_SOURCE=local: the detection's KQL, unchanged, run by duckdb-kql over local files.

One file per table in LOCAL_DATA_PATH: `<Table>.jsonl`, `.csv` or `.parquet` (an advanced
hunting CSV export works as it is). duckdb-kql approximates Kusto; production uses the service.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

import duckdb
import duckdb_kql

from alerter.links import device_link
from alerter.model import Detection, Link
from alerter.settings import Settings
from alerter.sources import QueryError, QueryResult

log = logging.getLogger(__name__)

READERS = {
    ".jsonl": "read_json_auto({path}, format='newline_delimited')",
    ".json": "read_json_auto({path})",
    ".csv": "read_csv_auto({path}, header=true)",
    ".parquet": "read_parquet({path})",
}
# Exports write Kusto datetimes with 7 fractional digits, which the CSV sniffer leaves as text.
DATETIME_COLUMN = re.compile(r"^(Timestamp|TimeGenerated)$|Time$")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LocalSource:
    def __init__(self, settings: Settings) -> None:
        if settings.local_data_path is None:
            raise QueryError("LOCAL_DATA_PATH is required for QUERY_SOURCE=local")
        self.folder = settings.local_data_path
        self.label = f"local:{self.folder.name or self.folder}"
        self._con: duckdb.DuckDBPyConnection | None = None

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """Load every table file once per run; later detections reuse the tables."""
        if self._con is not None:
            return self._con
        con = duckdb_kql.connect()
        tables: dict[str, Path] = {}
        for path in sorted(self.folder.iterdir()):
            reader = READERS.get(path.suffix.lower())
            if reader is None or not _TABLE_NAME.match(path.stem):
                continue
            if path.stem in tables:
                raise QueryError(f"LOCAL_DATA_PATH has two files for table {path.stem}: {tables[path.stem].name}, {path.name}")
            tables[path.stem] = path
            literal = "'" + str(path).replace("'", "''") + "'"
            try:
                con.execute(f'CREATE TABLE "{path.stem}" AS SELECT * FROM {reader.format(path=literal)}')
                self._fix_text_datetimes(con, path.stem, path.name)
            except duckdb.Error as error:
                raise QueryError(f"LOCAL_DATA_PATH file {path.name} cannot be read: {error}") from None
        self._con = con
        return con

    @staticmethod
    def _fix_text_datetimes(con: duckdb.DuckDBPyConnection, table: str, file_name: str) -> None:
        columns = con.execute(f'DESCRIBE "{table}"').fetchall()
        for name, column_type, *_ in columns:
            if column_type != "VARCHAR" or not DATETIME_COLUMN.search(name):
                continue
            as_time = f'try_cast(regexp_replace("{name}", \'(\\.\\d{{6}})\\d+\', \'\\1\') AS TIMESTAMPTZ)'
            # A value that does not read as a time would become NULL and fall out of every time
            # window without a word: refuse the file instead, naming an example.
            unreadable = con.execute(
                f'SELECT "{name}" FROM "{table}" WHERE "{name}" IS NOT NULL AND "{name}" <> \'\' '
                f"AND {as_time} IS NULL LIMIT 1"
            ).fetchone()
            if unreadable:
                raise QueryError(
                    f"LOCAL_DATA_PATH file {file_name}: column {name} holds {unreadable[0][:40]!r}, which is not "
                    "an ISO 8601 time (export times as ISO 8601, e.g. 2026-05-31T10:30:00Z)"
                )
            con.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{name}" TYPE TIMESTAMPTZ USING {as_time}')

    def query(self, detection: Detection, now: datetime) -> QueryResult:
        con = self._connection()
        try:
            cursor = duckdb_kql.execute(con, detection.query, query_now=now)
            columns = [d[0] for d in cursor.description]
            rows = [dict(zip(columns, values)) for values in cursor.fetchall()]
        except duckdb_kql.KqlError as error:
            raise QueryError(f"the KQL could not be translated: {error}") from None
        except duckdb.CatalogException as error:
            raise QueryError(f"{error} (LOCAL_DATA_PATH needs one file per table, e.g. <Table>.jsonl)") from None
        except duckdb.Error as error:
            raise QueryError(f"the query failed: {error}") from None
        return QueryResult(batches=[(self.label, rows)])

    def links(self, detection: Detection, device_id: str) -> list[Link]:
        """The Defender device page only: a replayed export's DeviceIds are Defender's, but which
        portal workspace the data came from is unknown here."""
        link = device_link(device_id)
        return [link] if link is not None else []

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
