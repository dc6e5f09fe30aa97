"""Choose the checkpoint to keep (paper sec. 6.1, Table 4).

The paper compares selecting by validation perplexity (picks an early checkpoint, weaker in-
domain), by validation accuracy (picks a late, over-memorized one, weaker out of domain) and by
the last checkpoint, and recommends "the highest validation accuracy within a certain range of
validation perplexity". Here that range is relative:

    recommended = argmax validation accuracy over checkpoints with
                  valid_ppl <= (1 + ppl_band) * min valid_ppl

Ties on accuracy go to the lower validation perplexity (the less memorized model), then to the
earlier checkpoint (less training). The minimum is taken over checkpoints where both validation
perplexity and accuracy were measured. `last`, `min_valid_ppl` (ties: earlier) and `max_valid_acc`
(ties: earlier) are reported beside it, each with the test figures of every test split, so a
run's `selection.json` reproduces Table 4. Only training-curve checkpoints (epoch not None) are
candidates; off-curve rows such as merges are listed in `others` for comparison.

Without any validation accuracy (open-ended answers, which have no automatic check, or generation
skipped) there is nothing to weigh perplexity against: `recommended` falls back to the lowest
validation perplexity (ties: earlier), `max_valid_acc` is left out, and `selection.json` says so
in `rule` ("lowest_valid_ppl" instead of "ppl_band") and in the reason.

Which checkpoint to keep has one answer, `checkpoint_to_keep`: the `recommended` rule on the
validation split; for a run without validation accuracy (a training script tracking only test
sets), the same rule on the phase split; without any accuracy, the lowest phase-split
perplexity. `overmem select` (`selection.json`), the training callback (`keep.json`) and the
report's token view all use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from pydantic import BaseModel, Field

from .config import RunConfig
from .data.splits import VALIDATION
from .phases import THRESHOLD_TOL, split_curve, split_names, split_rows, test_split_names
from .results import atomic_write_text

CRITERIA: tuple[str, ...] = ("recommended", "last", "min_valid_ppl", "max_valid_acc")
FALLBACK_RULE = "lowest_valid_ppl"  # `recommended` when the validation split has no accuracy


class SplitFigures(BaseModel):
    """A checkpoint's figures on one split (None where not evaluated)."""

    n: int | None = None
    ppl: float | None = None
    ppl_token: float | None = None
    accuracy: float | None = None
    accuracy_ci_low: float | None = None
    accuracy_ci_high: float | None = None


class Choice(BaseModel):
    """The checkpoint one criterion picks, with why and how it does on every tracked split."""

    criterion: str
    checkpoint: str
    epoch: float | None
    step: int | None
    valid: SplitFigures
    tests: dict[str, SplitFigures]
    mean_test_accuracy: float | None = Field(description="unweighted mean over test splits with accuracy")
    reason: str


