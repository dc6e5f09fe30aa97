"""Code generation: the program a generation stands for, its tests run in the sandbox, and the
code datasets (`humaneval`, `codefeedback`).

A code example (`kind="code"`) keeps its reference solution in `response` (the perplexity target)
and, when it can be checked, its tests in `meta`: `prompt` (the code the solution completes:
imports, helpers, the signature and docstring), `test` (a `check(candidate)` function) and
`entry_point` (the function `check` is given). `answer` holds the reference program (the code of
the response). Correctness is functional: the program of a generation passes when `check` returns
with each call of `candidate` answered by the program's `entry_point`; the program and the tests
run in two sandboxed processes, so the program cannot forge the verdict (`overmem.sandbox.run_tests`).

The program of a generation (`extract_program`) follows the usual HumanEval conventions:
1. A chat-style answer with fenced blocks (```python ... ```; an unclosed fence, cut off by the
   generation limit, runs to the end): the first block that defines the entry point, else the
   first Python (or untagged) block, else the first block.
2. Code that defines the entry point at the start of a line is a whole function (with its own
   helpers and imports): it is used as is, after the prompt, whose imports and helpers it keeps
   (the prompt's docstring-only definition is replaced by the later one). Unfenced text keeps the
   lines from the first `import`/`from`/`def`/`class`/`@` line, and stops at the first line at
   the left margin that is none of these nor a comment (the prose after the code).
3. Anything else is a bare completion of the prompt (Chen et al. 2021): the prompt followed by
   the text, which (unfenced) is cut at the first of the HumanEval stop sequences
   `\\nclass`, `\\ndef`, `\\n#`, `\\nif`, `\\nprint` and a closing fence.
Without a prompt (a CodeFeedback example), the program is the code itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from overmem.data.answers import is_correct
from overmem.data.example import Example
from overmem.data.readers import Row, local_or_hub_rows, required_field, rows_to_examples
from overmem.data.registry import register_dataset

# Stop sequences of bare completions (Chen et al. 2021, the HumanEval paper), and a closing fence.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON_TAGS = ("", "python", "py", "python3")
_CODE_START_RE = re.compile(r"^(?:import\s|from\s|def\s|class\s|async\s+def\s|@)", re.M)
_TOP_LEVEL_CODE_RE = re.compile(r"(?:import\s|from\s|def\s|class\s|async\s+def\s|@|#|if __name__)")


def _defines(code: str, entry_point: str | None) -> bool:
    name = re.escape(entry_point) if entry_point else r"\w+"
    return re.search(rf"^(?:async\s+)?def\s+{name}\s*\(", code, re.M) is not None


def _fenced_block(text: str, entry_point: str | None) -> str | None:
    blocks = [(tag.lower(), body) for tag, body in _FENCE_RE.findall(text)]
    if not blocks:
        return None
    for tag, body in blocks:
        if entry_point and tag in _PYTHON_TAGS and _defines(body, entry_point):
            return body
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    return python[0] if python else blocks[0][1]


def _code_lines(text: str) -> str:
    """Unfenced whole-function text without the prose before and after its code."""
    start = _CODE_START_RE.search(text)
    lines = text[start.start() if start else 0 :].splitlines()
    kept = lines[:1]
    for line in lines[1:]:
        if line and not line[0].isspace() and not _TOP_LEVEL_CODE_RE.match(line):
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def _cut_at_stop(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i != -1), default=len(completion))
    return completion[:cut]


def extract_program(generation: str, prompt: str = "", entry_point: str | None = None) -> str | None:
    """The program a generation stands for (rules in the module docstring); None when the
    generation holds no code (empty, or an empty fenced block)."""
    fenced = _fenced_block(generation, entry_point)
    code = fenced if fenced is not None else generation
    if not code.strip():
        return None
    if _defines(code, entry_point):
        if fenced is None:
            code = _code_lines(code)
        return f"{prompt}\n{code}" if prompt else code
    if not prompt:
        return code if fenced is not None else _code_lines(code)
    return prompt + (code if fenced is not None else _cut_at_stop(code))


def can_check(example: Example) -> bool:
    """Whether generations for `example` can be checked: any non-code example, and code with tests."""
    return example.kind != "code" or bool(example.meta.get("test") and example.meta.get("entry_point"))


def ensure_sandbox(examples: Iterable[Example]) -> None:
    """Before any work: when some of `examples` are code with tests, a sandbox must run here
    (`overmem.sandbox.select_isolation`, probed once a process), so that a machine without one
    fails now with `SandboxUnavailable`, not after training."""
    if any(ex.kind == "code" and can_check(ex) for ex in examples):
        from overmem.sandbox import select_isolation

        select_isolation()


@dataclass(frozen=True)
class CodeCheck:
    """One generation run against its example's tests: the program (None: no code found), whether
    it passed, the sandbox status and the failure reason, and the sandbox's isolation."""

    program: str | None
    passed: bool
    status: str
    failure: str | None
    sandbox: str


