"""Load Sentinel hunting-query YAML files; a bad file is reported and never stops the others."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alerter.model import Detection

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
REQUIRED_FIELDS = ("id", "name", "query")
KNOWN_FIELDS = {"id", "name", "description", "requiredDataConnectors", "tactics", "relevantTechniques", "query"}


@dataclass(frozen=True)
class DetectionProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class LoadResult:
    detections: list[Detection] = field(default_factory=list)
    problems: list[DetectionProblem] = field(default_factory=list)


def _string_list(value: Any, path: str, key: str, problems: list[DetectionProblem]) -> tuple[str, ...]:
    """Sentinel files write tactics and techniques as a scalar or a list; accept both."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    problems.append(DetectionProblem(path, f"field '{key}' must be a string or a list of strings"))
    return ()


def parse_detection(path: Path, display: str) -> Detection | DetectionProblem:
    """One file to a Detection, or the reason it is not one (named by path and field)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        return DetectionProblem(display, f"cannot read the file ({error.strerror})")
    except UnicodeDecodeError:
        return DetectionProblem(display, "is not UTF-8 text")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or "syntax error"
        return DetectionProblem(display, f"is not valid YAML{where}: {reason}")
    if not isinstance(document, dict):
        return DetectionProblem(display, "must be a YAML mapping with id, name and query")
    for key in REQUIRED_FIELDS:
        value = document.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "is missing" if value is None else "must be a non-empty string"
            return DetectionProblem(display, f"field '{key}' {what}")
    for key in ("id", "name"):
        if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in str(document[key])):
            # Ids and names go into mail headers, table keys and logs: one line of text each.
            return DetectionProblem(display, f"field '{key}' must be one line without control characters")
    problems: list[DetectionProblem] = []
    tactics = _string_list(document.get("tactics"), display, "tactics", problems)
    techniques = _string_list(document.get("relevantTechniques"), display, "relevantTechniques", problems)
    connectors = document.get("requiredDataConnectors") or []
    if not isinstance(connectors, list) or not all(isinstance(c, dict) for c in connectors):
        problems.append(DetectionProblem(display, "field 'requiredDataConnectors' must be a list of mappings"))
        connectors = []
    description = document.get("description") or ""
    if not isinstance(description, str):
        problems.append(DetectionProblem(display, "field 'description' must be a string"))
    if problems:
        return problems[0]
    return Detection(
        id=str(document["id"]).strip(),
        name=str(document["name"]).strip(),
        query=str(document["query"]),
        path=display,
        description=str(description).strip(),
        tactics=tactics,
        techniques=techniques,
        required_data_connectors=tuple(connectors),
        extra={k: v for k, v in document.items() if k not in KNOWN_FIELDS},
    )


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _candidate_files(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in YAML_SUFFIXES)


def load_detections(folder: Path, selection: Sequence[str] = (), *, every_file: bool = False) -> LoadResult:
    """Load the enabled detections.

    `selection` holds ids, names or globs relative to `folder` (the DETECTIONS setting); empty
    means every file directly in `folder`, so catalogs in subfolders are opt-in. `every_file`
    loads the whole tree, as `alerter validate` does, so a broken catalog file is found before
    anyone enables it.
    """
    result = LoadResult()
    if not folder.is_dir():
        result.problems.append(DetectionProblem(str(folder), "DETECTIONS_PATH is not a folder"))
        return result

    recursive = every_file or bool(selection)
    parsed: list[tuple[str, Detection | DetectionProblem]] = [
        (_relative(p, folder), parse_detection(p, str(p))) for p in _candidate_files(folder, recursive)
    ]

    def entries_matching(relative: str, item: Detection | DetectionProblem) -> set[str]:
        ids = (item.id, item.name) if isinstance(item, Detection) else ()
        return {
            entry
            for entry in selection
            if entry in ids or fnmatch.fnmatchcase(relative, entry) or fnmatch.fnmatchcase(relative, entry + ".y*ml")
        }

    seen_ids: dict[str, str] = {}
    matched_entries: set[str] = set()
    for relative, item in parsed:
        matching = entries_matching(relative, item)
        enabled = every_file or bool(matching) or (not selection and "/" not in relative)
        if not enabled:
            if isinstance(item, DetectionProblem):
                log.debug("skipping a file that is not enabled and does not load: %s", item)
            continue
        matched_entries |= matching
        if isinstance(item, DetectionProblem):
            result.problems.append(item)
            continue
        if item.id in seen_ids:
            result.problems.append(DetectionProblem(item.path, f"repeats the id {item.id} of {seen_ids[item.id]}"))
            continue
        seen_ids[item.id] = item.path
        result.detections.append(item)

    for entry in selection:
        if entry not in matched_entries:
            result.problems.append(
                DetectionProblem("DETECTIONS", f"{entry!r} matches no detection id, name or file in {folder}")
            )
    return result


def syntax_problems(detection: Detection) -> list[DetectionProblem]:
    """Offline KQL syntax check with duckdb-kql's validator (a local/test dependency only:
    in Azure the query service itself is the judge, so the check is skipped there)."""
    try:
        import duckdb_kql
    except ImportError:
        return []
    return [
        DetectionProblem(
            detection.path, f"field 'query' line {d.span.line}, column {d.span.column}: {d.message}"
        )
        for d in duckdb_kql.validate(detection.query)
    ]
