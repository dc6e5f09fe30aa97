import json

import pytest

from overmem.config import ConfigError
from overmem.results import (
    BASE, Checkpoint, RunDir, append_jsonl, epoch_name, find_checkpoints, read_jsonl, resolve_checkpoints, write_json,
)


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    p = tmp_path / "d.jsonl"
    append_jsonl(p, {"a": 1})
    with open(p, "a") as fh:
        fh.write('{"a": 2, "b"')  # a writer killed mid-line
    assert read_jsonl(p, torn_ok=True) == [{"a": 1}]
    with pytest.raises(ValueError, match=r"d.jsonl line 2: incomplete last line \(an interrupted write\)"):
        read_jsonl(p)  # a reader is told, not handed one row fewer
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


def _model_folder(path, meta=None, adapter=False):
    path.mkdir(parents=True)
    (path / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    if meta is not None:
        (path / "overmem.json").write_text(json.dumps(meta))
    return path


def test_run_folder_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.analysis_json("mia") == tmp_path / "analysis" / "mia.json"
    assert run.analysis_samples("mia", "epoch-3") == tmp_path / "analysis" / "mia" / "epoch-3.jsonl"
    assert run.checkpoint(epoch_name(3)) == tmp_path / "checkpoints" / "epoch-3"
    assert run.samples(BASE, "test") == tmp_path / "samples" / "epoch-0" / "test.jsonl"
    assert run.read_json(run.phases) is None and not run.up_to_date(run.phases)
    write_json(run.phases, {"split": "test"})
    assert run.read_json(run.phases) == {"split": "test"} and run.up_to_date(run.phases)


def test_find_and_resolve_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _model_folder(ckpts / "epoch-2", {"epoch": 2.0, "step": 8})
    _model_folder(ckpts / "epoch-1", {"epoch": 1.0, "step": 4}, adapter=True)
    _model_folder(ckpts / "merge(epoch-1,epoch-2)")
    (ckpts / "notes").mkdir()
    found = find_checkpoints(tmp_path / "run")
    assert [(c.name, c.epoch, c.step) for c in found] == [
        ("merge(epoch-1,epoch-2)", None, 0), ("epoch-1", 1.0, 4), ("epoch-2", 2.0, 8)]
    outside = _model_folder(tmp_path / "elsewhere" / "mine")
    resolved = resolve_checkpoints(tmp_path / "run", ["epoch-2", BASE, str(outside), "epoch-2"])
    assert resolved == [Checkpoint("epoch-2", ckpts / "epoch-2", 2.0, 8), Checkpoint(BASE, None, 0.0, 0),
                        Checkpoint("mine", outside, None, None)]
    with pytest.raises(ConfigError, match=r"'epoch-7'.*available: epoch-0, merge"):
        resolve_checkpoints(tmp_path / "run", ["epoch-7"])
    with pytest.raises(ConfigError, match="two checkpoints are named 'epoch-1'"):
        resolve_checkpoints(tmp_path / "run", ["epoch-1", str(_model_folder(tmp_path / "other" / "epoch-1"))])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        find_checkpoints(tmp_path / "elsewhere" / "mine")
    (ckpts / "epoch-3").mkdir()  # no model in it: an error, not a checkpoint less
    with pytest.raises(ValueError, match="epoch-3: a checkpoint folder without a model"):
        find_checkpoints(tmp_path / "run")
