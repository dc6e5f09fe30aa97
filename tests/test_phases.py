"""Phase labels on hand-built curves; every expected label is worked out in the comments."""

import json

import pytest
from pydantic import ValidationError

from overmem.config import PhaseRule, RunConfig
from overmem.phases import (
    PhaseReport, describe_phases, detect_phases, detect_run_phases, phase_split, phases_are_current,
)


def curve(ppls, accs, split="test", epochs=None, ci=None):
    """Dynamics rows of one split; `ci` is a half-width added around each accuracy."""
    epochs = epochs if epochs is not None else range(len(ppls))
    return [
        {
            "checkpoint": f"epoch-{e:g}", "epoch": float(e), "step": int(10 * e), "split": split, "n": 100,
            "ppl": p, "ppl_token": p, "accuracy": a,
            "accuracy_ci_low": None if a is None or ci is None else a - ci,
            "accuracy_ci_high": None if a is None or ci is None else a + ci,
        }
        for e, p, a in zip(epochs, ppls, accs)
    ]


PPL = [10, 3, 2.5, 2.8, 4.0, 6.0]


def test_over_memorization_example():
    # acc_best 0.72 -> learned at 0.8*0.72 = 0.576, first reached by epoch-1 (0.6): epoch-0 low.
    # Running ppl min 2.5 from epoch-2; ratios 1.12 (epoch-3), 1.6 (epoch-4), 2.4 (epoch-5): the
    # last two are elevated (>= 1.5). Best accuracy so far there is 0.72; 0.71 and 0.70 are
    # within 0.05 of it -> over_memorized. Onset = epoch-4.
    report = detect_phases(curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.71, 0.70]))
    assert list(report.labels.values()) == [
        "low_accuracy", "healthy", "healthy", "healthy", "over_memorized", "over_memorized",
    ]
    assert report.onset == "epoch-4"
    assert report.ppl_onset == "epoch-4"
    assert report.overfitting_onset is None
    assert report.learned_at == "epoch-1"
    assert (report.ppl_min, report.ppl_min_checkpoint) == (2.5, "epoch-2")
    assert (report.acc_best, report.acc_best_checkpoint) == (0.72, "epoch-3")
    last = report.get("epoch-5")
    assert last.ppl_ratio == pytest.approx(2.4)
    assert last.acc_drop == pytest.approx(0.02)


def test_overfitting_when_accuracy_falls():
    # Same ppl; epoch-4 accuracy 0.65 is 0.07 below the best so far (0.72) -> overfitting.
    report = detect_phases(curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.65, 0.50]))
    assert list(report.labels.values())[4:] == ["overfitting", "overfitting"]
    assert report.onset is None
    assert report.overfitting_onset == "epoch-4"
    assert report.ppl_onset == "epoch-4"
    assert "Overfitting from epoch-4" in describe_phases(report)


def test_over_memorization_then_overfitting():
    # epoch-4: drop 0.01 -> over_memorized; epoch-5: drop 0.12 -> overfitting.
    report = detect_phases(curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.71, 0.60]))
    assert list(report.labels.values())[4:] == ["over_memorized", "overfitting"]
    assert (report.onset, report.overfitting_onset) == ("epoch-4", "epoch-5")


def test_accuracy_still_rising_is_not_overfitting():
    # The run's best (0.80) comes at epoch-5. At epoch-4 (ppl 1.6x) accuracy 0.72 is 0.08 below
    # that final best but equal to its best so far: accuracy has not fallen -> over_memorized.
    report = detect_phases(curve(PPL, [0.1, 0.6, 0.65, 0.68, 0.72, 0.80]))
    assert list(report.labels.values())[4:] == ["over_memorized", "over_memorized"]


def test_thresholds_are_inclusive_and_configurable():
    # ppl exactly 1.5x its minimum and accuracy exactly 0.05 below its best: both count.
    rows = curve([2.0, 3.0], [0.75, 0.70])
    assert detect_phases(rows).labels["epoch-1"] == "over_memorized"
    assert detect_phases(rows, rule=PhaseRule(eps=0.6)).labels["epoch-1"] == "healthy"
    assert detect_phases(rows, rule=PhaseRule(delta=0.04)).labels["epoch-1"] == "overfitting"