class SelectionResult(BaseModel):
    """Every criterion's choice; `choices` is keyed by criterion in `CRITERIA` order."""

    valid_split: str
    test_splits: list[str]
    ppl_band: float
    rule: str = Field("ppl_band", description=f"how `recommended` was chosen: 'ppl_band' (paper sec. 6.1), or "
                      f"'{FALLBACK_RULE}' when the validation split has no accuracy")
    choices: dict[str, Choice]
    others: list[Choice] = Field(description="off-curve checkpoints (e.g. merges), for comparison")

    @property
    def recommended(self) -> Choice:
        return self.choices["recommended"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (what `RUN/selection.json` holds); NaN becomes null."""
        return json.loads(self.model_dump_json())


def select_checkpoint(
    rows: Sequence[Mapping[str, Any]],
    *,
    valid_split: str = VALIDATION,
    test_splits: Sequence[str] | None = None,
    ppl_band: float = 0.05,
) -> SelectionResult:
    """Apply every selection criterion to the dynamics rows of one run.

    `test_splits` defaults to every split other than "train" and `valid_split`. Raises
    ValueError if the validation split is missing or has no training-curve row, or a test split is
    missing. Without validation accuracy, `recommended` is the fallback rule (module docstring).
    """
    if ppl_band < 0:
        raise ValueError(f"ppl_band must be >= 0, got {ppl_band}")
    present = split_names(rows)
    if valid_split not in present:
        raise ValueError(
            f"validation split {valid_split!r} not in the dynamics rows; splits present: {present}. "
            "Track a validation set or pass valid_split=..."
        )
    curve = split_curve(rows, valid_split)
    if not curve:
        raise ValueError(f"validation split {valid_split!r} has no training-curve rows; no checkpoint to select")
    scored = [r for r in curve if r.get("accuracy") is not None]
    tests = list(test_splits) if test_splits is not None else test_split_names(rows, valid_split)
    missing = [s for s in tests if s not in present]
    if missing:
        raise ValueError(f"test split(s) {missing} not in the dynamics rows; splits present: {present}")
    by_split = {s: {r["checkpoint"]: r for r in split_rows(rows, s)} for s in tests}

    def choice(criterion: str, row: Mapping[str, Any], reason: str) -> Choice:
        figures = {s: _figures(by_split[s].get(row["checkpoint"])) for s in tests}
        accs = [f.accuracy for f in figures.values() if f.accuracy is not None]
        return Choice(
            criterion=criterion, checkpoint=row["checkpoint"], epoch=row.get("epoch"), step=row.get("step"),
            valid=_figures(row), tests=figures, mean_test_accuracy=mean(accs) if accs else None, reason=reason,
        )

    order = {r["checkpoint"]: i for i, r in enumerate(curve)}
    low = min(curve, key=lambda r: (r["ppl"], order[r["checkpoint"]]))
    if scored:
        rule = "ppl_band"
        rec, reason = _recommend(curve, ppl_band, "validation")
    else:  # FALLBACK_RULE: nothing to weigh perplexity against
        rule = FALLBACK_RULE
        rec, reason = low, (f"lowest validation perplexity {low['ppl']:.4g}: the fallback rule, as {valid_split!r} "
                            "has no accuracy (open-ended answers have no automatic check, or generation was skipped)")
    last = curve[-1]
    choices = [
        choice("recommended", rec, reason),
        choice("last", last, f"last checkpoint of the run (epoch {last['epoch']:g}, step {last.get('step')})"),
        choice("min_valid_ppl", low, f"lowest validation perplexity {low['ppl']:.4g}"),
    ]
    if scored:
        top = min(scored, key=lambda r: (-r["accuracy"], order[r["checkpoint"]]))
        choices.append(choice(
            "max_valid_acc", top,
            f"highest validation accuracy {top['accuracy']:.3f}; its validation ppl is "
            f"{top['ppl'] / low['ppl']:.2f}x the minimum",
        ))
    others = [
        choice("off_curve", r, "not on the training curve (epoch None, e.g. a merge); shown for comparison")
        for r in split_rows(rows, valid_split)
        if r.get("epoch") is None
    ]
    return SelectionResult(
        valid_split=valid_split, test_splits=tests, ppl_band=ppl_band, rule=rule,
        choices={c.criterion: c for c in choices}, others=others,
    )


def _recommend(curve: Sequence[Mapping[str, Any]], ppl_band: float, role: str) -> tuple[Mapping[str, Any], str]:
    """The paper's rule on one split's training curve (some rows with accuracy): the highest
    accuracy among checkpoints whose ppl is within `ppl_band` (relative) of the minimum; ties to the
    lower ppl, then the earlier checkpoint. Returns the row and the reason, naming the split `role`."""
    order = {r["checkpoint"]: i for i, r in enumerate(curve)}
    scored = [r for r in curve if r.get("accuracy") is not None]
    ppl_min = min(r["ppl"] for r in scored)
    limit = (1 + ppl_band) * ppl_min
    band = [r for r in scored if r["ppl"] <= limit + THRESHOLD_TOL]  # a ppl on the edge is inside
    rec = min(band, key=lambda r: (-r["accuracy"], r["ppl"], order[r["checkpoint"]]))
    reason = (f"highest {role} accuracy {rec['accuracy']:.3f} among the {len(band)} checkpoint(s) with {role} "
              f"ppl <= {limit:.4g} ({1 + ppl_band:g} x the minimum {ppl_min:.4g}): "
              + ", ".join(r["checkpoint"] for r in band))
    return rec, reason


class Keep(BaseModel):
    """The checkpoint to keep, the split the rule read, and why."""

    checkpoint: str
    split: str
    reason: str


def checkpoint_to_keep(
    rows: Sequence[Mapping[str, Any]], *, phase_split: str, valid_split: str = VALIDATION, ppl_band: float = 0.05,
) -> Keep:
    """The one answer to "which checkpoint do I keep" (see the module docstring).

    With validation accuracy at some training checkpoint it is `select_checkpoint`'s recommended
    checkpoint. Otherwise the same rule reads `phase_split` (the split the phases are read from),
    and when that has no accuracy either, its lowest perplexity (ties: the earlier checkpoint).
    Raises ValueError if the split read has no training-curve rows.
    """
    valid = [r for r in split_rows(rows, valid_split) if r.get("epoch") is not None]
    if any(r.get("accuracy") is not None for r in valid):
        rec = select_checkpoint(rows, valid_split=valid_split, ppl_band=ppl_band).recommended
        return Keep(checkpoint=rec.checkpoint, split=valid_split, reason=rec.reason)
    curve = split_curve(rows, phase_split)
    if not curve:
        raise ValueError(f"split {phase_split!r} has no training-curve rows; no checkpoint to keep")
    if any(r.get("accuracy") is not None for r in curve):
        row, reason = _recommend(curve, ppl_band, phase_split)
        reason += f" (no {valid_split} accuracy)"
    else:
        row = min(curve, key=lambda r: r["ppl"])  # min keeps the first of equal values: the earlier
        reason = f"lowest {phase_split} perplexity {row['ppl']:.4g} (no accuracy measured)"
    return Keep(checkpoint=row["checkpoint"], split=phase_split, reason=reason)


def selectable(rows: Iterable[Mapping[str, Any]], valid_split: str) -> bool:
    """Whether a run's dynamics can be selected from: the validation split was tracked (with or
    without accuracy; without, the fallback rule applies)."""
    return any(r["split"] == valid_split for r in rows)


def select_run_checkpoint(rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> SelectionResult:
    """Every criterion on a run's rows with the run's selection settings (what `selection.json` holds);
    the test splits are all splits but the training subset and the validation split."""
    return select_checkpoint(rows, valid_split=cfg.selection.valid_split, ppl_band=cfg.selection.ppl_band)


def selection_is_current(stored: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> bool:
    """Whether a stored `selection.json` was made with `cfg`'s settings on these rows' splits."""
    valid = cfg.selection.valid_split
    return (stored.get("valid_split") == valid and stored.get("ppl_band") == cfg.selection.ppl_band
            and stored.get("test_splits") == test_split_names(rows, valid))


def _figures(row: Mapping[str, Any] | None) -> SplitFigures:
    if row is None:
        return SplitFigures()
    return SplitFigures(**{k: row.get(k) for k in SplitFigures.model_fields})


def write_selection(result: SelectionResult, path: str | Path) -> Path:
    """Write `result` as JSON atomically (temp file + os.replace); returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")
    return path


