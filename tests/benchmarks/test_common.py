"""The pieces every benchmark script shares."""

import json

from benchmarks.common import write_json


def test_write_json_dash_is_standard_output(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json("-", {"rows": [1, 2]})
    assert json.loads(capsys.readouterr().out) == {"rows": [1, 2]}
    assert list(tmp_path.iterdir()) == []


def test_write_json_to_a_file_leaves_no_temporary(tmp_path):
    target = tmp_path / "results" / "latest.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["latest.json"]
