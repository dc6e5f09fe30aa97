r"""Final-answer extraction and answer checking, one rule set per `AnswerKind`.

Every accuracy number in overmem comes from `is_correct`, so the rules are spelled out here.

numeric (GSM8K, SVAMP, ASDiv, MAWPS, ...)
    Follows lm-evaluation-harness `lm_eval/tasks/gsm8k/gsm8k.yaml`: its strict filter is `#### (\-?[0-9\.\,]+)`
    (first match), its flexible filter the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, and it
    strips `,` `$` and a trailing `.`. We keep that order and widen the number syntax:

    1. Before anything else, LaTeX `{,}` becomes `,` and `\frac{a}{b}` (also `\dfrac`,
       `\tfrac`) with integer a, b becomes `a/b`. GSM8K calculator notes
       (`<<9*2=18>>18`) are left alone: the number after a note repeats its result.
    2. Strict: the FIRST `####`, if a number follows it directly (`#### 18`, `#### $1,234.50`).
    3. Anchored, whichever comes FIRST in the text: "answer is" / "answer:" (case-insensitive,
       so "The final answer is:" counts) directly followed by a number, with only spaces, `:`,
       `*`, `$`, `\(`, `\[`, `\boxed{`, `\text{` between ("The answer is: **$18**"); or a
       `\boxed{...}` that contains a number (its first one). "Answer: Janet has 16 eggs ..."
       is not an anchored answer.
    4. Flexible fallback (`extract_answer` only, not `reference_answer`): the LAST number in the
       text.

    Taking the first anchored answer (as lm-eval does) matters for small finetuned models, which
    often run on into a new, made-up problem with its own `####` after answering.
    A number is `-?$?` + digits, optionally with comma thousands groups (`1,234`; "1,2,3" is
    three numbers), a decimal part (`.5`, `12.25`) or an integer denominator (`3/4`). A minus
    sign glued to a preceding word, digit or bracket is subtraction (`20-5` holds 20 and 5).
    Units, `%` and trailing `.` are not part of the number. The canonical form drops `$` and
    commas and writes decimals without trailing zeros: "#### 18.00" -> "18",
    "1,234.50" -> "1234.5", ".5" -> "0.5"; fractions stay fractions ("3/4").
    Matching parses both sides as exact fractions: "3/4" matches gold "0.75". When one side
    has no exact decimal form (1/3, 2/7) it also accepts relative tolerance 1e-6 (absolute
    1e-9), so "0.3333333" matches "1/3"; two exact decimals must be equal (else 1201566 would
    match 1201565).

math (MATH, MATH500)
    1. The content of the LAST `\boxed{...}` or `\fbox{...}` whose braces balance (escaped
       `\{` `\}` do not count; a box cut off by the generation limit is skipped).
    2. Else the text after the LAST "answer is" (case-insensitive) on its line: the first
       `$...$` there if it starts with `$`, else the rest of the line without a final `.`.
    3. Else None. A bare `\boxed 5` without braces is not recognised.
    Matching: first an exact comparison after removing spacing (`\left`, `\right`, `\,`,
    whitespace) and writing `\dfrac`/`\tfrac` as `\frac`; then math-verify
    `verify(parse(gold), parse(pred))`, gold first (verify is asymmetric), with both strings
    wrapped in `\boxed{}` so that bare LaTeX parses. math-verify's own SIGALRM timeouts fail off
    the main thread, so they are disabled and the whole check is bounded here by
    `MATH_TIMEOUT_S` seconds (answer: no match). The bound needs SIGALRM: on a non-main thread,
    or while another interval timer is running, the check is unbounded; sympy can then hang on
    inputs like `9!!!!`.

choice (MMLU-STEM, letters A-J)
    1. The FIRST "answer is" / "answer:" (case-insensitive) followed by a capital letter,
       optionally in brackets or `\boxed{}`/`\text{}`: "The answer is (B)", "Answer: B".
    2. Else the FIRST `\boxed{X}`.
    3. Else the LAST "(X)".
    4. Else a lone capital letter ending the text ("... so the answer must be\nC.").
    Lower-case letters are never answers (the article "a"). Gold may be a letter or a 0-based
    index (int or digit string); `choice_letter` converts it.

code (HumanEval, CodeFeedback)
    Checked by running the program against the example's tests in the sandbox, not here:
    `overmem.data.code` has the rules (fenced blocks, bare completions, whole functions).
    `extract_answer` gives the program of a text without a task's prompt; `answers_match` refuses
    code.

`reference_answer` applies the same rules to a reference solution, without the numeric
last-number fallback (a bare number is accepted), and raises `ValueError` if nothing is found.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from fractions import Fraction

from overmem.data.example import AnswerKind

CHOICE_LETTERS = "ABCDEFGHIJ"
NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-9
# Wall-clock bound on one math-verify comparison (parse gold, parse pred, verify).
MATH_TIMEOUT_S = 5.0

# ---------------------------------------------------------------------------- numeric

# A minus sign counts only when not glued to a word, digit or closing bracket ("20-5" is a
# subtraction, "-5" and "(-5)" are negative). `−` is the Unicode minus.
_SIGN = r"(?:(?<![\w)\]}])[-−])?"
_NUMBER_RE = re.compile(
    _SIGN + r"\$?(?:"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"  # 1,234.5 | 1234 | 3/4
    r"|\.\d+"  # .5
    r")"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_STRICT_RE = re.compile(r"####\s*")
_ANSWER_PHRASE_RE = re.compile(r"answer\s*(?:is\b|:)", re.IGNORECASE)
# What may stand between "answer is" and its number: spaces, markdown bold, math delimiters.
_ANSWER_LEAD_RE = re.compile(r"(?:\s|:|\*|\$|\\\(|\\\[|\\boxed\{|\\text\{)*")
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _balanced_brace_content(text: str, open_brace: int) -> str | None:
    """Text inside the `{` at `open_brace` up to its matching `}`; None if it never closes."""
    depth = 0
    i = open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. `\{`, never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
        i += 1
    return None


def _clean_numeric_text(text: str) -> str:
    r"""Turn LaTeX spellings of numbers into plain ones: `1{,}000`, `\frac{3}{4}`."""
    text = text.replace("{,}", ",")
    return _LATEX_FRAC_RE.sub(r"\1/\2", text)


def _canonical_number(token: str) -> str:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '.5' -> '0.5', '-3/4' -> '-3/4'."""
    token = token.replace("$", "").replace(",", "").replace("−", "-")
    if "/" in token:
        return token
    value = Decimal(token)
    # normalize() drops trailing zeros; "f" keeps 1E+2 written as 100; -0 becomes 0.
    return "0" if value == 0 else format(value.normalize(), "f")


