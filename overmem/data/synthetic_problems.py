"""Problems of the synthetic task (`overmem.data.synthetic`) and their solution paths.

A problem (`Problem`) is a person and an item kind, a starting amount and a few gains and losses
(`Term`); each amount is a plain number or a product ("4 boxes of 6 cookies"), and the answer is
the signed sum. `sample_problem` draws one under a `Settings` and writes its question from
`overmem.data.synthetic_wording`. A solution is one of many valid paths: a structure (a `Plan`:
the order of the amounts, grouped sums, when the products are computed) written out with surface
choices drawn from a `Phrasing` (`render_solution`). `check_solution` verifies every calculation
of a written solution.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace

from overmem.data.synthetic_wording import (
    DISTRACTORS,
    FRIENDS,
    ITEMS,
    OTHER_ITEMS,
    PEOPLE,
    QUESTION_TEMPLATES,
    RICH,
    STEP_TEMPLATES,
    Phrasing,
)

# ---------------------------------------------------------------------------------------------
# Problems, settings, plans
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One amount in a problem. `kind` is "start", "gain" or "loss"; the amount is `a`, or
    `a * b` when `b` is set (a containers of b items)."""

    kind: str
    a: int
    b: int | None = None

    @property
    def value(self) -> int:
        return self.a * self.b if self.b is not None else self.a

    @property
    def sign(self) -> int:
        return -1 if self.kind == "loss" else 1


@dataclass(frozen=True)
class Problem:
    """The structure of a problem; `question` is its rendered text."""

    person: tuple[str, str, str]
    item: str
    container: str
    friend: str
    terms: tuple[Term, ...]
    question: str

    @property
    def answer(self) -> int:
        return sum(t.sign * t.value for t in self.terms)

    def key(self) -> str:
        """Identity of the problem without its wording (used for disjoint splits)."""
        terms = ",".join(f"{t.kind}:{t.a}:{t.b}" for t in self.terms)
        return f"{self.person[0]}|{self.item}|{terms}"


@dataclass(frozen=True)
class Settings:
    """Difficulty knobs of the generator.

    n_terms: range of amounts (start included); start/plain/factor ranges are inclusive;
    product_prob: chance an amount is a product; loss_prob: chance a change is a loss;
    wording: "standard" or "ood" question templates; distractors: range of irrelevant sentences;
    reorder: whether solutions may apply the amounts in any order, compute the products up
    front and sum gains and losses separately (`Plan`), or only follow the question, computing
    each product just before it is used. A free choice of structure lets a finetuned small
    model that over-trusts its training paths lose track of which amounts it has used, so the
    standard splits keep the structure fixed and draw their free choices from the surface:
    phrasing, the order of a product's factors and the closing sentence; `synthetic.REORDER`
    is the harder variant; phrasing: the wording pools of the solutions, a key of
    `synthetic_wording.PHRASINGS`; wording_key: "" draws every reference's wording afresh, a key
    of `synthetic.WORDING_KEYS` ("item", "person") draws it once per value of that field, so
    that all references about cookies (or all of Ava's) are worded alike (see `synthetic.TRAIN`
    for why). The settings of the splits are in `overmem.data.synthetic`.
    """

    n_terms: tuple[int, int] = (2, 3)
    start_range: tuple[int, int] = (2, 9)
    plain_range: tuple[int, int] = (1, 9)
    factor_range: tuple[int, int] = (2, 5)
    product_prob: float = 0.15
    loss_prob: float = 0.4
    wording: str = "standard"
    distractors: tuple[int, int] = (0, 0)
    reorder: bool = False
    phrasing: str = "rich"
    wording_key: str = ""


@dataclass(frozen=True)
class Plan:
    """The structure of one solution path.

    strategy "sequential": start with the starting amount, apply the other amounts one at a time
    in `order` (indices into `terms`); "grouped": sum the gains (incl. the start) in the order they
    appear in `order`, sum the losses likewise, then subtract.
    `products`: the order in which product amounts are computed up front, or None to compute
    each one just before it is used (sequential only).
    """

    strategy: str
    order: tuple[int, ...]
    products: tuple[int, ...] | None


# ---------------------------------------------------------------------------------------------
# Generating problems
# ---------------------------------------------------------------------------------------------


def _fill(template: str, problem: Problem, **extra: object) -> str:
    name, pron, obj = problem.person
    fields = dict(name=name, Pron=pron.capitalize(), pron=pron, obj=obj, item=problem.item,
                  cont=problem.container, friend=problem.friend,
                  Friend=problem.friend[0].upper() + problem.friend[1:])
    fields.update({k: str(v) for k, v in extra.items()})
    return template.format(**fields)