def read_selection(path: str | Path) -> SelectionResult:
    """Read a `selection.json` written by `write_selection`."""
    return SelectionResult.model_validate_json(Path(path).read_text())


def format_selection(result: SelectionResult) -> str:
    """Text table in the spirit of the paper's Table 4 (accuracies in percent, 95% CI in brackets)."""
    header = ["criterion", "checkpoint", "epoch", f"{result.valid_split} ppl", f"{result.valid_split} acc"]
    for s in result.test_splits:
        header += [f"{s} acc [CI]", f"{s} ppl"]
    with_mean = len(result.test_splits) > 1
    if with_mean:
        header.append("mean test acc")
    body = []
    for c in [*result.choices.values(), *result.others]:
        epoch = "-" if c.epoch is None else f"{c.epoch:g}"
        cells = [c.criterion, c.checkpoint, epoch, _num(c.valid.ppl), _pct(c.valid.accuracy)]
        for s in result.test_splits:
            f = c.tests[s]
            cells += [_pct_ci(f), _num(f.ppl)]
        if with_mean:
            cells.append(_pct(c.mean_test_accuracy))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    # names left-aligned, numbers right-aligned
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{c.criterion}: {c.checkpoint} - {c.reason}" for c in result.choices.values()]
    return "\n".join(lines)


def format_selection_json(data: Mapping[str, Any]) -> str:
    """`format_selection` for the dict of a `selection.json` file."""
    return format_selection(SelectionResult.model_validate(data))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pct_ci(f: SplitFigures) -> str:
    if f.accuracy is None:
        return "-"
    if f.accuracy_ci_low is None or f.accuracy_ci_high is None:
        return _pct(f.accuracy)
    return f"{_pct(f.accuracy)} [{_pct(f.accuracy_ci_low)}, {_pct(f.accuracy_ci_high)}]"
