"""The generated RMM catalog (detections/rmm) and its generator (tools/generate_rmm_catalog.py).

Everything here runs the real parts: the committed YAML files, PyYAML, duckdb-kql's
validator and its DuckDB execution, and the generator as a subprocess. The per-vendor
tests read each vendor's signer terms back from the committed query, so they need no
table; the tests that compare against the table skip when ../shared/data is absent.

Kusto versus duckdb-kql, as far as these tests rely on it:

* `has` / `has_any` are whole-term, case-insensitive matches in both. duckdb-kql requires a
  term boundary at an edge of the needle only when the needle's character there is a
  letter or digit, so 'Projector.is, Inc.' also matches 'Projector.is, Inc.x'. That
  follows Kusto's definition (terms are maximal runs of alphanumeric characters).
* Which non-ASCII characters count as "alphanumeric" for Kusto's term breaking is not
  documented; duckdb-kql counts every Unicode letter and digit. Two terms end in or
  contain non-ASCII letters ('DWSNET OÜ', 'Krämer IT Solutions GmbH'). The realistic
  signer strings match the same way either way, so the tests assert them; what they do
  NOT assert is a "glued letter" near miss at a non-ASCII edge (e.g. 'DWSNET OÜx'), or
  case folding of non-ASCII letters ('ü' vs 'Ü'), where the two engines might differ.
  The case-variant rows therefore upper-case ASCII letters only.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import duckdb_kql
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "detections" / "rmm"
GENERATOR = REPO / "tools" / "generate_rmm_catalog.py"
TABLE = REPO.parent / "shared" / "data" / "rmm_signers.tsv"
SEED_FILE = REPO / "detections" / "panorama9-filesig.yaml"
SEED_ID = "7a706363-95d0-4c85-9a65-f4a4463d09cf"
QUERY_NOW = dt.datetime(2026, 5, 31, 11, 0, tzinfo=dt.timezone.utc)
FIELD_ORDER = [
    "id", "name", "description", "requiredDataConnectors",
    "tactics", "relevantTechniques", "query",
]
NAME_RE = re.compile(r"^Remote Management and Monitoring tool - (.+) - File Signature$")
SIGNER_LINE_RE = re.compile(r"^\| where Signer (has|has_any) (.+)$", re.MULTILINE)
KQL_LITERAL_RE = re.compile(r"'((?:[^'\\]|\\.)*)'")

needs_table = pytest.mark.skipif(
    not TABLE.is_file(), reason=f"the signer table {TABLE} is not available here"
)


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_rmm_catalog", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _catalog_files() -> list[Path]:
    return sorted(CATALOG.glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        doc = yaml.safe_load(handle)
    assert isinstance(doc, dict), f"{path.name}: not a YAML mapping"
    return doc


def _try_load(path: Path) -> dict[str, Any] | None:
    """Collection must survive a broken file; the per-file tests then report it."""
    try:
        return _load(path)
    except (AssertionError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _vendor(doc: dict[str, Any] | None) -> str | None:
    name = doc.get("name") if doc else None
    match = NAME_RE.match(name) if isinstance(name, str) else None
    return match.group(1) if match else None


def _unquote(literal_body: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal_body)


def signer_condition(query: str) -> tuple[str, list[str]] | None:
    """The operator and terms of the query's `| where Signer ...` line, or None when the
    line is missing, repeated, or not in the generator's exact form."""
    found = SIGNER_LINE_RE.findall(query)
    if len(found) != 1:
        return None
    operator, rhs = found[0]
    terms = [_unquote(m) for m in KQL_LITERAL_RE.findall(rhs)]
    rebuilt = ", ".join(gen.kql_string(t) for t in terms)
    if operator == "has" and len(terms) == 1 and rhs == rebuilt:
        return operator, terms
    if operator == "has_any" and terms and rhs == f"({rebuilt})":
        return operator, terms
    return None


def _ascii_upper(text: str) -> str:
    return "".join(ch.upper() if ch.isascii() else ch for ch in text)


def _ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