def check_generations(
    examples: Sequence[Example], generations: Sequence[str], *, limits=None, workers: int | None = None,
) -> list[CodeCheck]:
    """Run each generation's program against its example's tests, in parallel sandboxes.

    Every example must have tests (`can_check`); `limits` are `overmem.sandbox.Limits` (the
    defaults when None)."""
    from overmem.sandbox import Limits, TestedProgram, run_tests, select_isolation

    if len(examples) != len(generations):
        raise ValueError(f"{len(examples)} examples but {len(generations)} generations")
    untested = [ex.id for ex in examples if ex.kind != "code" or not can_check(ex)]
    if untested:
        raise ValueError(f"examples without code tests cannot be run: {', '.join(untested[:3])}")
    isolation = select_isolation()
    programs = [extract_program(text, ex.meta.get("prompt", ""), ex.meta["entry_point"])
                for ex, text in zip(examples, generations)]
    # The prompt is the dataset's (trusted): the checker runs it before the tests, which may use
    # its helpers (HumanEval/38's `encode_cyclic`); the program is the generation's.
    runnable = [(i, TestedProgram(p, ex.meta["test"], ex.meta["entry_point"], ex.meta.get("prompt", "")))
                for i, (ex, p) in enumerate(zip(examples, programs)) if p is not None]
    outcomes = run_tests([tested for _, tested in runnable], limits=limits or Limits(), isolation=isolation,
                         workers=workers)
    by_index = {i: outcome for (i, _), outcome in zip(runnable, outcomes)}
    described = isolation.describe()
    checks = []
    for i, program in enumerate(programs):
        outcome = by_index.get(i)
        if outcome is None:
            checks.append(CodeCheck(None, False, "no_code", "no code in the generation", described))
        else:
            checks.append(CodeCheck(program, outcome.passed, outcome.status, outcome.reason, described))
    return checks


@dataclass(frozen=True)
class AnswerCheck:
    """One generation checked against its example: the answer extracted from it (code: the
    program), whether it is correct, and for code the sandbox run (`CodeCheck`, else None)."""

    extracted: str | None
    correct: bool
    code: CodeCheck | None = None


def check_answers(
    examples: Sequence[Example], generations: Sequence[str], *, limits=None, workers: int | None = None,
) -> list[AnswerCheck]:
    """Check each generation against its example, in order: the final answer by the rules of the
    example's kind (`overmem.data.answers.is_correct`), code by running its tests in parallel
    sandboxes (`check_generations`, with `limits` and `workers`). Every example must be checkable
    (`can_check`) and not open-ended."""
    checks: list[AnswerCheck | None] = [None] * len(examples)
    code = [i for i, ex in enumerate(examples) if ex.kind == "code"]
    for i, (ex, text) in enumerate(zip(examples, generations)):
        if ex.kind != "code":
            checks[i] = AnswerCheck(*is_correct(text, ex.answer, ex.kind))
    if code:
        runs = check_generations([examples[i] for i in code], [generations[i] for i in code], limits=limits,
                                 workers=workers)
        for i, run in zip(code, runs):
            checks[i] = AnswerCheck(run.program, run.passed, run)
    return checks


# --------------------------------------------------------------------------------------------
# Datasets

# The instruction of a HumanEval problem (the paper's template wraps it, `format_prompt`).
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function in a Python code block.\n\n"
    "```python\n{prompt}```"
)


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _humaneval_example(row: Row, index: int) -> Example:
    prompt = str(required_field(row, "prompt"))
    solution = str(required_field(row, "canonical_solution"))
    entry_point = str(required_field(row, "entry_point"))
    meta = {"prompt": prompt, "test": str(required_field(row, "test")), "entry_point": entry_point}
    program = prompt + solution
    task_id = str(row.get("task_id") or f"HumanEval/{index}")
    return Example(task_id, HUMANEVAL_INSTRUCTION.format(prompt=prompt), _fenced(program), program, "code", meta)


@register_dataset("humaneval", kind="code", hub_id="openai/openai_humaneval", splits=("test",),
                  description="HumanEval (164 Python functions with tests; checked by running them)")
def load_humaneval(split: str, data_dir: Path | None) -> list[Example]:
    """HumanEval, from `humaneval/HumanEval.jsonl` under the data folder (the file of
    openai/human-eval, gunzipped), else the hub copy `openai/openai_humaneval`.

    The instruction is `HUMANEVAL_INSTRUCTION`: the problem's prompt (signature and docstring) in
    a Python block, with the request to answer with the whole function. The reference response
    (the perplexity target) is the canonical program, prompt + canonical solution, in a Python
    code block: the form CodeFeedback answers (and a model trained on them) give code in. Ids are
    the task ids ("HumanEval/0"), so generations made elsewhere match by them.
    """
    rows = local_or_hub_rows("humaneval", split, data_dir, "humaneval/HumanEval.jsonl", "openai/openai_humaneval")
    return rows_to_examples(rows, _humaneval_example)


def code_response_example(query: str, answer: str, ex_id: str) -> Example:
    """A training example in CodeFeedback's format: the query is the instruction, the answer (prose
    and fenced code) the reference response; `answer` is its program. No tests: perplexity only."""
    program = extract_program(answer) or answer
    return Example(ex_id, query.strip(), answer, program, "code")


@register_dataset("codefeedback", kind="code", hub_id="m-a-p/CodeFeedback-Filtered-Instruction",
                  splits=("train",), description="CodeFeedback-Filtered-Instruction (query/answer; perplexity only)")
def load_codefeedback(split: str, data_dir: Path | None) -> list[Example]:
    """CodeFeedback, from `codefeedback/CodeFeedback-Filtered-Instruction.jsonl` under the data
    folder, else the hub (156K rows; the paper trains on the first 10K: `codefeedback:train[:10000]`).
    Any other file with `query`/`answer` fields is read as a code file by its path."""
    rows = local_or_hub_rows("codefeedback", split, data_dir, "codefeedback/CodeFeedback-Filtered-Instruction.jsonl",
                             "m-a-p/CodeFeedback-Filtered-Instruction")
    return rows_to_examples(rows, lambda row, i: code_response_example(
        str(required_field(row, "query")), str(required_field(row, "answer")), f"codefeedback/{split}/{i}"))
