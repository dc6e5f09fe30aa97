"""Checkpoint selection (paper sec. 6.1) on hand-built runs; expected choices worked by hand."""

import json
import math

import pytest

from overmem.config import RunConfig
from overmem.selection import (
    CRITERIA,
    SelectionResult,
    checkpoint_to_keep,
    format_selection,
    format_selection_json,
    read_selection,
    select_checkpoint,
    select_run_checkpoint,
    selection_is_current,
    write_selection,
)


def curve(split, ppls, accs, names=None, ci=0.02):
    names = names or [f"epoch-{i}" for i in range(len(ppls))]
    return [
        {
            "checkpoint": name, "epoch": float(i), "step": 10 * i, "split": split, "n": 500,
            "ppl": p, "ppl_token": 0.9 * p, "accuracy": a,
            "accuracy_ci_low": None if a is None else a - ci, "accuracy_ci_high": None if a is None else a + ci,
        }
        for i, (name, p, a) in enumerate(zip(names, ppls, accs))
    ]


VALID_PPL = [3.0, 1.7, 1.65, 1.70, 1.9, 2.2]
VALID_ACC = [0.42, 0.58, 0.61, 0.63, 0.64, 0.66]
TEST_ACC = [0.40, 0.66, 0.70, 0.72, 0.73, 0.72]
GSM_ACC = [0.35, 0.60, 0.62, 0.66, 0.61, 0.58]


def run_rows():
    return (
        curve("train", [2.5, 1.5, 1.3, 1.2, 1.1, 1.05], [0.4, 0.6, 0.7, 0.8, 0.85, 0.9])
        + curve("validation", VALID_PPL, VALID_ACC)
        + curve("test", [3.5, 2.0, 1.9, 2.2, 2.9, 3.8], TEST_ACC)
        + curve("gsm8k", [4.0, 2.5, 2.4, 2.6, 3.2, 4.0], GSM_ACC)
    )


def test_every_criterion():
    # Minimum validation ppl 1.65 (epoch-2); band 5% -> ppl <= 1.7325 admits epoch-1 (1.70),
    # epoch-2 (1.65), epoch-3 (1.70); the most accurate of them is epoch-3 (0.63).
    result = select_checkpoint(run_rows())
    assert list(result.choices) == list(CRITERIA)
    picked = {k: c.checkpoint for k, c in result.choices.items()}
    assert picked == {
        "recommended": "epoch-3", "last": "epoch-5", "min_valid_ppl": "epoch-2", "max_valid_acc": "epoch-5",
    }
    assert result.test_splits == ["test", "gsm8k"]  # train and validation are not test splits
    rec = result.recommended
    assert (rec.epoch, rec.step, rec.valid.ppl, rec.valid.accuracy) == (3.0, 30, 1.70, 0.63)
    assert rec.tests["test"].accuracy == 0.72
    assert rec.tests["test"].accuracy_ci_low == pytest.approx(0.70)
    assert rec.tests["gsm8k"].ppl == 2.6
    assert rec.mean_test_accuracy == pytest.approx((0.72 + 0.66) / 2)
    assert "epoch-1, epoch-2, epoch-3" in rec.reason and "ppl <= 1.732" in rec.reason
    assert result.choices["min_valid_ppl"].reason == "lowest validation perplexity 1.65"
    assert "1.33x the minimum" in result.choices["max_valid_acc"].reason  # 2.2 / 1.65


def test_band_width_and_edge():
    rows = curve("validation", [2.0, 2.1, 2.3], [0.5, 0.6, 0.7]) + curve("test", [2, 2, 2], [0.5, 0.5, 0.5])
    # 2.1 = 1.05 * 2.0 exactly: inside the band.
    assert select_checkpoint(rows).recommended.checkpoint == "epoch-1"
    assert select_checkpoint(rows, ppl_band=0).recommended.checkpoint == "epoch-0"
    assert select_checkpoint(rows, ppl_band=0.2).recommended.checkpoint == "epoch-2"
    with pytest.raises(ValueError, match="ppl_band"):
        select_checkpoint(rows, ppl_band=-0.1)