CATALOG_FILES = _catalog_files()
LOADED = {path.name: _try_load(path) for path in CATALOG_FILES}
#: vendor -> signer terms, read back from each committed query that parses.
VENDOR_TERMS: dict[str, list[str]] = {}
for _loaded in LOADED.values():
    _name = _vendor(_loaded)
    _condition = signer_condition(_loaded["query"]) if _loaded and isinstance(
        _loaded.get("query"), str) else None
    if _name and _condition:
        VENDOR_TERMS[_name] = _condition[1]


def _doc(path: Path) -> dict[str, Any]:
    doc = LOADED[path.name]
    if doc is None:
        _load(path)  # raises with the YAML error or the reason
    assert doc is not None
    return doc


# --- the committed files -------------------------------------------------------------


def test_catalog_is_present() -> None:
    assert len(CATALOG_FILES) >= 50, f"only {len(CATALOG_FILES)} files in {CATALOG}"
    assert (CATALOG / "README.md").is_file()


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_file_has_the_seed_format(path: Path) -> None:
    doc = _doc(path)
    assert list(doc) == FIELD_ORDER
    assert str(uuid.UUID(doc["id"])) == doc["id"]
    assert doc["id"] != SEED_ID
    match = NAME_RE.match(doc["name"])
    assert match, doc["name"]
    vendor = match.group(1)
    assert path.name == gen.slugify(vendor) + "-filesig.yaml"
    assert vendor.casefold() != "panorama9"
    assert doc["requiredDataConnectors"] == [
        {"connectorId": "MicrosoftThreatProtection", "dataTypes": ["DeviceFileCertificateInfo"]}
    ]
    assert doc["tactics"] == "CommandAndControl"
    assert doc["relevantTechniques"] == "T1219"
    assert vendor in doc["description"] and "T1219" in doc["description"]
    assert signer_condition(doc["query"]) is not None, "the Signer line is not has/has_any"
    text = path.read_text(encoding="utf-8")
    assert "\ndescription: |\n" in text and "\nquery: |\n" in text
    assert doc["id"] == str(uuid.uuid5(gen.NAMESPACE, vendor)), "id is not the stable uuid5"


def test_ids_and_names_are_unique() -> None:
    docs = [_doc(path) for path in CATALOG_FILES]
    ids = [doc["id"] for doc in docs]
    names = [doc["name"] for doc in docs]
    assert len(set(ids)) == len(ids)
    assert len(set(names)) == len(names)
    assert SEED_ID not in ids


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_query_validates(path: Path) -> None:
    assert duckdb_kql.validate(_doc(path)["query"]) == []


def test_no_catalog_query_matches_panorama9_by_term() -> None:
    for vendor, terms in VENDOR_TERMS.items():
        assert all("panorama9" not in t.casefold() for t in terms), vendor


@pytest.mark.skipif(not SEED_FILE.is_file(), reason=f"{SEED_FILE} is not in the tree yet")
def test_query_has_the_seed_shape() -> None:
    """Each query is the seed's, with only the Signer condition changed."""
    seed_query = _load(SEED_FILE)["query"]

    def shape(query: str) -> list[str]:
        return [line.rstrip() for line in SIGNER_LINE_RE.sub("| where Signer <terms>", query)
                .strip("\n").splitlines()]

    for path in CATALOG_FILES:
        assert shape(_doc(path)["query"]) == shape(seed_query), path.name


# --- per-vendor matching on DuckDB ---------------------------------------------------


