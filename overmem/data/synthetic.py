"""Synthetic arithmetic word problems in GSM8K's format, with many valid reasoning paths.

Why this task exists: over-memorization (Ruan et al. 2025, sec. 3 and app. C) appears when the
training references show one of several equally valid ways to solve a problem. Finetuning makes the
model trust each training example's path; on a test problem the reference path then becomes
improbable (perplexity rises) while the answer stays right. So every problem here can be solved in
many ways and its reference solution shows one, drawn at random:

- surface (`render_solution`, a `Phrasing`): the order of a product's factors, the phrasing of
  every step (a subject and a verb that name no operation, an optional opener and an optional
  tail), and an optional closing sentence. Every surface choice is valid whatever the problem, so
  a model that over-trusts the choices of its training examples still computes the right thing.
  The pretraining text draws them from many wordings (`RICH`), the splits from a few (`PLAIN`):
  afresh for every validation and test reference, once per item kind in the training split
  (`TRAIN`: a finetuning set has a consistent style, the references a model is tested on do not);
- structure (a `Plan`, only in the `REORDER` variant): the order in which the changes are
  applied, whether gains and losses are first summed separately ("grouped"), and when the
  products are computed.

A problem is a person and an item kind, a starting amount and a few gains and losses; each amount is
a plain number or a product ("4 boxes of 6 cookies"). The answer is the signed sum.

Splits (registered as dataset "synthetic"; sizes in `SPLIT_SIZES`):
  train, validation, test, nonmembers  same problems' distribution (`STANDARD`), structurally
                                        disjoint (hash buckets of the problem, see `_bucket`);
                                        train and nonmembers word their references per item kind
                                        (`TRAIN`)
  members                               the first `SPLIT_SIZES["members"]` train problems
  ood_steps       4-5 amounts instead of 2-3
  ood_wording     question sentences from a disjoint set of templates
  ood_numbers     larger numbers (disjoint ranges)
  ood_distractor  1-2 irrelevant sentences with numbers inserted in the question
The OOD splits draw from the test bucket, so none of them shares a problem with train.
`pretrain_stream` draws from buckets no split uses (used by `overmem.tiny` for the base model).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from overmem.data.datasets import register_dataset
from overmem.data.example import Example

DEFAULT_SEED = 20250806

# ---------------------------------------------------------------------------------------------
# Vocabulary of the world
# ---------------------------------------------------------------------------------------------

# (name, subject pronoun, object pronoun)
PEOPLE = [
    ("Ava", "she", "her"), ("Ben", "he", "him"), ("Cleo", "she", "her"), ("Dan", "he", "him"),
    ("Emma", "she", "her"), ("Finn", "he", "him"), ("Gina", "she", "her"), ("Hugo", "he", "him"),
    ("Iris", "she", "her"), ("Jack", "he", "him"), ("Kate", "she", "her"), ("Leo", "he", "him"),
    ("Mia", "she", "her"), ("Noah", "he", "him"), ("Olivia", "she", "her"), ("Paul", "he", "him"),
    ("Rosa", "she", "her"), ("Sam", "he", "him"), ("Tina", "she", "her"), ("Omar", "he", "him"),
]
_NAMES = frozenset(name for name, _, _ in PEOPLE)
FRIENDS = ["Grandma", "a neighbor", "the teacher", "a friend", "Uncle Joe", "a cousin"]
# (item, container)
ITEMS = [
    ("apples", "bags"), ("marbles", "jars"), ("stickers", "sheets"), ("cookies", "boxes"),
    ("pencils", "packs"), ("cards", "decks"), ("eggs", "cartons"), ("books", "shelves"),
    ("shells", "buckets"), ("coins", "purses"), ("beads", "strings"), ("flowers", "vases"),
]
OTHER_ITEMS = ["pears", "hats", "kites", "stamps", "toys", "plums"]

# ---------------------------------------------------------------------------------------------
# Question templates. STANDARD and OOD wordings are disjoint sets of sentences.
# Placeholders: {name} {Pron} {pron} {obj} {friend} {item} {cont} {n} {a} {b}
# ---------------------------------------------------------------------------------------------

QUESTION_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "standard": {
        "start": ["{name} has {n} {item}.", "{name} starts with {n} {item}."],
        "start_prod": ["{name} has {a} {cont} with {b} {item} in each.",
                       "{name} starts with {a} {cont} of {b} {item}."],
        "gain": ["{Pron} buys {n} more {item}.", "{Friend} gives {obj} {n} {item}.",
                 "{Pron} finds {n} {item}."],
        "gain_prod": ["{Pron} buys {a} {cont} of {b} {item}.",
                      "{Friend} gives {obj} {a} {cont} with {b} {item} each."],
        "loss": ["{Pron} gives {n} {item} to {friend}.", "{Pron} loses {n} {item}.",
                 "{Pron} sells {n} {item}."],
        "loss_prod": ["{Pron} gives away {a} {cont} of {b} {item}.",
                      "{Pron} sells {a} {cont} with {b} {item} each."],
        "ask": ["How many {item} does {name} have now?",
                "How many {item} does {name} have at the end?"],
    },
    "ood": {
        "start": ["At first, {name} owns {n} {item}.",
                  "There are {n} {item} in the collection of {name}."],
        "start_prod": ["{name} owns {a} {cont}, and every one holds {b} {item}."],
        "gain": ["Later, {pron} picks up another {n} {item}.",
                 "{Pron} receives {n} {item} as a gift."],
        "gain_prod": ["{Pron} gets {a} {cont} containing {b} {item} apiece."],
        "loss": ["{Pron} donates {n} {item}.", "{Friend} takes {n} {item} from {obj}."],
        "loss_prod": ["{Pron} hands over {a} {cont} holding {b} {item} each."],
        "ask": ["What is the number of {item} that {name} ends up with?",
                "Count the {item} {name} is holding after all this."],
    },
}

DISTRACTORS = [
    "{Friend} has {n} {other}.", "{name} is {n} years old.", "The shop is {n} blocks away.",
    "{Pron} also owns {n} {other}, but keeps them at home.",
]

# ---------------------------------------------------------------------------------------------
# Solution step phrasings (shared by every split: this is what the model must produce).
# {expr} is a calculation like "3 + 4 = <<3+4=7>>7".
# ---------------------------------------------------------------------------------------------

# The sequential steps (products, gains, losses) share one pool of phrasings that name no
# operation: which operation a step does is written only in its calculation, which the question
# determines. A phrasing that named the operation ("Adding them gives ...") would make the free
# choice of phrasing decide the arithmetic, and a finetuned model that over-trusts the phrasings
# of its training problems would then pick the wrong operation on a test problem; a real
# solution's phrasing is free in a way that leaves every choice valid.
# Each phrasing is a subject and a verb drawn independently (two free choices in two or three
# tokens, so that a large share of a solution's tokens are free choices).
STEP_SUBJECTS = ["That", "This", "It", "All that", "The total", "The result", "The count"]
STEP_VERBS = ["is", "comes to", "works out to", "makes", "gives", "means"]
_NOUN_VERBS = ["is", "comes to", "works out to"]  # "the total gives 3 + 4" reads wrong
STEP_PHRASES = [
    f"{subject} {verb} {{expr}} {{item}}."
    for subject in STEP_SUBJECTS
    for verb in (_NOUN_VERBS if subject.startswith("The ") else STEP_VERBS)
]

STEP_TEMPLATES: dict[str, list[str]] = {
    "mul": STEP_PHRASES,
    "add": STEP_PHRASES,
    "sub": STEP_PHRASES,
    # Summing gains and losses separately exists only in the `REORDER` variant.
    "gains": [
        "{Pron} gets {expr} {item} in all.",
        "All the {item} coming in add up to {expr}.",
        "The {item} {pron} gets total {expr}.",
        "First add what {pron} gets: {expr} {item}.",
        "Adding everything {pron} gets: {expr} {item}.",
        "In total {pron} gets {expr} {item}.",
    ],
    "losses": [
        "{Pron} gives up {expr} {item} in all.",
        "The {item} going out total {expr}.",
        "In total {expr} {item} are gone.",
        "Now add what {pron} loses: {expr} {item}.",
        "Altogether {expr} {item} leave.",
        "The losses add up to {expr} {item}.",
    ],
    "net": [
        "So {pron} has {expr} {item} left.",
        "That leaves {expr} {item}.",
        "The difference is {expr} {item}.",
        "{name} ends up with {expr} {item}.",
        "Subtracting gives {expr} {item}.",
        "Then {pron} keeps {expr} {item}.",
    ],
    "end": [
        "", "", "So {name} has {ans} {item} now.", "The answer is {ans}.",
        "{name} ends with {ans} {item}.", "In the end there are {ans} {item}.",
    ],
}


# Independent optional decorations of each step sentence.
STEP_OPENERS = ["", "", "So ", "Then ", "Now ", "Next, ", "Here ", "Well, ", "Thus ", "OK, ", "This way "]
STEP_TAILS = ["", "", " now", " in all", " in total", " so far", " at this point", " altogether", " for now"]


@dataclass(frozen=True)
class Phrasing:
    """The surface choices of a solution: a sequential step is `opener + step + tail` (one of
    each, drawn independently; the opener lower-cases the step's first word) and the solution
    ends with a closing sentence ("" for none) before `#### N`. Placeholders as in
    `STEP_TEMPLATES`."""

    openers: tuple[str, ...]
    steps: tuple[str, ...]
    tails: tuple[str, ...]
    closings: tuple[str, ...]


# The base model's pretraining text: many wordings of each choice (as a real LLM has read), and
# closings that can start like a step line ("So ...", "The ...").
RICH = Phrasing(tuple(STEP_OPENERS), tuple(STEP_PHRASES), tuple(STEP_TAILS), tuple(STEP_TEMPLATES["end"]))

# The finetuning splits: a few wordings per choice, but as many choices per line. Why:
# - Every choice written before a line's calculation is also a clue to which training example
#   the model is continuing, once the examples are memorized. With `RICH` (~3,000 wordings of a
#   line, nearly one per training example) the finetuned tiny model's test solutions drift towards
#   training ones: skipped or repeated steps, wrong sums (demo, seed 0: test accuracy 0.98-1.00 at
#   epochs 3-8, then 0.84-0.94). With 3 x 6 x 3 = 54 wordings of a line, each shared by several
#   training examples, less of it happens (and with the training references worded per item
#   kind, `TRAIN`, none of it on the demo's seeds; docs/commands/demo.md), while the choices, all
#   still free, make the test references improbable as the model over-trusts them.
# - Whether a line is another step or the closing is decided by the question (how many changes
#   are left), so no closing starts with a word a step line can start with. In `RICH` "So ..."
#   and "The ..." begin both, and over-trusting a memorized "So" ended test solutions early.
PLAIN = Phrasing(
    openers=("", "So ", "Then "),
    steps=tuple(
        f"{subject} {verb} {{expr}} {{item}}."
        for subject, verb in (("That", "is"), ("That", "makes"), ("It", "is"), ("It", "makes"),
                              ("The total", "is"), ("The total", "comes to"))
    ),
    tails=("", " in all", " so far"),
    closings=("", "{name} ends with {ans} {item}.", "Answer: {ans}."),
)
PHRASINGS: dict[str, Phrasing] = {"rich": RICH, "plain": PLAIN}

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


# What a reference's wording can be drawn per (`Settings.wording_key`).
WORDING_KEYS: dict[str, Callable[[Problem], str]] = {
    "item": lambda problem: problem.item,
    "person": lambda problem: problem.person[0],
}


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
    phrasing, the order of a product's factors and the closing sentence; `REORDER` is the
    harder variant; phrasing: the wording pools of the solutions, a key of `PHRASINGS`;
    wording_key: "" draws every reference's wording afresh, a key of `WORDING_KEYS` ("item",
    "person") draws it once per value of that field, so that all references about cookies (or
    all of Ava's) are worded alike (see `TRAIN` for why).
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


# The base model's pretraining text covers more than the finetuning task (as a real LLM's does):
# it also has products ("4 boxes of 6 cookies") and many more wordings (`RICH`). The finetuning
# splits leave the products out: finding and multiplying the right two factors is what a
# 1M-parameter model forgets first once it starts to memorize its training problems, and the demo
# is about the references' perplexity, not that. They write solutions with `PLAIN` (see there).
PRETRAIN = Settings()
STANDARD = replace(PRETRAIN, product_prob=0.0, phrasing="plain")
# The training problems' references are worded alike per item kind: every solution about
# cookies uses the same openers, subjects, verbs, tails and closing (drawn once, at random, from
# `PLAIN`; the same in every split that uses `TRAIN`), while every test and validation reference
# draws its own. This is how real finetuning sets differ from the references a model is tested
# on: a set written by a few annotators, or generated by one model (the paper finetunes on
# MetaMathQA's GPT-3.5 solutions and tests on GSM8K's human ones), has a consistent style. Every
# wording is still valid, each item kind's drawn from the same pool as the test references', but
# finetuning makes the model over-trust the training paths: it writes the
# cookie wording for a test problem about cookies, and the reference's other wording becomes
# improbable while the answer stays right. Without this (every training reference worded
# afresh) the tiny model has to memorize 200 unrelated wordings, each a clue to one training
# solution that it then continues (wrong sums, skipped steps): the demo's late test accuracy was
# 0.82-0.94 on two of three seeds and the test perplexity rose 1.74-1.80x in 50 epochs; worded
# per item kind, every late epoch of seeds 0-2 stays within 5 points of the best (seed 0:
# 0.945-0.97) and the perplexity rises 2.29-2.55x (docs/commands/demo.md).
TRAIN = replace(STANDARD, wording_key="item")
REORDER = replace(PRETRAIN, reorder=True)
SPLIT_SETTINGS: dict[str, Settings] = {
    "train": TRAIN,
    "validation": STANDARD,
    "test": STANDARD,
    # Members are training problems; non-members come from the same distribution, styles included,
    # so that membership inference measures memorization and not the style.
    "members": TRAIN,
    "nonmembers": TRAIN,
    "ood_steps": replace(STANDARD, n_terms=(4, 5)),
    "ood_wording": replace(STANDARD, wording="ood"),
    "ood_numbers": replace(STANDARD, start_range=(40, 99), plain_range=(12, 40),
                           factor_range=(6, 9)),
    "ood_distractor": replace(STANDARD, distractors=(1, 2)),
}
SPLIT_SIZES: dict[str, int] = {
    "train": 2000, "validation": 200, "test": 500, "members": 200, "nonmembers": 200,
    "ood_steps": 200, "ood_wording": 200, "ood_numbers": 200, "ood_distractor": 200,
}
SPLITS = tuple(SPLIT_SETTINGS)

# Problems are assigned to splits by a hash of their structure (`Problem.key`), so two splits
# never share a problem whatever their seeds. Buckets out of 20:
_BUCKETS: dict[str, range] = {
    "pretrain": range(0, 10),
    "train": range(10, 14),
    "validation": range(14, 15),
    "test": range(15, 17),
    "nonmembers": range(17, 18),
    "spare": range(18, 20),
}


def _bucket(problem: Problem) -> int:
    digest = hashlib.sha1(problem.key().encode()).hexdigest()
    return int(digest[:8], 16) % 20


def _split_bucket(split: str) -> range:
    if split in ("train", "members"):
        return _BUCKETS["train"]
    if split in ("validation", "nonmembers", "pretrain"):
        return _BUCKETS[split]
    return _BUCKETS["test"]  # test and every OOD split


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


def _problem_stream(split: str, settings: Settings, seed: int) -> Iterator[Problem]:
    """Problems of `split`'s bucket, without repeats, deterministic in (split, seed)."""
    rng = random.Random(f"{seed}:{split}")
    buckets = _split_bucket(split)
    seen: set[str] = set()
    while True:
        problem = sample_problem(settings, rng)
        if _bucket(problem) in buckets and problem.key() not in seen:
            seen.add(problem.key())
            yield problem


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
    `REORDER`'s grouped sums from `STEP_TEMPLATES`), the order of a product's factors and the
    closing sentence are drawn from `rng`."""
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


# ---------------------------------------------------------------------------------------------
# Splits and the dataset registration
# ---------------------------------------------------------------------------------------------


def to_example(problem: Problem, split: str, index: int, rng: random.Random,
               settings: Settings = STANDARD) -> Example:
    """Attach one randomly drawn reference solution (structure and wording as `settings` allow)
    and wrap as an Example."""
    return Example(
        id=f"synthetic-{split}-{index}",
        question=problem.question,
        response=sample_solution(problem, rng, settings.reorder, PHRASINGS[settings.phrasing]),
        answer=str(problem.answer),
        kind="numeric",
        meta={"split": split, "n_terms": len(problem.terms), "key": problem.key()},
    )


def generate_problems(split: str, n: int | None = None, seed: int = DEFAULT_SEED) -> list[Problem]:
    """The first `n` problems of `split` (default `SPLIT_SIZES[split]`); a prefix of a longer
    request, so `generate_problems("train", 100)` is the first 100 train problems."""
    if split not in SPLIT_SETTINGS:
        raise ValueError(f"unknown synthetic split {split!r}; choose from {SPLITS}")
    n = SPLIT_SIZES[split] if n is None else n
    source = "train" if split == "members" else split
    return list(itertools.islice(_problem_stream(source, SPLIT_SETTINGS[split], seed), n))


def generate_split(split: str, n: int | None = None, seed: int = DEFAULT_SEED) -> list[Example]:
    """Examples of `split` with one random reference path each (deterministic in the seed).
    "members" are the first train examples, with the same reference solutions."""
    source = "train" if split == "members" else split
    problems = generate_problems(split, n, seed)
    settings = SPLIT_SETTINGS[split]
    rng = random.Random(f"{seed}:{source}:solutions")
    return [to_example(p, source, i, _wording_rng(p, settings, rng, seed), settings)
            for i, p in enumerate(problems)]


def _wording_rng(problem: Problem, settings: Settings, rng: random.Random, seed: int) -> random.Random:
    """`rng` itself, or for a keyed wording a fresh generator seeded by the key's value (and
    `seed`, not the split: problems about cookies are worded alike in every split that keys by item)."""
    if not settings.wording_key:
        return rng
    if settings.wording_key not in WORDING_KEYS:
        raise ValueError(f"Settings.wording_key: unknown key {settings.wording_key!r}; "
                         f"use '' or one of {sorted(WORDING_KEYS)}")
    return random.Random(f"{seed}:wording:{WORDING_KEYS[settings.wording_key](problem)}")


def pretrain_stream(seed: int = 0, settings: Settings = PRETRAIN) -> Iterator[Example]:
    """Endless problems, each with a fresh random solution, from buckets no split uses."""
    rng = random.Random(f"{seed}:pretrain:solutions")
    for i, problem in enumerate(_problem_stream("pretrain", settings, seed)):
        yield to_example(problem, "pretrain", i, rng, settings)


@register_dataset(
    "synthetic",
    kind="numeric",
    splits=SPLITS,
    description="Seeded arithmetic word problems in GSM8K format whose reference solution is one "
    "of many valid paths; train/validation/test, OOD variants, MIA member/non-member pools.",
)
def load_synthetic(split: str, data_dir: Path | None = None) -> list[Example]:
    """Registered loader: `split` at its default size and seed; `data_dir` is unused."""
    return generate_split(split)