def _sample_terms(settings: Settings, rng: random.Random) -> tuple[Term, ...]:
    n = rng.randint(*settings.n_terms)
    while True:
        terms = []
        for i in range(n):
            kind = "start" if i == 0 else ("loss" if rng.random() < settings.loss_prob else "gain")
            if rng.random() < settings.product_prob:
                terms.append(Term(kind, rng.randint(*settings.factor_range),
                                  rng.randint(*settings.factor_range)))
            else:
                lo, hi = settings.start_range if kind == "start" else settings.plain_range
                terms.append(Term(kind, rng.randint(lo, hi)))
        # The story must make sense: never give away more than one has.
        running = 0
        ok = True
        for t in terms:
            running += t.sign * t.value
            ok = ok and running >= 0
        if ok:
            return tuple(terms)


def _render_question(problem: Problem, settings: Settings, rng: random.Random) -> str:
    templates = QUESTION_TEMPLATES[settings.wording]
    sentences = []
    for t in problem.terms:
        key = t.kind + ("_prod" if t.b is not None else "")
        if t.b is None:
            sentences.append(_fill(rng.choice(templates[key]), problem, n=t.a))
        else:
            sentences.append(_fill(rng.choice(templates[key]), problem, a=t.a, b=t.b))
    for template in rng.sample(DISTRACTORS, rng.randint(*settings.distractors)):
        other = rng.choice(OTHER_ITEMS)
        text = _fill(template, problem, n=rng.randint(*settings.plain_range),
                     other=other)
        sentences.insert(rng.randint(1, len(sentences)), text)
    sentences.append(_fill(rng.choice(templates["ask"]), problem))
    return " ".join(sentences)


def sample_problem(settings: Settings, rng: random.Random) -> Problem:
    """Draw one problem (structure and question text) under `settings`."""
    item, container = rng.choice(ITEMS)
    person = rng.choice(PEOPLE)
    friend = rng.choice(FRIENDS)
    terms = _sample_terms(settings, rng)
    problem = Problem(person, item, container, friend, terms, question="")
    return replace(problem, question=_render_question(problem, settings, rng))


# ---------------------------------------------------------------------------------------------
# Solution paths
# ---------------------------------------------------------------------------------------------


def _sequential_ok(terms: tuple[Term, ...], order: tuple[int, ...]) -> bool:
    running = terms[0].value
    for i in order:
        running += terms[i].sign * terms[i].value
        if running < 0:
            return False
    return True


def enumerate_plans(problem: Problem, reorder: bool = True) -> list[Plan]:
    """Every structural solution path of `problem` (surface choices come on top, see
    `render_solution`); without `reorder`, only those applying the amounts in the question's
    order. Grows factorially with the number of amounts: meant for tests and small problems."""
    terms = problem.terms
    rest = range(1, len(terms))
    prods = [i for i, t in enumerate(terms) if t.b is not None]
    if not reorder:
        return [Plan("sequential", tuple(rest), None if prods else ())]
    prod_orders: list[tuple[int, ...] | None] = [tuple(p) for p in itertools.permutations(prods)]
    plans = []
    for order in itertools.permutations(rest):
        if _sequential_ok(terms, order):
            for p in prod_orders + ([None] if prods else []):
                plans.append(Plan("sequential", order, p))
    if any(t.kind == "loss" for t in terms):
        for order in itertools.permutations(range(len(terms))):
            for p in prod_orders:
                plans.append(Plan("grouped", order, p))
    return plans


def sample_plan(problem: Problem, rng: random.Random, reorder: bool = True) -> Plan:
    """One structural path, uniform over strategies then over orders (in the question's order
    only, without `reorder`)."""
    terms = problem.terms
    prods = [i for i, t in enumerate(terms) if t.b is not None]
    has_loss = any(t.kind == "loss" for t in terms)
    strategy = "grouped" if reorder and has_loss and rng.random() < 0.5 else "sequential"
    products: tuple[int, ...] | None = tuple(rng.sample(prods, len(prods)))
    if not reorder:
        return Plan(strategy, tuple(range(1, len(terms))), None if prods else ())
    if strategy == "grouped":
        return Plan(strategy, tuple(rng.sample(range(len(terms)), len(terms))), products)
    if prods and rng.random() < 0.5:
        products = None
    while True:
        order = tuple(rng.sample(range(1, len(terms)), len(terms) - 1))
        if _sequential_ok(terms, order):
            return Plan(strategy, order, products)


def _calc(op: str, operands: list[int]) -> tuple[str, int]:
    """'3 + 4 = <<3+4=7>>7' and its value."""
    if op == "+":
        value = sum(operands)
    elif op == "-":
        value = operands[0] - sum(operands[1:])
    else:
        value = 1
        for x in operands:
            value *= x
    shown = f" {op} ".join(map(str, operands))
    note = op.join(map(str, operands))
    return f"{shown} = <<{note}={value}>>{value}", value