def _sample_rows(vendor: str) -> tuple[list[tuple[Any, ...]], set[str]]:
    """Rows for one vendor's test table, and the DeviceIds its query must return."""
    recent = QUERY_NOW - dt.timedelta(days=1)
    rows: list[tuple[Any, ...]] = []
    expected: set[str] = set()

    def add(device: str, signer: str, when: dt.datetime = recent) -> str:
        rows.append((when, device, f"{device}.corp.example", signer, len(rows) + 1))
        return device

    for i, term in enumerate(VENDOR_TERMS[vendor]):
        # Whole-term match inside a longer signer string, and in another (ASCII) case.
        expected.add(add(f"hit-{i}-inc", f"{term}, Inc."))
        expected.add(add(f"hit-{i}-case", f"Code signed by {_ascii_upper(term)} (release)"))
        # Same device twice: one row per device back, Count 2.
        expected.add(add(f"hit-{i}-inc", f"{term}, Inc."))
        # Near misses: a letter glued to a letter/digit edge is another term.
        if _ascii_alnum(term[0]):
            add(f"miss-{i}-glued-front", f"x{term} Ltd")
        if _ascii_alnum(term[-1]):
            add(f"miss-{i}-glued-back", f"{term}x Ltd")
        # Outside the query's five-day window.
        add(f"miss-{i}-old", f"{term}, Inc.", QUERY_NOW - dt.timedelta(days=6))
    add("miss-panorama9", "Panorama9, Inc.")
    for other, terms in VENDOR_TERMS.items():
        if other != vendor:
            for j, term in enumerate(terms):
                add(f"miss-other-{gen.slugify(other)}-{j}", f"{term}, Inc.")
    return rows, expected


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_query_matches_its_vendor_only(path: Path) -> None:
    vendor = _vendor(_doc(path))
    assert vendor in VENDOR_TERMS, "no vendor name or Signer condition to test"
    rows, expected = _sample_rows(vendor)
    con = duckdb_kql.connect()
    try:
        con.execute(
            "CREATE TABLE DeviceFileCertificateInfo (Timestamp TIMESTAMPTZ, DeviceId VARCHAR,"
            " DeviceName VARCHAR, Signer VARCHAR, ReportId BIGINT)"
        )
        con.executemany("INSERT INTO DeviceFileCertificateInfo VALUES (?, ?, ?, ?, ?)", rows)
        cursor = duckdb_kql.execute(con, _doc(path)["query"], query_now=QUERY_NOW)
        columns = [c[0] for c in cursor.description]
        got = [dict(zip(columns, row)) for row in cursor.fetchall()]
    finally:
        con.close()
    assert columns == ["DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count"]
    assert {r["DeviceId"] for r in got} == expected
    assert len(got) == len(expected)
    counts = {r["DeviceId"]: r["Count"] for r in got}
    for device in expected:
        assert counts[device] == (2 if device.endswith("-inc") else 1), device


# --- the generator -------------------------------------------------------------------


def _run(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


@needs_table
def test_committed_catalog_matches_the_table() -> None:
    result = _run(str(TABLE), "--check")
    assert result.returncode == 0, result.stderr


@needs_table
def test_table_terms_round_trip_through_the_queries() -> None:
    table = {v.name: list(v.terms) for v in gen.read_table(TABLE)}
    assert "Panorama9" in table and "Panorama9" not in VENDOR_TERMS
    assert VENDOR_TERMS == {k: v for k, v in table.items() if k != "Panorama9"}


@needs_table
def test_generator_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(str(TABLE), "--output", str(first), hash_seed="1").returncode == 0
    assert _run(str(TABLE), "--output", str(second), hash_seed="2").returncode == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert names == sorted(gen.catalog(gen.read_table(TABLE)))
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Regenerating in place changes nothing.
    again = _run(str(TABLE), "--output", str(first))
    assert again.returncode == 0 and "0 written" in again.stdout


@needs_table
def test_check_reports_drift_and_generation_removes_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "rmm"
    shutil.copytree(CATALOG, out)
    edited = out / "teamviewer-filesig.yaml"
    edited.write_text(edited.read_text(encoding="utf-8").replace("TeamViewer'", "TeamView'"),
                      encoding="utf-8")
    (out / "atera-filesig.yaml").unlink()
    stale = out / "gone-filesig.yaml"
    stale.write_text(gen.HEADER + "id: x\n", encoding="utf-8")
    hand_written = out / "local-filesig.yaml"
    hand_written.write_text("id: mine\n", encoding="utf-8")

    result = _run(str(TABLE), "--output", str(out), "--check")
    assert result.returncode == 1
    assert f"differs: {edited}" in result.stderr
    assert f"missing: {out / 'atera-filesig.yaml'}" in result.stderr
    assert f"stale (vendor no longer in the table): {stale}" in result.stderr
    assert "local-filesig.yaml" not in result.stderr

    assert _run(str(TABLE), "--output", str(out)).returncode == 0
    assert not stale.exists() and hand_written.exists()
    assert _run(str(TABLE), "--output", str(out), "--check").returncode == 0


# --- table validation and escaping ---------------------------------------------------

HEADER_LINE = "vendor\toperator\tsigner_terms\n"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("A\thas\tAlpha\nB\tcontains\tBeta\n", "t.tsv:3: unknown operator 'contains'"),
        ("A\thas\t\n", "t.tsv:2: empty signer_terms for vendor 'A'"),
        ("A\thas_any\tAlpha |  | Beta\n", "t.tsv:2: empty term in the has_any list"),
        ("A\thas_any\tAlpha | \n", "t.tsv:2: empty term in the has_any list"),
        ("Acme\thas\tAlpha\nB\thas\tBeta\nacme\thas\tGamma\n",
         "t.tsv:4: duplicate vendor 'acme' (first defined on line 2)"),
        ("A\thas\tAlpha | Beta\n", "t.tsv:2: vendor 'A' uses 'has' with several terms"),
        ("A\thas\n", "t.tsv:2: expected 3 tab-separated fields"),
        ("parsec.app\thas\tP\nparsec app\thas\tQ\n", "t.tsv:3: vendor 'parsec app' gives the same"),
    ],
)
def test_bad_table_is_refused_with_its_line_number(
    tmp_path: Path, rows: str, message: str
) -> None:
    table = tmp_path / "t.tsv"
    table.write_text(HEADER_LINE + rows, encoding="utf-8")
    with pytest.raises(gen.TableError) as raised:
        gen.read_table(table)
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