def test_ties_pick_the_earliest_checkpoint():
    # ppl minimum 2 at epoch-1 and epoch-2; accuracy best 0.7 at epoch-1..3. epoch-3: 3.2/2 = 1.6.
    report = detect_phases(curve([4, 2, 2, 3.2], [0.2, 0.7, 0.7, 0.7]))
    assert report.ppl_min_checkpoint == "epoch-1"
    assert report.acc_best_checkpoint == "epoch-1"
    assert list(report.labels.values()) == ["low_accuracy", "healthy", "healthy", "over_memorized"]


def test_single_checkpoint():
    report = detect_phases(curve([3.0], [0.5]))
    assert report.labels == {"epoch-0": "healthy"}
    assert report.onset is None
    assert any("only one checkpoint" in w for w in report.warnings)
    assert detect_phases(curve([3.0], [0.0])).labels == {"epoch-0": "low_accuracy"}


def test_accuracy_not_measured_uses_perplexity_only():
    # Ratios as in the first test: epoch-4 and epoch-5 elevated.
    report = detect_phases(curve(PPL, [None] * 6))
    assert list(report.labels.values()) == ["low_ppl"] * 4 + ["high_ppl"] * 2
    assert report.onset is None
    assert report.ppl_onset == "epoch-4"
    assert report.acc_best is None and report.learned_at is None
    assert "accuracy was not measured" in describe_phases(report)


def test_accuracy_missing_at_some_checkpoints():
    report = detect_phases(curve(PPL, [0.1, 0.6, None, 0.72, 0.71, None]))
    assert list(report.labels.values()) == [
        "low_accuracy", "healthy", "low_ppl", "healthy", "over_memorized", "high_ppl",
    ]
    assert any("missing at 2 checkpoint" in w for w in report.warnings)


def test_never_learned():
    report = detect_phases(curve(PPL, [0.0] * 6))
    assert set(report.labels.values()) == {"low_accuracy"}
    assert report.learned_at is None and report.onset is None


def test_accuracy_collapse_without_ppl_rise_is_low_accuracy():
    # epoch-3: ppl at its minimum, accuracy 0.3 < 0.8 * 0.72 = 0.576.
    report = detect_phases(curve([10, 3, 2.9, 2.8], [0.1, 0.7, 0.72, 0.3]))
    assert report.labels["epoch-3"] == "low_accuracy"


def test_ppl_rise_before_learning_is_low_accuracy():
    # Learned at epoch-3 (0.7 >= 0.56). epoch-2 has ppl 1.75x its minimum but accuracy was never
    # high yet -> low_accuracy, not overfitting. epoch-3: ratio 2.0, accuracy at its peak.
    report = detect_phases(curve([10, 2, 3.5, 4], [0.1, 0.2, 0.3, 0.7]))
    assert list(report.labels.values()) == ["low_accuracy"] * 3 + ["over_memorized"]
    assert report.ppl_onset == "epoch-2"
    assert report.onset == "epoch-3"


def test_row_order_duplicates_and_merges():
    rows = curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.71, 0.70])
    stale = dict(rows[4], ppl=2.5)  # an earlier evaluation of epoch-4, superseded below
    merge = dict(rows[0], checkpoint="merge(epoch-3,epoch-5)", epoch=None, ppl=3.0, accuracy=0.75)
    shuffled = [rows[5], stale, rows[2], merge, rows[0], rows[4], rows[3], rows[1]]
    report = detect_phases(shuffled)
    assert list(report.labels) == [f"epoch-{i}" for i in range(6)]
    assert report.onset == "epoch-4"
    assert report.excluded == ["merge(epoch-3,epoch-5)"]
    assert report.acc_best == 0.72  # the merge is off the curve


def test_split_choice_and_errors():
    rows = (
        curve([2, 1.5, 1.2], [0.3, 0.5, 0.6], split="train")
        + curve([3, 2, 2.1], [0.3, 0.5, 0.55], split="validation")
        + curve([3, 2, 4.0], [0.3, 0.6, 0.62], split="gsm8k")
    )
    assert detect_phases(rows).split == "gsm8k"
    assert detect_phases(rows, split="validation").split == "validation"
    with pytest.raises(ValueError, match=r"'math'.*\['train', 'validation', 'gsm8k'\]"):
        detect_phases(rows, split="math")
    with pytest.raises(ValueError, match="no test split"):
        detect_phases(rows[:6])
    for bad in (float("nan"), 0.0, None):
        with pytest.raises(ValueError, match="'epoch-1' split 'test' has no finite positive ppl"):
            detect_phases(curve([3, bad], [0.1, 0.2]))


