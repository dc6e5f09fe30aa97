"""The one record type every dataset is turned into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AnswerKind = Literal["numeric", "math", "choice", "open", "code"]

# Paper, appendix B.3: the prompt used for both training and evaluation.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One reasoning problem.

    `response` is the reference solution whose perplexity we track; `answer` is the final
    answer that generations are checked against, in the form `kind` expects
    (a number for "numeric", a LaTeX/plain expression for "math", a letter for "choice"; for
    "code" the reference program: generations are checked by running the tests in `meta`, see
    `overmem.data.code`).
    """

    id: str
    question: str
    response: str
    answer: str
    kind: AnswerKind = "numeric"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_answer_line(self) -> bool:
        """Whether a response ends with a `#### answer` line, where decoding may stop
        (`generation.stop_at_answer`). A program or an open-ended text has none: a `####` line in
        it is a comment or a heading, and the text goes on."""
        return self.kind in ("numeric", "math", "choice")


def format_prompt(question: str, template: str = PROMPT_TEMPLATE, preamble: str = "") -> str:
    """Render the prompt; `preamble` (robustness analysis) is prepended to the instruction."""
    instruction = f"{preamble}{question}" if preamble else question
    return template.format(instruction=instruction)