def _strict_numeric(text: str) -> str | None:
    """lm-eval strict rule: the number right after the first `####` that has one."""
    for anchor in _STRICT_RE.finditer(text):
        match = _NUMBER_RE.match(text, anchor.end())
        if match:
            return _canonical_number(match.group())
    return None


def _anchored_numeric(text: str) -> str | None:
    r"""Number of the first "answer is"/"answer:" followed directly by one, or `\boxed{}`."""
    candidates = []  # (position of the anchor, number)
    for anchor in _ANSWER_PHRASE_RE.finditer(text):
        lead = _ANSWER_LEAD_RE.match(text, anchor.end())
        number = _NUMBER_RE.match(text, lead.end())
        if number:
            candidates.append((anchor.start(), number.group()))
    for anchor in _BOX_OPEN_RE.finditer(text):
        content = _balanced_brace_content(text, anchor.end() - 1)
        number = _NUMBER_RE.search(content) if content else None
        if number:
            candidates.append((anchor.start(), number.group()))
    return _canonical_number(min(candidates)[1]) if candidates else None


def _extract_numeric(text: str, last_number_fallback: bool) -> str | None:
    text = _clean_numeric_text(text)
    answer = _strict_numeric(text) or _anchored_numeric(text)
    if answer is not None:
        return answer
    if last_number_fallback:
        numbers = _NUMBER_RE.findall(text)
        return _canonical_number(numbers[-1]) if numbers else None
    bare = _NUMBER_RE.fullmatch(text.strip().rstrip("."))  # the whole text is one number
    return _canonical_number(bare.group()) if bare else None