def test_report_json_round_trip():
    report = detect_phases(curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.71, None], ci=0.02))
    text = json.dumps(report.to_dict())
    assert PhaseReport.model_validate(json.loads(text)) == report
    assert json.loads(text)["rule"] == {"eps": 0.5, "delta": 0.05, "learn_frac": 0.8}
    assert json.loads(text)["summary"] == describe_phases(report)


def test_summary_names_the_numbers():
    text = describe_phases(detect_phases(curve(PPL, [0.1, 0.6, 0.7, 0.72, 0.71, 0.70])))
    assert "over-memorization starts at epoch-4" in text
    assert "1.6x its minimum so far (2.5 at epoch-2)" in text
    assert "accuracy 0.710 stays within 0.05 of its best so far 0.720" in text
    assert "1 low_accuracy, 3 healthy, 2 over_memorized" in text
    quiet = describe_phases(detect_phases(curve([3, 2, 2.2], [0.2, 0.6, 0.6])))
    assert "no over-memorization" in quiet and "1.10x" in quiet


def test_paper_table1_humaneval_and_gpqa():
    # Ruan et al. Table 1, epochs 0, 2, ..., 10.
    # HumanEval: best 0.5061 -> learned at >= 0.405: epoch-2. ppl minimum stays 1.66 (epoch 0);
    # ratios 1.10, 1.28, 1.55, 1.96, 2.46 -> elevated from epoch 6; accuracy within 0.025 of its
    # best so far -> over_memorized from epoch-6. n=164: CI half-width ~0.077 > delta -> warning.
    epochs = [0, 2, 4, 6, 8, 10]
    humaneval = curve(
        [1.66, 1.82, 2.13, 2.58, 3.26, 4.08], [0.3780, 0.4695, 0.4817, 0.5061, 0.4817, 0.5061], epochs=epochs, ci=0.077
    )
    report = detect_phases(humaneval)
    assert list(report.labels.values()) == ["low_accuracy", "healthy", "healthy"] + ["over_memorized"] * 3
    assert report.onset == "epoch-6"
    assert any("CI half-width 0.077" in w for w in report.warnings)
    # GPQA: best 0.25 -> learned at >= 0.2: epoch-2 (0.2162). ppl minimum 4.51 at epoch 2; epoch 4
    # is 7.47 / 4.51 = 1.66x with accuracy at its best so far -> onset epoch-4.
    gpqa = curve(
        [4.80, 4.51, 7.47, 14.77, 30.08, 40.53], [0.0541, 0.2162, 0.2230, 0.25, 0.2297, 0.25], epochs=epochs
    )
    report = detect_phases(gpqa)
    assert list(report.labels.values()) == ["low_accuracy", "healthy"] + ["over_memorized"] * 4
    assert report.onset == "epoch-4"


def test_rule_validation():
    with pytest.raises(ValidationError):
        PhaseRule(eps=0)
    with pytest.raises(ValidationError):
        PhaseRule(learn_frac=1.5)
    with pytest.raises(ValidationError):
        PhaseRule(delta=-0.1)


def test_run_phases_read_the_configured_rule_and_split():
    rows = (curve([2, 1.5, 1.2], [0.3, 0.5, 0.6], split="train")
            + curve([3, 2, 2.1], [0.3, 0.5, 0.55], split="validation")
            + curve([3, 2, 4.0], [0.3, 0.6, 0.62], split="gsm8k"))
    names = ["train", "validation", "gsm8k"]
    assert phase_split(names, PhaseRule()) == "gsm8k"
    assert phase_split(names, PhaseRule(split="validation")) == "validation"
    assert phase_split(names, PhaseRule(), valid_split="gsm8k") == "validation"  # the first non-validation split
    assert phase_split(["train", "validation"], PhaseRule()) == "validation"  # no test split: the last one
    cfg = RunConfig.model_validate({"phases": {"eps": 0.6}})
    report = detect_run_phases(rows, cfg)
    assert report.split == "gsm8k" and report.rule.eps == 0.6
    stored = report.to_dict()
    assert stored["rule"] == {"eps": 0.6, "delta": 0.05, "learn_frac": 0.8}  # the split is the report's own
    assert phases_are_current(stored, rows, cfg)
    assert not phases_are_current(stored, rows, RunConfig())
    assert not phases_are_current(stored, rows, RunConfig.model_validate({"phases": {"eps": 0.6, "split": "train"}}))
    assert detect_phases(rows, rule=PhaseRule(split="validation")).split == "validation"
