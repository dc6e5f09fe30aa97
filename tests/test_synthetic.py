"""The synthetic task: determinism, arithmetic validity of every path, disjoint splits, OOD."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from overmem.data import synthetic as syn
from overmem.data.synthetic_problems import (
    check_solution,
    enumerate_plans,
    render_solution,
    sample_plan,
    sample_solution,
    sample_solutions,
)
from overmem.data.synthetic_wording import ITEMS, PEOPLE, PLAIN, RICH, STEP_TEMPLATES
from tests.conftest import wording_skeleton

N = 60  # problems per split checked; enough to hit every template many times


@pytest.fixture(scope="module")
def splits() -> dict[str, list]:
    return {s: syn.generate_split(s, N) for s in syn.SPLITS}


def test_deterministic_under_seed():
    a = syn.generate_split("train", 20, seed=7)
    b = syn.generate_split("train", 20, seed=7)
    c = syn.generate_split("train", 20, seed=8)
    assert a == b
    assert [e.question for e in a] != [e.question for e in c]


def test_prefix_property():
    # Asking for fewer examples gives a prefix of the longer list.
    assert syn.generate_split("test", 10) == syn.generate_split("test", 30)[:10]


def _notes(text: str) -> list[tuple[str, int, int]]:
    return [(e, int(v), int(s)) for e, v, s in re.findall(r"<<([^=>]+)=(-?\d+)>>(-?\d+)", text)]


def _assert_valid(solution: str, answer: int) -> None:
    notes = _notes(solution)
    assert notes, solution
    for expr, value, shown in notes:
        assert re.fullmatch(r"\d+(?:[+\-*]\d+)+", expr), expr
        assert eval(expr) == value == shown, (expr, value, shown)  # digits and + - * only
    # The visible text before each note repeats the note's expression with spaces.
    for shown_expr, note_expr in re.findall(r"(\d+(?: [+\-*] \d+)+) = <<([^=]+)=", solution):
        assert shown_expr.replace(" ", "") == note_expr
    assert solution.splitlines()[-1] == f"#### {answer}"
    assert notes[-1][1] == answer
    assert check_solution(solution) == (True, answer)


@pytest.mark.parametrize("split", syn.SPLITS)
def test_references_are_correct(splits, split):
    for ex in splits[split]:
        _assert_valid(ex.response, int(ex.answer))
        assert ex.kind == "numeric" and ex.answer.lstrip("-").isdigit()


def test_answer_is_signed_sum_of_question_numbers():
    # Independent check of the answer from the structure.
    for p in syn.generate_problems("test", N):
        total = 0
        for t in p.terms:
            total += (-1 if t.kind == "loss" else 1) * (t.a * (t.b or 1))
        assert p.answer == total >= 0


def test_every_plan_and_phrasing_is_valid():
    problems = syn.generate_problems("test", 25)
    for p in problems:
        plans = enumerate_plans(p)
        # Problems with three or more amounts have several calculation orders; every problem
        # (two amounts included) has many valid written solutions.
        assert len(plans) >= 2 or len(p.terms) == 2
        assert len(set(sample_solutions(p, 10, seed=1))) >= 5
        rng = random.Random(0)
        for plan in plans:
            for _ in range(3):
                _assert_valid(render_solution(p, plan, rng), p.answer)


def test_sampled_plans_are_enumerated():
    for p in syn.generate_problems("validation", 20):
        plans = set(enumerate_plans(p))
        rng = random.Random(1)
        for _ in range(20):
            assert sample_plan(p, rng) in plans


def test_many_distinct_solutions_per_problem():
    # Free choices must dominate the reference: many distinct texts for one problem.
    for p in syn.generate_problems("test", 10):
        sols = sample_solutions(p, 40, seed=3)
        assert len(set(sols)) >= 30
        for s in sols:
            _assert_valid(s, p.answer)


def test_every_step_template_is_reachable():
    rng = random.Random(0)
    seen = set()
    # Some templates need rare structures (two losses summed first): draw many problems.
    for p in syn.generate_problems("train", 2000):
        for _ in range(3):
            seen.update(sample_solution(p, rng).splitlines())
    text = "\n".join(seen)
    for kind, templates in STEP_TEMPLATES.items():
        for t in templates:
            if not t:
                continue
            head = t.split("{")[0] or t.split("}")[1].split("{")[0]
            assert head.strip().lower() in text.lower(), (kind, t)  # openers lower-case the start


def test_check_solution_rejects_errors():
    assert check_solution("a 3 + 4 = <<3+4=8>>8 b\n#### 8")[0] is False
    assert check_solution("a 3 + 4 = <<3+4=7>>8 b\n#### 8")[0] is False
    assert check_solution("a 3 + 4 = <<3+4=7>>7 b\n#### 8")[0] is False
    assert check_solution("a 3 + 4 = <<3+4=7>>7 b\n#### 7") == (True, 7)


def test_splits_disjoint():
    sizes = {"train": 400, "validation": 100, "test": 100, "nonmembers": 100}
    keys = {s: {p.key() for p in syn.generate_problems(s, n)} for s, n in sizes.items()}
    questions = {s: {e.question for e in syn.generate_split(s, n)} for s, n in sizes.items()}
    names = list(sizes)
    for i, a in enumerate(names):
        assert len(keys[a]) == sizes[a]  # no repeats inside a split
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
            assert not questions[a] & questions[b], (a, b)
    for ood in ("ood_steps", "ood_wording", "ood_numbers", "ood_distractor"):
        ood_keys = {p.key() for p in syn.generate_problems(ood, 100)}
        assert not ood_keys & keys["train"]


def test_pretrain_stream_disjoint_from_splits():
    stream = syn.pretrain_stream(seed=0)
    keys = {next(stream).meta["key"] for _ in range(300)}
    for s in ("train", "validation", "test", "nonmembers"):
        assert not keys & {p.key() for p in syn.generate_problems(s, 100)}


def test_members_are_train_and_nonmembers_are_not():
    train = syn.generate_split("train", syn.SPLIT_SIZES["members"])
    assert syn.generate_split("members", syn.SPLIT_SIZES["members"]) == train
    train_q = {e.question for e in syn.generate_split("train", 400)}
    assert not train_q & {e.question for e in syn.generate_split("nonmembers", 100)}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_ood_variants_differ_as_claimed(splits):
    std_terms = {len(syn.generate_problems("test", N)[i].terms) for i in range(N)}
    ood_terms = {len(p.terms) for p in syn.generate_problems("ood_steps", N)}
    assert max(std_terms) < min(ood_terms)

    # Larger numbers: every amount of the OOD split lies above the standard range of its kind.
    std = syn.STANDARD
    for p in syn.generate_problems("ood_numbers", N):
        for t in p.terms:
            if t.b is not None:
                assert min(t.a, t.b) > std.factor_range[1]
            else:
                hi = std.start_range[1] if t.kind == "start" else std.plain_range[1]
                assert t.a > hi

    # Unseen wording: no question sentence of the OOD split appears among standard templates'
    # sentences, and vice versa (compare sentences with numbers and names stripped).
    def shapes(examples):
        out = set()
        for e in examples:
            for sent in re.split(r"(?<=[.?])\s", e.question):
                out.add(re.sub(r"\d+", "N", sent.split(" ", 1)[1]))
        return out

    assert not shapes(splits["ood_wording"]) & shapes(splits["test"])

    # Distractors: extra sentences, but the answer is still the signed sum of the real amounts.
    n_std = [len(re.split(r"(?<=[.?])\s", e.question)) for e in splits["test"]]
    for p in syn.generate_problems("ood_distractor", N):
        n_sent = len(re.split(r"(?<=[.?])\s", p.question))
        assert n_sent >= len(p.terms) + 2  # terms + question + at least one distractor
    assert max(n_std) == max(len(p.terms) for p in syn.generate_problems("test", N)) + 1


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown synthetic split"):
        syn.generate_split("nope")


def test_in_order_paths_are_a_subset_and_the_splits_use_them():
    """STANDARD keeps the question's order of amounts (REORDER allows any order); the free
    choices left are on the surface (phrasing, a product's factor order), still many per problem."""
    assert syn.STANDARD.reorder is False and syn.REORDER.reorder is True
    rng = random.Random(2)
    for p in syn.generate_problems("test", 30):
        in_order = set(enumerate_plans(p, reorder=False))
        assert in_order <= set(enumerate_plans(p, reorder=True))
        assert all(plan.strategy == "sequential" and plan.order == tuple(range(1, len(p.terms)))
                   for plan in in_order)
        for _ in range(10):
            assert sample_plan(p, rng, reorder=False) in in_order
        sols = sample_solutions(p, 40, seed=4, reorder=False)
        assert len(set(sols)) >= 30
        for s in sols:
            _assert_valid(s, p.answer)
    # The split references follow the question's order: the first calculation that is not a
    # product starts from the starting amount (or its product).
    for ex, p in zip(syn.generate_split("test", 50), syn.generate_problems("test", 50)):
        first = next(line for line in ex.response.splitlines() if "<<" in line and "*" not in line.split("<<")[1])
        start = p.terms[0].value
        second = p.terms[1].value
        note = first.split("<<")[1].split("=")[0]
        assert sorted(int(x) for x in re.split(r"[-+]", note)) == sorted([start, second]), (ex.response, p.terms)


def test_finetuning_splits_have_no_products_but_the_pretraining_text_does():
    """Products are in the base model's pretraining text (and in REORDER), not in the splits."""
    for split in ("train", "test", "ood_steps", "ood_numbers"):
        assert all(t.b is None for p in syn.generate_problems(split, 200) for t in p.terms), split
    stream = syn.pretrain_stream(seed=0)
    pretrain = [next(stream) for _ in range(200)]
    assert sum("*" in e.response for e in pretrain) > 40  # ~1 - 0.85^2.5 of the problems
    assert syn.STANDARD == replace(syn.PRETRAIN, product_prob=0.0, phrasing="plain")


def test_plain_phrasing_is_what_the_splits_use_and_every_choice_is_reachable():
    """The finetuning splits write solutions with PLAIN only (the pretraining text with RICH),
    and every wording of PLAIN occurs in them (in the test split: the training split words its
    references per item kind, see the next test)."""
    assert syn.PRETRAIN.phrasing == "rich" and syn.REORDER.phrasing == "rich"
    assert all(syn.SPLIT_SETTINGS[s].phrasing == "plain" for s in syn.SPLITS)
    plain = PLAIN
    examples = syn.generate_split("test", 600)
    lines = [line for e in examples for line in e.response.splitlines()]
    steps = [line for line in lines if "<<" in line]
    starts = {line.split(" = ")[0].rsplit(" ", 3)[0] for line in steps}
    for opener in plain.openers:
        for step in plain.steps:
            head = step.split(" {expr}")[0]
            want = opener + (head[0].lower() + head[1:] if opener else head)
            assert want in starts, want
    for tail in plain.tails:
        assert any(line.endswith(f"{tail}.") for line in steps), tail
    assert not any(w in " ".join(lines) for w in ("Well,", "This way", "works out to", "The count"))
    closings = [line for line in lines if "<<" not in line and not line.startswith("####")]
    for c in plain.closings:
        if c:
            pattern = re.escape(c).replace(r"\{name\}", r"\w+").replace(r"\{ans\}", r"\d+").replace(r"\{item\}", r"\w+")
            assert any(re.fullmatch(pattern, line) for line in closings), c
    assert len(closings) < len(examples)  # some solutions have no closing


def test_training_references_are_worded_alike_per_item_and_test_references_are_not():
    """TRAIN draws the wording once per item kind: every training reference about cookies with
    the same number of amounts reads the same but for its numbers and name; non-members share
    those wordings (the same distribution as the members), test and validation references draw
    their own."""
    assert syn.SPLIT_SETTINGS["train"].wording_key == "item"
    assert {syn.SPLIT_SETTINGS[s].wording_key for s in ("members", "nonmembers")} == {"item"}
    assert {syn.SPLIT_SETTINGS[s].wording_key for s in syn.SPLITS if s not in ("train", "members", "nonmembers")} == {""}

    def by_group(split, n):
        groups: dict[tuple[str, int], set[str]] = {}
        for ex, p in zip(syn.generate_split(split, n), syn.generate_problems(split, n)):
            groups.setdefault((p.item, len(p.terms)), set()).add(wording_skeleton(ex.response))
        return groups

    train = by_group("train", 400)
    assert len(train) == 2 * len(ITEMS)  # every item kind with 1 and 2 changes
    assert all(len(skeletons) == 1 for skeletons in train.values())
    # The wordings differ between item kinds (12 draws out of 54 first lines).
    assert len({next(iter(v)).splitlines()[0] for v in train.values()}) >= 6
    nonmembers = by_group("nonmembers", 200)
    assert all(nonmembers[key] == train[key] for key in nonmembers)
    test = by_group("test", 400)
    assert sum(len(v) for v in test.values()) > 300  # nearly one wording per reference
    # Under another generator seed the item kinds draw other wordings.
    other = {(p.item, len(p.terms)): wording_skeleton(ex.response) for ex, p in
             zip(syn.generate_split("train", 400, seed=1), syn.generate_problems("train", 400, seed=1))}
    assert sum(other[key] != next(iter(train[key])) for key in train) >= len(train) // 2


def test_unknown_wording_key_is_a_clear_error():
    bad = replace(syn.TRAIN, wording_key="colour")
    p = syn.generate_problems("train", 1)[0]
    with pytest.raises(ValueError, match="Settings.wording_key: unknown key 'colour'"):
        syn.to_example(p, "train", 0, syn._wording_rng(p, bad, random.Random(0), 0), bad)


def test_no_plain_closing_starts_like_a_step_line():
    """Another step or the closing: the question decides, so no free choice may decide it."""
    names = {p[0] for p in PEOPLE}
    step_words = {o.split()[0].rstrip(",") for o in PLAIN.openers if o}
    step_words |= {s.split()[0] for s in PLAIN.steps}
    for closing in PLAIN.closings:
        if closing:
            first = closing.split()[0].rstrip(":")
            assert first not in step_words, closing
            assert first == "{name}" or first not in names
    # RICH (the pretraining text) does not have this property: "So ..." starts both.
    assert any(c.startswith("So ") for c in RICH.closings) and "So " in RICH.openers
