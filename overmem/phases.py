"""Label each checkpoint's training phase from its perplexity and accuracy curve (paper Fig. 1).

The paper (Ruan et al. 2025, Fig. 1 and sec. 4) colours training stages black (low accuracy),
yellow (high accuracy, low perplexity) and purple (high accuracy, high perplexity: "over-
memorization"), and contrasts the last with classical overfitting (perplexity up, accuracy down).
It gives no numeric rule; this module defines one. Every comparison is against what the run had
reached *up to that checkpoint*, so a label never depends on later checkpoints (except the
"learned" threshold below) and the rule can be applied online during training.

The rule, for the checkpoints c_0 .. c_{n-1} of one split ordered by (epoch, step), with
perplexity p_i (the mean of per-example perplexities, `ppl`) and accuracy a_i:

    ppl_ratio_i = p_i / min_{j<=i} p_j              (>= 1; how far ppl sits above its running minimum)
    elevated_i  = ppl_ratio_i >= 1 + eps
    acc_peak_i  = max_{j<=i} a_j                    (best accuracy so far)
    acc_best    = max_j a_j                         (best accuracy of the whole run)
    L           = first i with a_i > 0 and a_i >= learn_frac * acc_best   ("learned the task")

    i < L                                   -> low_accuracy    (not learned yet: the black region)
    elevated_i and a_i >= acc_peak_i - delta -> over_memorized  (ppl up, accuracy held: purple)
    elevated_i                              -> overfitting     (ppl up, accuracy fell by > delta)
    a_i < learn_frac * acc_best             -> low_accuracy    (accuracy collapsed, ppl did not rise)
    otherwise                               -> healthy         (yellow)

Checkpoints whose accuracy is None (generation skipped, or open-ended answers, which have no
automatic check) can only be judged by perplexity; they
get `high_ppl` (elevated) or `low_ppl` (not elevated) and never count as over-memorized.
Comparisons treat values within 1e-9 as equal, so a value exactly on a threshold passes it.
Rows with `epoch` None (merged models) are not on the training curve and are listed in
`PhaseReport.excluded`. If the same (checkpoint, split) appears twice, the later row wins
(a re-evaluation appended to `dynamics.jsonl`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer

from .config import PhaseRule, RunConfig
from .data.splits import TRAIN, VALIDATION

Phase = Literal["low_accuracy", "healthy", "over_memorized", "overfitting", "high_ppl", "low_ppl"]
PHASES: tuple[str, ...] = ("low_accuracy", "healthy", "over_memorized", "overfitting", "high_ppl", "low_ppl")

THRESHOLD_TOL = 1e-9  # float slack for threshold comparisons (0.75 - 0.05 is not exactly 0.7)


class CheckpointPhase(BaseModel):
    """One checkpoint of the analysed split, its figures and its label."""

    checkpoint: str
    epoch: float
    step: int
    ppl: float
    accuracy: float | None
    ppl_ratio: float = Field(description="ppl / running minimum of ppl (>= 1)")
    acc_drop: float | None = Field(description="best accuracy so far minus this accuracy (>= 0)")
    label: Phase


class PhaseReport(BaseModel):
    """Phases of every checkpoint on one split, with the landmarks of the curve."""

    split: str
    rule: PhaseRule
    checkpoints: list[CheckpointPhase]
    ppl_min: float
    ppl_min_checkpoint: str
    acc_best: float | None
    acc_best_checkpoint: str | None
    learned_at: str | None = Field(description="first checkpoint past the low-accuracy phase")
    onset: str | None = Field(description="first over_memorized checkpoint")
    ppl_onset: str | None = Field(description="first checkpoint with elevated ppl, whatever its accuracy")
    overfitting_onset: str | None = Field(description="first overfitting checkpoint")
    excluded: list[str] = Field(description="checkpoints off the training curve (epoch None, e.g. merges)")
    warnings: list[str]

    @field_serializer("rule")
    def _thresholds(self, rule: PhaseRule) -> dict[str, float]:
        # The report names its split itself; the rule is recorded by its thresholds.
        return rule.model_dump(exclude={"split"})

    @property
    def labels(self) -> dict[str, str]:
        """checkpoint -> label, in training order."""
        return {c.checkpoint: c.label for c in self.checkpoints}

    def get(self, checkpoint: str) -> CheckpointPhase:
        for c in self.checkpoints:
            if c.checkpoint == checkpoint:
                return c
        raise KeyError(f"no checkpoint {checkpoint!r} in the phase report of split {self.split!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (what `RUN/phases.json` holds), with the `describe_phases`
        paragraph under "summary"; NaN becomes null. `PhaseReport.model_validate` reads it back."""
        return {**json.loads(self.model_dump_json()), "summary": describe_phases(self)}