def _parse_number(text: str) -> Fraction | None:
    """Exact value of a text that is a single number (after `$`, `,`, `%`, a final `.`)."""
    text = _clean_numeric_text(text).strip().rstrip(".").rstrip("%").strip()
    if not _NUMBER_RE.fullmatch(text):
        return None
    number = _canonical_number(text)
    try:
        if "/" in number:  # Fraction() takes "1/4" but not "0.02/100", which models write too
            numerator, denominator = number.split("/", 1)
            return Fraction(numerator) / Fraction(denominator)
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def _is_exact_decimal(value: Fraction) -> bool:
    """Whether `value` has a finite decimal expansion (denominator of only 2s and 5s)."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _gold_number(gold: str) -> Fraction:
    value = _parse_number(gold)
    if value is None:
        raise ValueError(f"numeric gold answer is not a number: {gold!r}")
    return value


def _numbers_match(pred: str, gold: Fraction) -> bool:
    pred_value = _parse_number(pred)
    if pred_value is None:
        return False
    if pred_value == gold:
        return True
    # The tolerance is for a rounded decimal against a value with no exact decimal form
    # ("0.3333333" vs "1/3"). Two exact decimals must be equal: with a relative tolerance
    # alone, 1201566 would match 1201565.
    if _is_exact_decimal(pred_value) and _is_exact_decimal(gold):
        return False
    try:
        return math.isclose(
            float(pred_value), float(gold), rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL
        )
    except OverflowError:  # beyond float range and not exactly equal
        return False


# ------------------------------------------------------------------------------- math

_MATH_ANSWER_PHRASE_RE = re.compile(r"answer\s+is\b\s*:?", re.IGNORECASE)
_LATEX_SPACING_RE = re.compile(r"\\left|\\right|\\[,;:! ]|\s+")


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOX_OPEN_RE.finditer(text))):
        content = _balanced_brace_content(text, match.end() - 1)
        if content is not None:
            return content.strip()
    return None


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    return text


def _math_answer_phrase(text: str) -> str | None:
    """Text after the last "answer is" on its line: its first `$...$`, else up to a final `.`."""
    matches = list(_MATH_ANSWER_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0].strip()
    if rest.startswith("$"):
        # "The final answer is $5$. I hope it is correct." (Minerva format): keep only $5$.
        delimiter = "$$" if rest.startswith("$$") else "$"
        close = rest.find(delimiter, len(delimiter))
        if close != -1:
            rest = rest[: close + len(delimiter)]
    answer = _strip_dollars(rest.rstrip(".").strip())
    return answer or None


def _extract_math(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    return _math_answer_phrase(text)


def _normalize_latex(text: str) -> str:
    text = _strip_dollars(text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _LATEX_SPACING_RE.sub("", text).rstrip(".")


class _CheckTimeout(BaseException):
    """Our alarm. A BaseException so math-verify's `except Exception` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise `_CheckTimeout` after `seconds`, where SIGALRM is usable; else no bound."""
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # do not steal a running timer
    )
    if not usable:
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise _CheckTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _math_verify_match(pred: str, gold: str) -> bool:
    # Imported here: math-verify pulls in sympy and antlr (~0.7 s), needed only for "math".
    from math_verify import parse, verify

    def _parse(expr: str) -> list:
        return parse(f"\\boxed{{{_strip_dollars(expr)}}}", parsing_timeout=None)

    try:
        with _time_limit(MATH_TIMEOUT_S):
            return verify(_parse(gold), _parse(pred), timeout_seconds=None)
    except _CheckTimeout:
        return False


def _math_match(pred: str, gold: str) -> bool:
    normalized = _normalize_latex(pred)
    if not normalized:
        return False
    if normalized == _normalize_latex(gold):
        return True
    return _math_verify_match(pred, gold)


# ----------------------------------------------------------------------------- choice

_CHOICE_PHRASE_RE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\b\s*:?|:)\s*"
    r"\$?(?:\\boxed\{)?\s*(?:\\text\{)?\s*[(\[]?([A-J])\b"
)
_CHOICE_BOXED_RE = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\}")
_CHOICE_PAREN_RE = re.compile(r"\(([A-J])\)")
_CHOICE_TRAILING_RE = re.compile(r"(?:^|\s)\(?([A-J])[.)]?\s*$")