def test_ties():
    # Band limit 1.05 * 1.9 = 1.995 admits epoch-1 (1.9) and epoch-2 (1.95), both at 0.7:
    # the lower ppl wins. Accuracy ties for max_valid_acc go to the earliest (epoch-1).
    rows = curve("validation", [2.0, 1.9, 1.95, 2.5], [0.6, 0.7, 0.7, 0.7]) + curve("test", [2] * 4, [0.5] * 4)
    result = select_checkpoint(rows)
    assert result.recommended.checkpoint == "epoch-1"
    assert result.choices["max_valid_acc"].checkpoint == "epoch-1"
    # Equal ppl and accuracy: the earlier checkpoint.
    rows = curve("validation", [2.0, 1.9, 1.9], [0.6, 0.7, 0.7]) + curve("test", [2] * 3, [0.5] * 3)
    result = select_checkpoint(rows)
    assert result.recommended.checkpoint == "epoch-1"
    assert result.choices["min_valid_ppl"].checkpoint == "epoch-1"


def test_single_checkpoint():
    rows = curve("validation", [2.0], [0.5]) + curve("test", [2.5], [0.4])
    result = select_checkpoint(rows)
    assert {c.checkpoint for c in result.choices.values()} == {"epoch-0"}


def test_missing_validation_split():
    rows = [r for r in run_rows() if r["split"] != "validation"]
    with pytest.raises(ValueError, match=r"'validation' not in .*\['train', 'test', 'gsm8k'\]"):
        select_checkpoint(rows)


def test_validation_without_accuracy_falls_back_to_lowest_ppl(tmp_path):
    # Open-ended data: no accuracy anywhere. Lowest validation ppl 1.9 at epoch-1 (epoch-3 ties later).
    rows = curve("validation", [2.0, 1.9, 2.3, 1.9], [None] * 4) + curve("test", [2.5, 2.4, 2.6, 2.4], [None] * 4)
    result = select_checkpoint(rows)
    assert result.rule == "lowest_valid_ppl"
    assert result.recommended.checkpoint == "epoch-1"
    assert "fallback rule" in result.recommended.reason and "no accuracy" in result.recommended.reason
    assert list(result.choices) == ["recommended", "last", "min_valid_ppl"]  # no accuracy to maximise
    assert result.recommended.tests["test"].accuracy is None and result.recommended.mean_test_accuracy is None
    written = json.loads(write_selection(result, tmp_path / "selection.json").read_text())
    assert written["rule"] == "lowest_valid_ppl" and written["choices"]["recommended"]["valid"]["accuracy"] is None
    assert "fallback rule" in format_selection(result)
    assert select_checkpoint(run_rows()).rule == "ppl_band"


def test_unknown_test_split():
    with pytest.raises(ValueError, match=r"\['math'\] not in"):
        select_checkpoint(run_rows(), test_splits=["test", "math"])


def test_custom_names_and_missing_figures():
    # Validation named "metatest"; gsm8k was not evaluated at epoch-3 -> its figures are None.
    rows = [r for r in run_rows() if not (r["split"] == "gsm8k" and r["checkpoint"] == "epoch-3")]
    for r in rows:
        if r["split"] == "validation":
            r["split"] = "metatest"
    result = select_checkpoint(rows, valid_split="metatest", test_splits=["gsm8k"])
    rec = result.recommended
    assert rec.checkpoint == "epoch-3"
    assert rec.tests["gsm8k"].accuracy is None and rec.tests["gsm8k"].ppl is None
    assert rec.mean_test_accuracy is None
    assert "metatest ppl" in format_selection(result)


def test_merges_are_listed_not_selected():
    merge = "merge(epoch-3,epoch-5)"
    rows = run_rows() + curve("validation", [1.6], [0.9], names=[merge]) + curve("test", [2.0], [0.8], names=[merge])
    for r in rows[-2:]:
        r["epoch"] = None
    result = select_checkpoint(rows)
    assert result.recommended.checkpoint == "epoch-3"
    assert [c.checkpoint for c in result.others] == [merge]
    assert result.others[0].tests["test"].accuracy == 0.8
    assert merge in format_selection(result)


