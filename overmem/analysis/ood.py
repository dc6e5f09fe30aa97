"""Accuracy on in-distribution and out-of-distribution test sets (paper sec. 5.1, Table 2).

Greedy accuracy per set with a percentile-bootstrap interval, the mean over the in-distribution
sets (`id_avg`) and over the others (`ood_avg`), each an unweighted mean of per-set accuracies
as in the paper's table. Sets are dataset specs; the loaders already render what a benchmark
needs into the question (TabMWP's table, MMLU-STEM's lettered choices) and give the answer
kind that `is_correct` checks (numeric, math via math-verify, choice).

`analysis.ood.*`: `sets` (name -> dataset spec; default `default_sets`), `id_sets`, `size`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ..config import AnalysisSettings, ConfigError
from ..data.example import Example, format_prompt
from .base import Analysis, AnalysisResult, Prepared, Progress, register
from .sampling import Decoding, accuracy_ci, check, decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The paper's OOD benchmarks (Table 2) that have a local copy; Minerva-MATH has none. MATH counts
# as in-distribution there, because MetaMathQA is synthesized from it.
PAPER_SETS = {
    "math500": "math500:test", "svamp": "svamp", "asdiv": "asdiv", "mawps": "mawps",
    "tabmwp": "tabmwp:test", "mmlu_stem": "mmlu_stem",
}
PAPER_ID_SETS = ("math500",)
SYNTHETIC_SETS = {name: f"synthetic:{name}" for name in ("ood_steps", "ood_wording", "ood_numbers", "ood_distractor")}


def default_sets(tests: Mapping[str, str], train_source: str) -> tuple[dict[str, str], list[str]]:
    """(sets, id_sets) when none are configured: the run's test sets (in-distribution) plus the
    synthetic OOD variants for a model trained on `synthetic`, else the paper's benchmarks."""
    sets = dict(tests)
    id_sets = list(tests)
    extra = SYNTHETIC_SETS if train_source == "synthetic" else PAPER_SETS
    for name, spec in extra.items():
        if name not in sets and spec not in sets.values():
            sets[name] = spec
            if name in PAPER_ID_SETS and extra is PAPER_SETS:
                id_sets.append(name)
    return sets, id_sets


def ood_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Mapping[str, Sequence[Example]],
    *,
    id_sets: Sequence[str] = (),
    decoding: Decoding = Decoding(),
    n_boot: int = 1000,
    confidence: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """Greedy accuracy per set: metrics `<set>`, `<set>_ci_low`, `<set>_ci_high`, `<set>_n`,
    `id_avg` and `ood_avg` (NaN when there is no such set); one row per example and set."""
    unknown = [s for s in id_sets if s not in sets]
    if unknown:
        raise ValueError(f"id_sets names sets that are not evaluated: {', '.join(unknown)}")
    metrics: dict[str, float] = {}
    rows = []
    for name, examples in sets.items():
        texts = decode(model, tokenizer, [format_prompt(ex.question) for ex in examples], decoding, progress, examples)
        checked = [responses[0] for responses in check(examples, texts)]
        for ex, c in zip(examples, checked):
            rows.append({"set": name, "id": ex.id, "answer": ex.answer, **c})
        stats = accuracy_ci([c["correct"] for c in checked], n_boot=n_boot, confidence=confidence, seed=decoding.seed)
        metrics.update({name: stats["accuracy"], f"{name}_ci_low": stats["ci_low"],
                        f"{name}_ci_high": stats["ci_high"], f"{name}_n": stats["n"]})
    for key, names in (("id_avg", [s for s in sets if s in id_sets]), ("ood_avg", [s for s in sets if s not in id_sets])):
        metrics[key] = float(np.mean([metrics[s] for s in names])) if names else float("nan")
    return AnalysisResult(metrics, rows)


class OodSettings(AnalysisSettings):
    sets: dict[str, str] | None = Field(
        None, description="name -> dataset spec (default: the run's tests + synthetic OOD or the paper's benchmarks)")
    id_sets: list[str] | None = Field(None, description="in-distribution set names, left out of the OOD average")
    size: int | None = Field(None, gt=0, description="seeded sample per set (None: all)")


@register
class Ood(Analysis[OodSettings]):
    name = "ood"
    description = "Greedy accuracy on in-distribution and OOD sets (paper Table 2)"
    Settings = OodSettings

    def prepare(self) -> Prepared:
        s, ctx = self.settings, self.ctx
        sets, id_sets = (dict(s.sets), []) if s.sets else default_sets(ctx.cfg.data.tests, ctx.train_source)
        if s.id_sets is not None:
            id_sets = list(s.id_sets)
        unknown = [n for n in id_sets if n not in sets]
        if unknown:
            raise ConfigError(f"analysis.ood.id_sets: {', '.join(unknown)} not among the sets ({', '.join(sets)})")
        data = {name: ctx.load(spec, s.size) for name, spec in sets.items()}
        settings = {"sets": sets, "id_sets": id_sets, "size": s.size, "bootstrap": ctx.cfg.eval.bootstrap,
                    "confidence": ctx.cfg.eval.confidence, "decoding": "greedy", **ctx.common()}
        return Prepared(settings, (data, id_sets), sum(len(v) for v in data.values()))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        sets, id_sets = data
        ev = self.ctx.cfg.eval
        return ood_accuracy(model, tokenizer, sets, id_sets=id_sets, decoding=self.ctx.decoding(), n_boot=ev.bootstrap,
                            confidence=ev.confidence, progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [*[(n, n) for n in settings["sets"]], ("ID avg", "id_avg"), ("OOD avg", "ood_avg")]