# ---- rows -> curves (shared with selection and plotting) ---------------------------------------


def split_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Split names in order of first appearance."""
    return list(dict.fromkeys(r["split"] for r in rows))


def test_split_names(rows: Iterable[Mapping[str, Any]], valid_split: str = VALIDATION) -> list[str]:
    """Every split that is neither the training subset nor the validation set."""
    return [s for s in split_names(rows) if s not in (TRAIN, valid_split)]


def default_split(rows: Sequence[Mapping[str, Any]]) -> str:
    """The split phases are read from by default: the first test split."""
    tests = test_split_names(rows)
    if not tests:
        raise ValueError(f"no test split among {split_names(rows)}; pass split=... explicitly")
    return tests[0]


def phase_split(splits: Sequence[str], rule: PhaseRule, valid_split: str = VALIDATION) -> str:
    """The split a run reads its phases from: `rule.split`, else the first test split (neither the
    training subset nor `valid_split`), else the last split."""
    tests = [s for s in splits if s not in (TRAIN, valid_split)]
    return rule.split or (tests[0] if tests else splits[-1])


def detect_run_phases(rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> PhaseReport:
    """The phases of a run (what `phases.json` holds): its phase rule on its `phase_split`."""
    split = phase_split(split_names(rows), cfg.phases, cfg.selection.valid_split)
    return detect_phases(rows, split=split, rule=cfg.phases)


def phases_are_current(stored: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> bool:
    """Whether a stored `phases.json` was made with `cfg`'s phase rule on the split it names now."""
    split = phase_split(split_names(rows), cfg.phases, cfg.selection.valid_split)
    return stored.get("split") == split and stored.get("rule") == cfg.phases.model_dump(exclude={"split"})


