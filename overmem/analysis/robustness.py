"""Robustness to neutral prompt preambles (paper sec. 5.2, Table 3; after Kang et al. 2025).

Each test query is asked as is and once per preamble; greedy accuracy is reported per preamble,
with `avg` the mean over the preambles (the unperturbed prompt left out, as in Table 3) and
`drop` = accuracy without preamble - avg.

The paper's four preambles are "plausible introductory phrases that a model might itself
generate", appended to the query. By default (`position="response"`) the preamble therefore
opens the response: the prompt is the template followed by the preamble, and the model goes on
from there. `position="instruction"` instead puts it before the question, separated by a space.
The strings are the paper's, verbatim except that its typeset apostrophes (U+2019, which LaTeX
makes of a plain ') are written as the plain ASCII apostrophe a user or model would type.

`analysis.robustness.*`: `data` (default: the run's first test set), `size`, `paper_preambles`,
`preambles` (more: name -> text), `position`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ..config import AnalysisSettings, ConfigError
from ..data.example import Example, format_prompt
from .base import Analysis, AnalysisResult, Prepared, Progress, register
from .sampling import Decoding, accuracy_ci, check, decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

UNPERTURBED = "none"
PAPER_PREAMBLES = {
    "First": "First, let's tackle this step by step together.",
    "Today": "Today, we'll work through this problem together and find a clear solution.",
    "We": "We understand the problem we're tackling and will work together to solve it.",
    "Good": "That's a great question! We understand the problem we're tackling and will work together to solve it.",
}
Position = Literal["response", "instruction"]


def perturbed_prompt(question: str, preamble: str, position: Position = "response") -> str:
    """The paper's prompt for `question` with `preamble` opening the response or the instruction."""
    if not preamble:
        return format_prompt(question)
    if position == "response":
        return format_prompt(question) + preamble
    if position == "instruction":
        return format_prompt(question, preamble=preamble + " ")
    raise ValueError(f"position must be 'response' or 'instruction', got {position!r}")


def prompt_robustness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    preambles: Mapping[str, str] = PAPER_PREAMBLES,
    *,
    position: Position = "response",
    decoding: Decoding = Decoding(),
    n_boot: int = 1000,
    confidence: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """Greedy accuracy without preamble (`none`) and with each one (`<name>`, plus `_ci_low`,
    `_ci_high`), `avg` over the preambles and `drop` = none - avg; one row per example and prompt."""
    if UNPERTURBED in preambles:
        raise ValueError(f"preamble name {UNPERTURBED!r} is reserved for the unperturbed prompt")
    if not preambles:
        raise ValueError("no preambles to compare against the unperturbed prompt")
    metrics: dict[str, float] = {}
    rows = []
    for name, preamble in {UNPERTURBED: "", **preambles}.items():
        prompts = [perturbed_prompt(ex.question, preamble, position) for ex in examples]
        checked = [r[0] for r in check(examples, decode(model, tokenizer, prompts, decoding, progress, examples))]
        rows.extend({"preamble": name, "id": ex.id, "answer": ex.answer, **c} for ex, c in zip(examples, checked))
        stats = accuracy_ci([c["correct"] for c in checked], n_boot=n_boot, confidence=confidence, seed=decoding.seed)
        metrics.update({name: stats["accuracy"], f"{name}_ci_low": stats["ci_low"], f"{name}_ci_high": stats["ci_high"]})
    metrics["avg"] = float(np.mean([metrics[name] for name in preambles]))
    metrics["drop"] = metrics[UNPERTURBED] - metrics["avg"]
    metrics["n"] = len(examples)
    return AnalysisResult(metrics, rows)


class RobustnessSettings(AnalysisSettings):
    data: str | None = Field(None, description="dataset spec (default: the run's first test set)")
    size: int | None = Field(None, gt=0)
    paper_preambles: bool = Field(True, description="include the paper's four preambles (sec. 5.2)")
    preambles: dict[str, str] = Field(default_factory=dict, description="more preambles: name -> text")
    position: Position = Field(
        "response", description="where the preamble goes: opening the response, or before the question")


@register
class Robustness(Analysis[RobustnessSettings]):
    name = "robustness"
    description = "Greedy accuracy with neutral preambles (paper Table 3)"
    Settings = RobustnessSettings

    def prepare(self) -> Prepared:
        s, ctx = self.settings, self.ctx
        preambles = {**(PAPER_PREAMBLES if s.paper_preambles else {}), **s.preambles}
        if not preambles:
            raise ConfigError("analysis.robustness: no preambles (paper_preambles is false and preambles is empty)")
        if UNPERTURBED in preambles:
            raise ConfigError(f"analysis.robustness.preambles: the name {UNPERTURBED!r} is reserved")
        spec = s.data or ctx.first_test("analysis.robustness.data")
        examples = ctx.load(spec, s.size)
        settings = {"data": spec, "size": s.size, "preambles": preambles, "position": s.position,
                    "bootstrap": ctx.cfg.eval.bootstrap, "confidence": ctx.cfg.eval.confidence, "decoding": "greedy",
                    **ctx.common()}
        return Prepared(settings, (examples, preambles), len(examples) * (1 + len(preambles)))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        examples, preambles = data
        ev = self.ctx.cfg.eval
        return prompt_robustness(model, tokenizer, examples, preambles, position=self.settings.position,
                                 decoding=self.ctx.decoding(), n_boot=ev.bootstrap, confidence=ev.confidence,
                                 progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [("w/o perturb", UNPERTURBED), *[(n, n) for n in settings["preambles"]], ("Avg", "avg")]