def test_bad_table_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text(HEADER_LINE + "A\thas\tAlpha\nB\thas_anyy\tBeta\n", encoding="utf-8")
    out = tmp_path / "out"
    result = _run(str(table), "--output", str(out))
    assert result.returncode == 2
    assert "t.tsv:3: unknown operator 'has_anyy'" in result.stderr
    assert not out.exists()


def test_bad_header_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("vendor\top\tterms\nA\thas\tAlpha\n", encoding="utf-8")
    with pytest.raises(gen.TableError, match=r"t\.tsv:1: header"):
        gen.read_table(table)


@pytest.mark.parametrize("text", ["it's", "back\\slash", "O'Brien \\' Co", "Krämer", "''"])
def test_kql_string_literal_round_trips(text: str) -> None:
    con = duckdb_kql.connect()
    try:
        got = duckdb_kql.execute(con, f"print s = {gen.kql_string(text)}").fetchone()
    finally:
        con.close()
    assert got == (text,)


def test_quotes_in_terms_are_escaped_end_to_end(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text(
        HEADER_LINE + "O'Brien\thas_any\tO'Brien Software | Back\\Slash Ltd\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    assert _run(str(table), "--output", str(out)).returncode == 0
    doc = _load(out / "o-brien-filesig.yaml")
    assert doc["name"] == "Remote Management and Monitoring tool - O'Brien - File Signature"
    assert "'O\\'Brien Software', 'Back\\\\Slash Ltd'" in doc["query"]
    assert duckdb_kql.validate(doc["query"]) == []
    con = duckdb_kql.connect()
    try:
        con.execute(
            "CREATE TABLE DeviceFileCertificateInfo (Timestamp TIMESTAMPTZ, DeviceId VARCHAR,"
            " DeviceName VARCHAR, Signer VARCHAR, ReportId BIGINT)"
        )
        when = QUERY_NOW - dt.timedelta(hours=1)
        con.executemany(
            "INSERT INTO DeviceFileCertificateInfo VALUES (?, ?, ?, ?, ?)",
            [(when, "a", "a", "O'Brien Software Ltd", 1),
             (when, "b", "b", "Back\\Slash Ltd", 2),
             (when, "c", "c", "OBrien Software", 3),
             (when, "d", "d", "Panorama9, Inc.", 4)],
        )
        got = duckdb_kql.execute(con, doc["query"], query_now=QUERY_NOW).fetchall()
    finally:
        con.close()
    assert sorted(r[0] for r in got) == ["a", "b"]