def split_rows(rows: Iterable[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """All rows of `split`, one per checkpoint (the later row wins), in file order."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["split"] == split:
            latest.pop(r["checkpoint"], None)  # re-insert so order follows the winning row
            latest[r["checkpoint"]] = dict(r)
    return list(latest.values())


def split_curve(rows: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """Training-curve rows of `split` (epoch not None), sorted by (epoch, step).

    Raises ValueError if the split is absent or a row has no finite positive `ppl`.
    """
    present = split_names(rows)
    if split not in present:
        raise ValueError(f"split {split!r} not in the dynamics rows; splits present: {present}")
    curve = sorted((r for r in split_rows(rows, split) if r.get("epoch") is not None), key=_order)
    for r in curve:
        ppl = r.get("ppl")
        if ppl is None or not math.isfinite(ppl) or ppl <= 0:
            raise ValueError(f"checkpoint {r['checkpoint']!r} split {split!r} has no finite positive ppl ({ppl!r})")
    return curve


def _order(row: Mapping[str, Any]) -> tuple[float, int]:
    return (float(row["epoch"]), int(row.get("step") or 0))


# ---- the rule ----------------------------------------------------------------------------------


def detect_phases(
    rows: Sequence[Mapping[str, Any]], split: str | None = None, rule: PhaseRule | None = None
) -> PhaseReport:
    """Label every training checkpoint of `split` (default: `rule.split`, else the first test split)
    by `rule` (default: `PhaseRule()`)."""
    rule = rule or PhaseRule()
    split = split or rule.split or default_split(rows)
    curve = split_curve(rows, split)
    if not curve:
        raise ValueError(f"split {split!r} has only off-curve rows (epoch None); nothing to label")
    excluded = [r["checkpoint"] for r in split_rows(rows, split) if r.get("epoch") is None]

    accs = [r.get("accuracy") for r in curve]
    measured = [a for a in accs if a is not None]
    acc_best = max(measured) if measured else None
    learned = _learned_index(accs, acc_best, rule.learn_frac)

    out: list[CheckpointPhase] = []
    ppl_min, acc_peak = math.inf, None
    for i, (r, acc) in enumerate(zip(curve, accs)):
        ppl = float(r["ppl"])
        ppl_min = min(ppl_min, ppl)
        if acc is not None:
            acc_peak = acc if acc_peak is None else max(acc_peak, acc)
        ratio = ppl / ppl_min
        elevated = ratio >= 1 + rule.eps - THRESHOLD_TOL
        drop = None if acc is None else acc_peak - acc
        out.append(
            CheckpointPhase(
                checkpoint=r["checkpoint"], epoch=float(r["epoch"]), step=int(r.get("step") or 0), ppl=ppl,
                accuracy=acc, ppl_ratio=ratio, acc_drop=drop,
                label=_label(i, elevated, acc, drop, learned, acc_best, rule),
            )
        )

    i_min = min(range(len(curve)), key=lambda i: (curve[i]["ppl"], i))  # ties: the earliest
    i_best = None if acc_best is None else next(i for i, a in enumerate(accs) if a == acc_best)
    return PhaseReport(
        split=split,
        rule=rule,
        checkpoints=out,
        ppl_min=float(curve[i_min]["ppl"]),
        ppl_min_checkpoint=curve[i_min]["checkpoint"],
        acc_best=acc_best,
        acc_best_checkpoint=None if i_best is None else curve[i_best]["checkpoint"],
        learned_at=None if learned >= len(curve) else curve[learned]["checkpoint"],
        onset=_first(out, {"over_memorized"}),
        ppl_onset=next((c.checkpoint for c in out if c.ppl_ratio >= 1 + rule.eps - THRESHOLD_TOL), None),
        overfitting_onset=_first(out, {"overfitting"}),
        excluded=excluded,
        warnings=_warnings(curve, accs, acc_best, i_best, rule),
    )


def _learned_index(accs: Sequence[float | None], acc_best: float | None, learn_frac: float) -> int:
    """First index whose accuracy is > 0 and >= learn_frac * acc_best; len(accs) if none."""
    for i, a in enumerate(accs):
        if a is not None and acc_best is not None and a > 0 and a >= learn_frac * acc_best - THRESHOLD_TOL:
            return i
    return len(accs)


def _label(
    i: int, elevated: bool, acc: float | None, drop: float | None, learned: int, acc_best: float | None, rule: PhaseRule
) -> str:
    if acc is None:
        return "high_ppl" if elevated else "low_ppl"
    assert drop is not None and acc_best is not None  # acc measured => peak and best exist
    if i < learned:
        return "low_accuracy"
    if elevated:
        return "over_memorized" if drop <= rule.delta + THRESHOLD_TOL else "overfitting"
    if acc < rule.learn_frac * acc_best - THRESHOLD_TOL:
        return "low_accuracy"
    return "healthy"


def _first(checkpoints: Sequence[CheckpointPhase], labels: set[str]) -> str | None:
    return next((c.checkpoint for c in checkpoints if c.label in labels), None)


def _warnings(
    curve: Sequence[Mapping[str, Any]], accs: Sequence[float | None], acc_best: float | None, i_best: int | None,
    rule: PhaseRule,
) -> list[str]:
    notes = []
    if len(curve) == 1:
        notes.append("only one checkpoint: there is no curve to compare against, so the label is trivial")
    missing = sum(a is None for a in accs)
    if acc_best is None:
        notes.append("accuracy was not measured (generation skipped, or open-ended answers with no automatic "
                     "check): labels come from perplexity only")
    elif missing:
        notes.append(f"accuracy missing at {missing} checkpoint(s): those are labelled from perplexity only")
    if acc_best is not None and acc_best <= 0:
        notes.append("accuracy is 0 at every checkpoint: the model never learned the task")
    if i_best is not None:
        low, high = curve[i_best].get("accuracy_ci_low"), curve[i_best].get("accuracy_ci_high")
        if low is not None and high is not None and (high - low) / 2 > rule.delta:
            notes.append(
                f"delta={rule.delta:g} is below the accuracy CI half-width {(high - low) / 2:.3f} at the best "
                "checkpoint: accuracy changes that small are sampling noise; consider "
                f"PhaseRule(delta={(high - low) / 2:.2f})"
            )
    return notes


# ---- words -------------------------------------------------------------------------------------


def describe_phases(report: PhaseReport) -> str:
    """One paragraph saying what happened on the analysed split, with the numbers behind it."""
    rule = report.rule
    sentences = [_headline(report)]
    if report.overfitting_onset:
        c = report.get(report.overfitting_onset)
        sentences.append(
            f"Overfitting from {c.checkpoint}: perplexity {c.ppl_ratio:.1f}x its minimum so far and accuracy "
            f"{c.accuracy:.3f}, {c.acc_drop:.3f} below its best so far (tolerance {rule.delta:g})."
        )
    if report.acc_best is not None:
        learned = f"reached at {report.learned_at}" if report.learned_at else "never reached"
        sentences.append(
            f"Best accuracy {report.acc_best:.3f} ({report.acc_best_checkpoint}); the learned threshold "
            f"{rule.learn_frac:g} x best is {learned}."
        )
    counts = {p: sum(c.label == p for c in report.checkpoints) for p in PHASES}
    tally = ", ".join(f"{counts[p]} {p}" for p in PHASES if counts[p])
    sentences.append(f"Of {len(report.checkpoints)} checkpoints: {tally}.")
    sentences += [f"Note: {w}." for w in report.warnings]
    return " ".join(sentences)


def _headline(report: PhaseReport) -> str:
    rule, split = report.rule, report.split
    if report.onset:
        c = report.get(report.onset)
        low = min(report.checkpoints[: report.checkpoints.index(c) + 1], key=lambda x: x.ppl)
        return (
            f"On {split}, over-memorization starts at {c.checkpoint} (epoch {c.epoch:g}): perplexity {c.ppl:.3g} is "
            f"{c.ppl_ratio:.1f}x its minimum so far ({low.ppl:.3g} at {low.checkpoint}) while accuracy "
            f"{c.accuracy:.3f} stays within {rule.delta:g} of its best so far {c.accuracy + c.acc_drop:.3f}."
        )
    if report.ppl_onset is None:
        worst = max(report.checkpoints, key=lambda c: c.ppl_ratio)
        return (
            f"On {split}, no over-memorization: perplexity peaks at {worst.ppl_ratio:.2f}x its minimum so far "
            f"({worst.checkpoint}), below the {1 + rule.eps:g}x threshold."
        )
    c = report.get(report.ppl_onset)
    if report.acc_best is None:
        return (
            f"On {split}, accuracy was not measured; perplexity rises to {c.ppl_ratio:.1f}x its minimum so far at "
            f"{c.checkpoint} (epoch {c.epoch:g}). Telling over-memorization from overfitting needs accuracy."
        )
    return (
        f"On {split}, no over-memorization: perplexity first reaches {c.ppl_ratio:.1f}x its minimum so far at "
        f"{c.checkpoint}, but accuracy was not high there ({c.label})."
    )
