import json

import pytest

from overmem.results import append_jsonl, read_jsonl, write_json


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    p = tmp_path / "d.jsonl"
    append_jsonl(p, {"a": 1})
    with open(p, "a") as fh:
        fh.write('{"a": 2, "b"')  # a writer killed mid-line
    assert read_jsonl(p) == [{"a": 1}]
    append_jsonl(p, {"a": 3})
    assert read_jsonl(p) == [{"a": 1}, {"a": 3}]
    assert p.read_text().count("\n") == 2


def test_corrupt_middle_line_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_atomic_json_leaves_no_temp_files(tmp_path):
    write_json(tmp_path / "x.json", {"v": 1.5})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1.5}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]