# A step starting with a person's name keeps its capital after an opener.
_NAMES = frozenset(name for name, _, _ in PEOPLE)


def _decorate(line: str, rng: random.Random, phrasing: Phrasing = RICH) -> str:
    """Add an optional opener and an optional tail to a step sentence, drawn independently, so
    that several tokens of every line are free choices (not only the template's first word)."""
    opener = rng.choice(phrasing.openers)
    if opener:
        starts_with_name = line.split(" ", 1)[0] in _NAMES
        line = opener + (line if starts_with_name else line[0].lower() + line[1:])
    tail = rng.choice(phrasing.tails)
    return line[:-1] + tail + "." if tail and line.endswith(".") else line


def render_solution(problem: Problem, plan: Plan, rng: random.Random, phrasing: Phrasing = RICH) -> str:
    """Write `plan` out as a GSM8K-style solution; the phrasing of every step (from `phrasing`;
    `synthetic.REORDER`'s grouped sums from `STEP_TEMPLATES`), the order of a product's factors
    and the closing sentence are drawn from `rng`."""
    terms = problem.terms
    lines: list[str] = []

    def say(kind: str, expr: str) -> None:
        templates = phrasing.steps if kind in ("mul", "add", "sub") else STEP_TEMPLATES[kind]
        lines.append(_decorate(_fill(rng.choice(templates), problem, expr=expr), rng, phrasing))

    def product(i: int) -> None:
        a, b = terms[i].a, terms[i].b
        operands = [a, b] if rng.random() < 0.5 else [b, a]
        say("mul", _calc("*", operands)[0])

    if plan.products is not None:
        for i in plan.products:
            product(i)
    if plan.strategy == "sequential":
        if plan.products is None and terms[0].b is not None:
            product(0)
        running = terms[0].value
        for i in plan.order:
            if plan.products is None and terms[i].b is not None:
                product(i)
            if terms[i].kind == "loss":
                expr, running = _calc("-", [running, terms[i].value])
                say("sub", expr)
            else:
                # The running total comes first, as in a subtraction: if the order of an
                # addition were free, over-trusting it could put an amount first in a loss.
                expr, running = _calc("+", [running, terms[i].value])
                say("add", expr)
    else:
        gains = [terms[i].value for i in plan.order if terms[i].kind != "loss"]
        losses = [terms[i].value for i in plan.order if terms[i].kind == "loss"]
        total_in, total_out = gains[0], losses[0]
        if len(gains) > 1:
            expr, total_in = _calc("+", gains)
            say("gains", expr)
        if len(losses) > 1:
            expr, total_out = _calc("+", losses)
            say("losses", expr)
        expr, _ = _calc("-", [total_in, total_out])
        say("net", expr)
    closing = _fill(rng.choice(phrasing.closings), problem, ans=problem.answer)
    if closing:
        lines.append(closing)
    lines.append(f"#### {problem.answer}")
    return "\n".join(lines)


def sample_solution(problem: Problem, rng: random.Random, reorder: bool = True,
                    phrasing: Phrasing = RICH) -> str:
    """One valid solution drawn at random over structure and surface."""
    return render_solution(problem, sample_plan(problem, rng, reorder), rng, phrasing)


def sample_solutions(problem: Problem, n: int, seed: int = 0, reorder: bool = True,
                     phrasing: Phrasing = RICH) -> list[str]:
    """`n` independently drawn valid solutions (may repeat)."""
    rng = random.Random(seed)
    return [sample_solution(problem, rng, reorder, phrasing) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Checking a solution (used by tests and usable as a stricter grader than the final answer)
# ---------------------------------------------------------------------------------------------

_NOTE = re.compile(r"<<([0-9+\-*/ ]+)=(-?\d+)>>(-?\d+)")
_FINAL = re.compile(r"^#### (-?\d+)$", re.MULTILINE)


def check_solution(solution: str) -> tuple[bool, int | None]:
    """(every calculator note is correct and its result is what follows it, final answer).
    The final answer must equal the last note's result when there are notes."""
    results = []
    for expr, value, shown in _NOTE.findall(solution):
        if not re.fullmatch(r"\d+([+\-*]\d+)*", expr):
            return False, None
        if eval(expr) != int(value) or value != shown:  # expr is digits and + - * only
            return False, None
        results.append(int(value))
    finals = _FINAL.findall(solution)
    if len(finals) != 1 or not solution.endswith(f"#### {finals[0]}"):
        return False, None
    final = int(finals[0])
    if results and results[-1] != final:
        return False, final
    return True, final