def test_json_round_trip_and_atomic_write(tmp_path):
    rows = run_rows()
    rows[-1]["ppl_token"] = math.nan  # NaN must become null, not invalid JSON
    result = select_checkpoint(rows)
    path = write_selection(result, tmp_path / "run" / "selection.json")
    assert path == tmp_path / "run" / "selection.json"
    data = json.loads(path.read_text())  # strict JSON
    assert data["choices"]["recommended"]["checkpoint"] == "epoch-3"
    assert data["choices"]["last"]["tests"]["gsm8k"]["ppl_token"] is None
    back = read_selection(path)
    assert isinstance(back, SelectionResult)
    assert back.to_dict() == result.to_dict()
    write_selection(select_checkpoint(rows, ppl_band=0.5), path)  # replaces in place
    assert read_selection(path).ppl_band == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]  # no temp files left


def test_table():
    table = format_selection(select_checkpoint(run_rows()))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["criterion", "checkpoint", "epoch", "validation", "ppl"]
    assert "mean test acc" in lines[0]
    rec = next(line for line in lines if line.startswith("recommended "))
    # validation acc 63.0%, test 72.0 [70.0, 74.0], gsm8k 66.0, mean 69.0
    assert rec.split()[:5] == ["recommended", "epoch-3", "3", "1.700", "63.0"]
    assert "72.0 [70.0, 74.0]" in rec and rec.endswith("69.0")
    assert "recommended: epoch-3 - highest validation accuracy 0.630" in table
    assert format_selection_json(json.loads(json.dumps(select_checkpoint(run_rows()).to_dict()))) == table


def test_checkpoint_to_keep_is_the_recommended_one_or_reads_the_phase_split():
    rows = run_rows()
    keep = checkpoint_to_keep(rows, phase_split="test")
    rec = select_checkpoint(rows).recommended
    assert (keep.checkpoint, keep.split, keep.reason) == (rec.checkpoint, "validation", rec.reason)
    # Without a validation split the same rule reads the phase split: test ppl minimum 1.9 (epoch-2);
    # a 20% band admits epoch-1 (2.0), epoch-2 (1.9) and epoch-3 (2.2); the most accurate is epoch-3.
    no_valid = [r for r in rows if r["split"] != "validation"]
    keep = checkpoint_to_keep(no_valid, phase_split="test", ppl_band=0.2)
    assert (keep.checkpoint, keep.split) == ("epoch-3", "test") and "no validation accuracy" in keep.reason
    assert checkpoint_to_keep(no_valid, phase_split="test").checkpoint == "epoch-2"  # 5%: only the minimum
    # Without any accuracy: the lowest perplexity of the phase split.
    blind = curve("validation", VALID_PPL, [None] * 6) + curve("test", [3.5, 2.0, 1.9, 1.9, 2.9, 3.8], [None] * 6)
    keep = checkpoint_to_keep(blind, phase_split="test")
    assert (keep.checkpoint, keep.split) == ("epoch-2", "test") and "lowest test perplexity" in keep.reason


def test_run_selection_follows_the_config_and_tells_a_stale_file():
    rows = [{**r, "split": "metatest"} if r["split"] == "validation" else r for r in run_rows()]
    cfg = RunConfig.model_validate({"selection": {"valid_split": "metatest", "ppl_band": 0.05}})
    result = select_run_checkpoint(rows, cfg)
    assert result.valid_split == "metatest" and result.test_splits == ["test", "gsm8k"]
    assert result.recommended.checkpoint == "epoch-3"
    stored = json.loads(json.dumps(result.to_dict()))
    assert selection_is_current(stored, rows, cfg)
    wider = cfg.model_copy(update={"selection": cfg.selection.model_copy(update={"ppl_band": 0.2})})
    assert not selection_is_current(stored, rows, wider)
    assert not selection_is_current(stored, rows + curve("math", [2.0], [0.5]), cfg)