def _extract_choice(text: str) -> str | None:
    for pattern in (_CHOICE_PHRASE_RE, _CHOICE_BOXED_RE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    parens = _CHOICE_PAREN_RE.findall(text)
    if parens:
        return parens[-1]
    match = _CHOICE_TRAILING_RE.search(text.strip())
    return match.group(1) if match else None


def choice_letter(gold: str | int) -> str:
    """Normalise a multiple-choice gold answer to its letter.

    Accepts a 0-based index (int or digit string: 2 -> "C", as in MMLU's `answer` field) or
    a letter in any case, optionally in brackets ("(b)" -> "B"). Raises `ValueError` otherwise.
    """
    if isinstance(gold, int) and not isinstance(gold, bool):
        if 0 <= gold < len(CHOICE_LETTERS):
            return CHOICE_LETTERS[gold]
        raise ValueError(f"choice index {gold} is outside 0..{len(CHOICE_LETTERS) - 1}")
    text = str(gold).strip().strip("()[]").strip().upper()
    if len(text) == 1 and text.isdigit():
        return CHOICE_LETTERS[int(text)]
    if len(text) == 1 and text in CHOICE_LETTERS:
        return text
    raise ValueError(f"not a choice letter or index: {gold!r}")


def _choice_of(pred: str) -> str | None:
    """The letter of an extracted choice answer ("B", "(b)"), else None."""
    letter = pred.strip().strip("()[]").strip().upper()
    return letter if len(letter) == 1 and letter in CHOICE_LETTERS else None


# ----------------------------------------------------------------------------- public


def extract_answer(text: str, kind: AnswerKind) -> str | None:
    """Final answer of a model generation (or reference solution), or None if there is none.

    Rules per kind are in the module docstring. Numeric answers come back canonical
    ("1,234.50" -> "1234.5"); math answers are the raw LaTeX inside the box; choice answers are
    one capital letter.
    """
    if kind == "numeric":
        return _extract_numeric(text, last_number_fallback=True)
    if kind == "math":
        return _extract_math(text)
    if kind == "choice":
        return _extract_choice(text)
    if kind == "code":  # the program of the text, without a task's prompt (`overmem.data.code`)
        from overmem.data.code import extract_program

        return extract_program(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected numeric, math, choice or code")


def answers_match(pred: str | None, gold: str | int | float, kind: AnswerKind) -> bool:
    """Whether an extracted answer `pred` equals the gold answer.

    numeric: equal as exact fractions, or within relative tolerance 1e-6 (absolute 1e-9)
    when one side has no exact decimal form (1/3);
    math: normalised string equality, else math-verify `verify(parse(gold), parse(pred))`;
    choice: same letter, with `gold` given as a letter or 0-based index.
    A None or empty `pred` never matches. A numeric gold that is not a number, or a choice
    gold that is not a letter/index, raises `ValueError`: that is a data bug, not a miss.
    """
    # The gold is checked first, so a bad gold raises even when there is no prediction.
    if kind == "numeric":
        gold_value = _gold_number(str(gold))
        return pred is not None and _numbers_match(pred, gold_value)
    if kind == "choice":
        gold_letter = choice_letter(gold)
        return pred is not None and _choice_of(pred) == gold_letter
    if kind == "math":
        return pred is not None and _math_match(pred, str(gold))
    if kind == "code":
        raise ValueError("code is checked by running its tests (overmem.data.code.check_generations), "
                         "not by comparing it with the reference program")
    raise ValueError(f"unknown answer kind {kind!r}; expected numeric, math, choice or code")


def is_correct(
    generation: str, gold: str | int | float, kind: AnswerKind
) -> tuple[str | None, bool]:
    """Extract the final answer of `generation` and check it: returns (extracted, correct).

    A generation without an answer (empty, no number, no box) gives (None, False).
    """
    pred = extract_answer(generation, kind)
    return pred, answers_match(pred, gold, kind)


def reference_answer(response: str, kind: AnswerKind) -> str:
    r"""Gold answer of a reference solution, e.g. "18" from GSM8K's "... #### 18".

    Same rules as `extract_answer`, except that a numeric reference must state its answer
    (`####`, "answer is", `\boxed{}`, or be a bare number): the last-number fallback would
    silently turn a malformed reference into a wrong gold. Raises `ValueError` otherwise.
    """
    if kind == "numeric":
        answer = _extract_numeric(response, last_number_fallback=False)
    else:
        answer = extract_answer(response, kind)
    if answer is None:
        raise ValueError(
            f"could not find a final answer in the reference solution: {_excerpt(response)}"
        )
    return answer


def _excerpt(text: str, width: int = 100) -> str:
    """The end of `text`, where a final answer would be."""
    text = text.strip()
    return repr(text if len(text) <= width else "..." + text[-width:])
