"""The detection loader: the seed's format, bad files reported by path, the others still run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alerter.cli import main
from alerter.detections import load_detections, syntax_problems
from tests.conftest import PANORAMA9_ID, ROOT

SEED_QUERY = """let Time_start = now(-5d);
let Time_end = now();
//
DeviceFileCertificateInfo
| where Timestamp between (Time_start..Time_end)
| where Signer has 'Panorama9'
| summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp), 
    Report=make_set(ReportId), Count=count() by DeviceId, DeviceName
"""


def detection_yaml(id_: str, name: str, tactics: str = "tactics: CommandAndControl", query: str = "T | take 1") -> str:
    return f"id: {id_}\nname: {name}\n{tactics}\nrelevantTechniques: T1219\nquery: |\n  {query}\n"


def test_the_seed_detection_loads_with_its_fields_and_kql_unchanged():
    result = load_detections(ROOT / "detections")
    assert result.problems == []
    assert [d.id for d in result.detections] == [PANORAMA9_ID]
    seed = result.detections[0]
    assert seed.name == "Remote Management and Monitoring tool - Panorama9 - File Signature"
    assert seed.query == SEED_QUERY
    assert seed.tactics == ("CommandAndControl",)
    assert seed.techniques == ("T1219",)
    assert seed.required_data_connectors == (
        {"connectorId": "MicrosoftThreatProtection", "dataTypes": ["DeviceFileCertificateInfo"]},
    )
    assert syntax_problems(seed) == []


def test_tactics_and_techniques_load_as_scalars_or_lists_and_unknown_keys_are_kept(tmp_path: Path):
    (tmp_path / "scalar.yaml").write_text(detection_yaml("a", "Scalar"))
    (tmp_path / "list.yaml").write_text(
        "id: b\nname: List\ntactics:\n- CommandAndControl\n- Persistence\nrelevantTechniques:\n- T1219\n"
        "- T1133\nquery: T | take 1\nentityMappings:\n- entityType: Host\nversion: 1.0.1\n"
    )
    result = load_detections(tmp_path)
    by_id = {d.id: d for d in result.detections}
    assert result.problems == []
    assert by_id["a"].tactics == ("CommandAndControl",)
    assert by_id["b"].tactics == ("CommandAndControl", "Persistence")
    assert by_id["b"].techniques == ("T1219", "T1133")
    assert by_id["b"].extra == {"entityMappings": [{"entityType": "Host"}], "version": "1.0.1"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("id: x\nname: [unclosed\nquery: q\n", "is not valid YAML at line"),
        ("name: No id\nquery: T\n", "field 'id' is missing"),
        ("id: x\nquery: T\n", "field 'name' is missing"),
        ("id: x\nname: No query\n", "field 'query' is missing"),
        ("id: x\nname: Empty\nquery: ''\n", "field 'query' must be a non-empty string"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("id: x\nname: Bad tactics\ntactics: {a: 1}\nquery: T\n", "field 'tactics' must be a string or a list"),
        ('id: "x\\r\\nBcc: a@b.c"\nname: Header\nquery: T\n', "field 'id' must be one line without control characters"),
    ],
)
def test_a_bad_file_is_reported_with_its_path_and_the_others_still_load(tmp_path: Path, content: str, expected: str):
    (tmp_path / "good.yaml").write_text(detection_yaml("good", "Good"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    result = load_detections(tmp_path)
    assert [d.id for d in result.detections] == ["good"]
    assert len(result.problems) == 1
    assert result.problems[0].path == str(bad)
    assert expected in result.problems[0].message


def test_a_repeated_id_is_reported_and_the_first_file_wins(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(detection_yaml("same", "First"))
    (tmp_path / "b.yaml").write_text(detection_yaml("same", "Second"))
    result = load_detections(tmp_path)
    assert [d.name for d in result.detections] == ["First"]
    assert [str(p) for p in result.problems] == [f"{tmp_path / 'b.yaml'}: repeats the id same of {tmp_path / 'a.yaml'}"]


def test_catalogs_in_subfolders_are_opt_in_by_id_name_or_glob():
    folder = ROOT / "detections"
    assert len(load_detections(folder).detections) == 1
    rmm = load_detections(folder, ["rmm/*"])
    assert rmm.problems == []
    assert len(rmm.detections) == len(list((folder / "rmm").glob("*.yaml")))
    anydesk = next(d for d in rmm.detections if "AnyDesk" in d.name)
    by_name = load_detections(folder, [anydesk.name, PANORAMA9_ID])
    assert sorted(d.id for d in by_name.detections) == sorted([anydesk.id, PANORAMA9_ID])
    by_file = load_detections(folder, ["panorama9-filesig"])
    assert [d.id for d in by_file.detections] == [PANORAMA9_ID]


def test_a_selection_that_matches_nothing_is_named(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(detection_yaml("a", "A"))
    result = load_detections(tmp_path, ["A", "typo-name"])
    assert [d.id for d in result.detections] == ["a"]
    assert [str(p) for p in result.problems] == [
        f"DETECTIONS: 'typo-name' matches no detection id, name or file in {tmp_path}"
    ]


def test_validate_checks_kql_syntax_of_every_file_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "detections"
    shutil.copytree(ROOT / "detections", folder)
    assert main(["validate", "--settings", str(_settings_file(tmp_path, folder))]) == 0
    (folder / "rmm" / "broken.yaml").write_text(detection_yaml("broken", "Broken", query="DeviceFileCertificateInfo | where ((("))
    capsys.readouterr()
    assert main(["validate", "--settings", str(_settings_file(tmp_path, folder))]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'rmm' / 'broken.yaml'}: field 'query' line 1" in err


def _settings_file(tmp_path: Path, folder: Path) -> Path:
    path = tmp_path / "local.settings.json"
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path.write_text(
        '{"Values": {"QUERY_SOURCE": "local", "LOCAL_DATA_PATH": "%s", "DETECTIONS_PATH": "%s", '
        '"STATE_STORE": "sqlite", "STATE_PATH": "%s"}}' % (data, folder, tmp_path / "state.db")
    )
    return path
