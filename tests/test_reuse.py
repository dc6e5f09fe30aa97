"""Greedy generations verified from the previous checkpoint's, not re-decoded (`generate_greedy`'s
drafts): on two checkpoints of a tiny model taught known continuations, the output with drafts is
the plain greedy decoding of the same checkpoint, whatever the draft: longer, shorter, empty,
diverging at its first token, stopping at EOS, at the answer line or at the token limit. The same
for references verified by the scoring pass (`verified`), alone or with drafts."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import random

import pytest
import torch

from overmem.cli import main
from overmem.config import EvalConfig, GenerationConfig
from overmem.data.example import Example, format_prompt
from overmem.dynamics import evaluate_examples
from overmem.generation import StopRule, Verified, drafts_are_exact, generate, generate_greedy
from overmem import generation, hf_backend
from overmem.hf_backend import HfBackend
from overmem.results import read_jsonl
from tests.conftest import make_tiny_llama

# What checkpoint A says, then what B (A trained further on other continuations) says.
BEFORE = {"Q: 2+3?\nA:": " 2+3=5.\n#### 5\nThen more.", "Q: 4+4?\nA:": " 4+4=8.\n#### 8\nok", "Stop.\n": "ok",
          "Go.\n": " yes", "Say hi.\n": " hi hi hi hi hi hi hi hi"}
AFTER = {"Q: 2+3?\nA:": " 2+3 is 5.\n#### 5\nThen more.", "Q: 4+4?\nA:": " 4+4=8.\n#### 8\nok",
         "Stop.\n": "ok, stopping now.", "Go.\n": "no", "Say hi.\n": " hi hi"}
PROMPTS = list(BEFORE)


def _teach(model, tokenizer, pairs: dict[str, str], steps: int = 120):
    """`model` trained until its greedy continuation of each prompt is the given text, then EOS."""
    rows = []
    for prompt, text in pairs.items():
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + t, [-100] * len(p) + t))
    width = max(len(ids) for ids, _ in rows)
    x = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    y = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(char_tokenizer):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits on the other processes
    a = _teach(make_tiny_llama(len(char_tokenizer), seed=0), char_tokenizer, BEFORE)
    b = _teach(copy.deepcopy(a), char_tokenizer, AFTER)
    yield a, b
    torch.set_num_threads(before)


def _counting(model, monkeypatch):
    """`model` whose decoded rows are counted (`model.decoded_rows`: the inputs its backend's
    `decode` was given, whichever way it decodes them)."""
    real = HfBackend.decode
    model.decoded_rows = 0

    def counted(self, tokenizer, inputs, *args, **kwargs):
        if self.model is model:
            model.decoded_rows += len(inputs)
        return real(self, tokenizer, inputs, *args, **kwargs)

    monkeypatch.setattr(HfBackend, "decode", counted)
    return model


def test_the_checkpoints_say_what_they_were_taught(checkpoints, char_tokenizer):
    a, b = checkpoints
    for model, taught in ((a, BEFORE), (b, AFTER)):
        texts = generate(model, char_tokenizer, PROMPTS, max_new_tokens=40, stop_at_answer=False)
        assert [t for (t,) in texts] == list(taught.values())


@pytest.mark.parametrize(("max_new_tokens", "stop_at_answer"), [(40, False), (40, True), (10, False)])
def test_drafts_of_the_previous_checkpoint_give_the_plain_greedy_output(checkpoints, char_tokenizer,
                                                                       max_new_tokens, stop_at_answer):
    """B's continuations with A's as drafts are B's plain greedy ones: ids and texts (`generate`'s)."""
    a, b = checkpoints
    kw = dict(max_new_tokens=max_new_tokens, stop_at_answer=stop_at_answer, batch_size=2)
    drafts = [c.ids for c in generate_greedy(a, char_tokenizer, PROMPTS, **kw)]
    plain = generate_greedy(b, char_tokenizer, PROMPTS, **kw)
    reused = generate_greedy(b, char_tokenizer, PROMPTS, drafts=drafts, **kw)
    assert [c.ids for c in reused] == [c.ids for c in plain]
    assert [c.text for c in reused] == [c.text for c in plain] == [t for (t,) in generate(b, char_tokenizer, PROMPTS,
                                                                                          **kw)]
    assert all(c.draft_tokens is None for c in plain)
    assert [c.draft_tokens for c in reused] == [len(d) for d in drafts]
    # Each continuation ends at its stop: EOS, the answer line's newline, or the token limit.
    rule = StopRule(char_tokenizer, max_new_tokens)
    assert all(rule.end(c.ids, stop_at_answer) == len(c.ids) for c in reused)


def test_each_kind_of_draft(checkpoints, char_tokenizer, monkeypatch):
    """With the answer-line stop: which draft tokens were accepted, and when decoding was needed."""
    a, b = checkpoints
    kw = dict(max_new_tokens=40, stop_at_answer=True, batch_size=8)
    drafts = [c.ids for c in generate_greedy(a, char_tokenizer, PROMPTS, **kw)]
    reused = generate_greedy(_counting(b, monkeypatch), char_tokenizer, PROMPTS, drafts=drafts, **kw)
    accepted = dict(zip(PROMPTS, ((c.draft_tokens, c.draft_accepted) for c in reused)))
    assert accepted == {  # (draft tokens, accepted): one token per character, EOS included where written
        "Q: 2+3?\nA:": (len(" 2+3=5.\n#### 5\n"), len(" 2+3")),  # diverges after " 2+3"
        "Q: 4+4?\nA:": (len(" 4+4=8.\n#### 8\n"),) * 2,  # the same, to its answer line
        "Stop.\n": (len("ok") + 1, len("ok")),  # shorter than "ok, stopping now."
        "Go.\n": (len(" yes") + 1, 0),  # against "no": diverges at its first token
        "Say hi.\n": (len(BEFORE["Say hi.\n"]) + 1, len(" hi hi")),  # longer: B writes EOS where A goes on
    }
    # Drafts that reach their stop (4+4 whole, "Say hi." with B's own EOS) need no decoding; the
    # other three are decoded.
    assert b.decoded_rows == 3
    exact = generate_greedy(_counting(b, monkeypatch), char_tokenizer, PROMPTS, drafts=[c.ids for c in reused], **kw)
    assert [c.ids for c in exact] == [c.ids for c in reused] and b.decoded_rows == 0
    assert all(c.draft_accepted == c.draft_tokens == len(c.ids) for c in exact)


def test_made_up_drafts(checkpoints, char_tokenizer):
    """Drafts no checkpoint wrote: empty, wrong first token, the output plus tokens past its stop,
    a prefix of it, random tokens, an id outside the vocabulary (ignored)."""
    _, b = checkpoints
    kw = dict(max_new_tokens=12, stop_at_answer=True, batch_size=3)
    plain = generate_greedy(b, char_tokenizer, PROMPTS, **kw)
    rng = random.Random(0)
    vocab = len(char_tokenizer)
    for make in (lambda ids: [], lambda ids: [(ids[0] + 1) % vocab, *ids[1:]], lambda ids: ids + ids,
                 lambda ids: ids[: len(ids) // 2], lambda ids: [rng.randrange(vocab) for _ in range(20)],
                 lambda ids: [*ids[:2], vocab + 5]):
        drafts = [make(c.ids) for c in plain]
        reused = generate_greedy(b, char_tokenizer, PROMPTS, drafts=drafts, **kw)
        assert [c.ids for c in reused] == [c.ids for c in plain]
        assert [c.text for c in reused] == [c.text for c in plain]


def test_batch_order_and_size_change_nothing(checkpoints, char_tokenizer):
    a, b = checkpoints
    kw = dict(max_new_tokens=30, stop_at_answer=True)
    drafts = {p: c.ids for p, c in zip(PROMPTS, generate_greedy(a, char_tokenizer, PROMPTS, **kw))}
    want = {p: c.ids for p, c in zip(PROMPTS, generate_greedy(b, char_tokenizer, PROMPTS, **kw))}
    order = PROMPTS * 2
    random.Random(1).shuffle(order)
    for batch_size in (1, 3, 10):
        got = generate_greedy(b, char_tokenizer, order, drafts=[drafts[p] for p in order], batch_size=batch_size, **kw)
        assert [c.ids for c in got] == [want[p] for p in order]


@pytest.mark.parametrize(("limit", "stop_at_answer"), [(40, True), (40, False), (6, False)])
def test_a_static_cache_sized_by_the_expected_lengths_gives_the_same_tokens(checkpoints, char_tokenizer, monkeypatch,
                                                                            limit, stop_at_answer):
    """`HfBackend.decode(expected=...)`: a batch whose rows all have an expected length is decoded
    for `EXPECTED_SLACK` tokens past the longest, the rows still going then decoded on from there:
    the continuations are those decoded in one go, whatever the expectation; the answer line, EOS
    and the token limit stop them as before, tokens carried from a draft included."""
    _, b = checkpoints
    monkeypatch.setattr(hf_backend, "EXPECTED_SLACK", 2)
    rule = StopRule(char_tokenizer, limit + 3)
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    backend = HfBackend(b)
    kw = dict(answer_line=[stop_at_answer] * len(PROMPTS), batch_size=3, cache="static")
    plain = [ids for (ids,) in backend.decode(char_tokenizer, prompts, [limit] * len(PROMPTS), **kw)]
    want = [ids[: rule.end(ids, stop_at_answer, limit)] for ids in plain]
    assert max(map(len, want)) > 3  # continuations longer than the shortest caps below
    calls: list[int] = []
    real = b.generate
    monkeypatch.setattr(b, "generate", lambda **k: calls.append(k["max_new_tokens"]) or real(**k))
    for expected in ([1] * 5, [3, 1, 0, 2, 1], [None, 1, 1, 1, 1], [limit] * 5, [1, 1, 1, 1, None]):
        calls.clear()
        got = backend.decode(char_tokenizer, prompts, [limit] * len(PROMPTS), expected=expected, **kw)
        assert [ids[: rule.end(ids, stop_at_answer, limit)] for (ids,) in got] == want, expected
        if expected == [1] * 5 and limit > 6:  # two batches decoded for 3 tokens, then the rows going on
            assert calls[:2] == [3, 3] and calls[2:] and set(calls[2:]) == {limit - 3}, calls
    # Tokens carried from a draft: the first 3 of each continuation are in the input already.
    head = 3
    got = backend.decode(char_tokenizer, [p + w[:head] for p, w in zip(prompts, want)],
                         [limit - head] * len(PROMPTS), carried=[head] * len(PROMPTS), expected=[1] * 5, **kw)
    assert [(w[:head] + ids)[: rule.end(w[:head] + ids, stop_at_answer, limit)] for w, (ids,) in zip(want, got)] == want


@pytest.mark.parametrize(("limit", "stop_at_answer"), [(40, True), (40, False), (6, False)])
def test_the_pruned_loop_decodes_what_generate_decodes(checkpoints, char_tokenizer, monkeypatch, limit, stop_at_answer):
    """`generation.cache: pruned` (greedy decoding on the CPU by default): each row leaves its batch
    at its stop (EOS, the answer line, its own limit), and every row's tokens are `generate`'s up to
    that stop, with prompts of mixed lengths (left padding), any batch size and order, and tokens
    carried from a draft; `generate` is not called, and the batch does shrink."""
    _, b = checkpoints
    backend = HfBackend(b)
    order = PROMPTS * 2
    random.Random(2).shuffle(order)
    prompts = [char_tokenizer(p)["input_ids"] for p in order]
    limits = [max(1, limit - (r % 3) * 2) for r in range(len(order))]  # rows of one batch with other limits
    rule = StopRule(char_tokenizer, limit)
    kw = dict(answer_line=[stop_at_answer] * len(order))
    plain = backend.decode(char_tokenizer, prompts, limits, batch_size=4, cache="static", **kw)
    want = [ids[: rule.end(ids, stop_at_answer, n)] for (ids,), n in zip(plain, limits)]
    assert len(set(map(len, want))) > 2  # rows stop at different steps
    monkeypatch.setattr(b, "generate", lambda **k: pytest.fail("generate was called"))
    real_forward, rows = b.forward, []
    monkeypatch.setattr(b, "forward", lambda *a, **k: rows.append(k["input_ids"].shape) or real_forward(*a, **k))
    for batch_size, share in itertools.product((1, 3, len(order)), (0.0, hf_backend.PRUNE_SHARE)):
        monkeypatch.setattr(hf_backend, "PRUNE_SHARE", share)  # stopped rows leave at once, or a share at a time
        rows.clear()
        got = backend.decode(char_tokenizer, prompts, limits, batch_size=batch_size, cache="pruned", **kw)
        assert [ids for (ids,) in got] == want, (batch_size, share)
        if batch_size == len(order):  # one batch: its prefill, then steps over fewer and fewer rows
            steps = [shape[0] for shape in rows[1:]]
            assert rows[0][0] == len(order) and steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    assert [ids for (ids,) in backend.decode(char_tokenizer, prompts, limits, batch_size=3, cache="auto", **kw)] == want
    head = 3  # the first 3 tokens of each continuation are in the input already, as after a draft
    carried = [min(head, len(w) - 1) for w in want]
    got = backend.decode(char_tokenizer, [p + w[:c] for p, w, c in zip(prompts, want, carried)],
                         [n - c for n, c in zip(limits, carried)], carried=carried, batch_size=3, cache="pruned", **kw)
    assert [w[:c] + ids for w, c, (ids,) in zip(want, carried, got)] == want


def test_the_pruned_loop_leaves_sampling_and_logits_processors_to_generate(checkpoints, char_tokenizer):
    """Where the greedy token is not the logits' argmax (a repetition penalty in the model's
    generation_config), and for sampling, `cache: pruned` decodes with `generate` (static cache):
    the outputs are `generate`'s."""
    _, b = checkpoints
    penalized = make_tiny_llama(len(char_tokenizer), seed=5)  # untrained: flat logits, which a penalty changes
    plain = generate(penalized, char_tokenizer, PROMPTS, max_new_tokens=20)
    penalized.generation_config.repetition_penalty = 3.0
    calls = []
    for model, sampling in ((penalized, False), (b, True)):
        kw = dict(max_new_tokens=20, stop_at_answer=False, do_sample=sampling, num_samples=2 if sampling else 1, seed=3)
        real = model.generate
        model.generate = lambda real=real, **k: calls.append(1) or real(**k)
        pruned = generate(model, char_tokenizer, PROMPTS, cache="pruned", **kw)
        assert calls and pruned == generate(model, char_tokenizer, PROMPTS, cache="static", **kw)
        del model.generate
        calls.clear()
    assert generate(penalized, char_tokenizer, PROMPTS, max_new_tokens=20) != plain  # the penalty was applied


def test_no_drafts_where_greedy_is_not_the_argmax(checkpoints, char_tokenizer):
    """A repetition penalty in the model's generation_config changes the greedy token: drafts are
    not verified by argmax there, and the output is still `generate`'s."""
    a, b = checkpoints
    penalized = copy.deepcopy(b)
    penalized.generation_config.repetition_penalty = 1.5
    assert drafts_are_exact(b) and not drafts_are_exact(penalized)
    drafts = [c.ids for c in generate_greedy(a, char_tokenizer, PROMPTS, max_new_tokens=20)]
    got = generate_greedy(penalized, char_tokenizer, PROMPTS, drafts=drafts, max_new_tokens=20)
    assert all(c.draft_tokens is None for c in got)
    assert [c.text for c in got] == [t for (t,) in generate(penalized, char_tokenizer, PROMPTS, max_new_tokens=20)]


def _run_args(model_dir, files, out, *sets):
    config = out.parent / "config.yaml"
    config.write_text("quiet: true\n")
    base = [f"model.name_or_path={model_dir}", f"data.train={files['train']}[:16]",
            f"data.tests={{test: {files['test']}}}", "data.monitor_size=6", "data.validation_size=6",
            "train.method=full", "train.epochs=3", "train.lr=5e-3", "train.batch_size=8", "train.micro_batch_size=8",
            "train.warmup_steps=0", "generation.max_new_tokens=12", "eval.bootstrap=200"]
    return [str(config), "--out", str(out), *[a for s in (*base, *sets) for a in ("--set", s)]]


def _reference_drafts(model, tokenizer, prompts, references):
    """Each reference as a draft verified by the scoring pass (`HfBackend.score(greedy=True)`)."""
    rows = [(tokenizer(p)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"])
            for p, r in zip(prompts, references)]
    scores = HfBackend(model).score([p + r for p, r in rows], [[-100] * len(p) + r for p, r in rows], pad_id=0,
                                    greedy=True)
    return [Verified(p, r, s.greedy.tolist()) for (p, r), s in zip(rows, scores)]


def test_the_scoring_pass_gives_what_verification_gives(checkpoints, char_tokenizer):
    """`score(greedy=True)`: the greedy token after the prompt and after each reference token, as
    `verify` computes it for prompt + reference (rows of other lengths batched together); a row
    with nothing labelled has none; scores are those of a pass without it."""
    _, b = checkpoints
    backend = HfBackend(b)
    rows = [(char_tokenizer(p)["input_ids"], char_tokenizer(r, add_special_tokens=False)["input_ids"])
            for p, r in zip(PROMPTS, [*BEFORE.values()][::-1])]
    ids, labels = [p + r for p, r in rows], [[-100] * len(p) + r for p, r in rows]
    scores = backend.score(ids + [ids[0]], labels + [[-100] * len(ids[0])], pad_id=0, greedy=True)
    verified = backend.verify(char_tokenizer, dict(enumerate(rows)), batch_size=2)
    assert [s.greedy.tolist() for s in scores[:-1]] == [verified[i] for i in range(len(rows))]
    assert [len(s.greedy) for s in scores[:-1]] == [len(r) + 1 for _, r in rows] and scores[-1].greedy is None
    plain = backend.score(ids, labels, pad_id=0)
    assert all(torch.equal(a.logprobs, c.logprobs) and torch.equal(a.ranks, c.ranks) and c.greedy is None
               for a, c in zip(scores, plain))


def _scored_and_verified(backend, tokenizer, rows, drafts, keep_from=None):
    """Score `rows` (prompt, reference) in batches of 2 with greedy tokens, then verify `drafts` (row
    -> draft) after the rows' prompts, within `keeping_prompts` where `keep_from` is not None (the
    first row scored there: the rows before it are scored outside the block); the widths of the
    model's forward passes during verification, and the scores."""
    widths, scores = [], []
    real = backend.model.forward

    def forward(*args, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return real(*args, input_ids=input_ids, **kwargs)

    def score(part):
        for s in range(0, len(part), 2):
            batch = part[s : s + 2]
            scores.extend(backend.score([p + r for p, r in batch], [[-100] * len(p) + r for p, r in batch], pad_id=0,
                                        greedy=True))

    seqs = {i: (rows[i][0], d) for i, d in drafts.items()}
    if keep_from is None:
        score(rows)
        backend.model.forward = forward
        greedy = backend.verify(tokenizer, seqs, batch_size=3)
    else:
        score(rows[:keep_from])
        with backend.keeping_prompts():
            score(rows[keep_from:])
            backend.model.forward = forward
            greedy = backend.verify(tokenizer, seqs, batch_size=3)
    del backend.model.forward
    return greedy, widths, scores


def test_drafts_verified_after_the_prompts_scoring_kept_give_what_verify_gives(checkpoints, char_tokenizer,
                                                                              monkeypatch):
    """Within `keeping_prompts`, a draft after a prompt the scoring pass ran is verified over the
    draft alone, after that pass's keys and values: the same greedy tokens as a pass over prompt +
    draft, for prompts of other lengths, scored in other batches, twice (two references), with
    drafts longer or shorter than the references, diverging at once or made up; a prompt scored
    outside the block is run again, in the same call. The scores are those of scoring outside it.
    Where nothing can be kept the tokens are the same."""
    a, b = checkpoints
    tok = char_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    references = [*BEFORE.values(), *AFTER.values()]
    rows = [(prompts[i % len(PROMPTS)], tok(r, add_special_tokens=False)["input_ids"]) for i, r in enumerate(references)]
    generated = [c.ids for c in generate_greedy(a, tok, PROMPTS, max_new_tokens=30, stop_at_answer=False)]
    rng = random.Random(0)
    drafts = {i: generated[i] for i in range(len(PROMPTS))}  # A's generations: B follows some, not others
    drafts.update({5: tok(" 2+3 is 5.\n#### 5", add_special_tokens=False)["input_ids"],  # B's own, cut short
                   7: [rng.randrange(3, len(tok)) for _ in range(25)],  # made up: rejected at once
                   9: tok(" hi hi hi hi hi hi hi hi hi hi hi", add_special_tokens=False)["input_ids"]})
    want, plain_widths, want_scores = _scored_and_verified(HfBackend(b), tok, rows, drafts)
    whole = max(len(rows[i][0]) + len(d) for i, d in drafts.items())
    assert max(plain_widths) == whole  # prompt + draft
    got, widths, scores = _scored_and_verified(HfBackend(b), tok, rows, drafts, keep_from=0)
    assert got == want and len(got) == len(drafts)
    assert max(widths) == max(map(len, drafts.values()))  # the drafts alone
    assert all(torch.equal(x.logprobs, y.logprobs) and torch.equal(x.ranks, y.ranks) and torch.equal(x.entropy, y.entropy)
               and torch.equal(x.greedy, y.greedy) for x, y in zip(scores, want_scores))
    # The first two batches scored outside the block: rows 0-3's prompts are kept only through
    # rows 5-8 (the same prompts), so drafts 0-3 and 5-9 run alone; draft 4's prompt is row 4's and 9's.
    got, widths, _ = _scored_and_verified(HfBackend(b), tok, rows, drafts, keep_from=4)
    assert got == want
    only_first = {i: drafts[i] for i in (0, 1)}
    got, widths, _ = _scored_and_verified(HfBackend(b), tok, rows[:4] + rows[:2], only_first, keep_from=4)
    assert got == {i: want[i] for i in (0, 1)} and max(widths) == max(map(len, only_first.values()))
    got, widths, _ = _scored_and_verified(HfBackend(b), tok, rows[:4] + rows[2:4], only_first, keep_from=4)
    assert got == {i: want[i] for i in (0, 1)}  # not kept: run whole
    assert max(widths) == max(len(prompts[i]) + len(drafts[i]) for i in (0, 1))
    mixed = {i: drafts[i] for i in (0, 1, 2)}
    got, widths, _ = _scored_and_verified(HfBackend(b), tok, rows[:4] + rows[2:4], mixed, keep_from=4)
    assert got == {i: want[i] for i in mixed} and len(widths) == 2  # row 2 kept, rows 0 and 1 run whole
    # Nothing kept, and the same tokens: past KEPT_BYTES, with an attention not in KEEPING_ATTENTION,
    # and where a layer did not hand its keys and values to the scoring pass's cache.
    real_update = hf_backend._Pass.update
    for attr, value in (("KEPT_BYTES", 0), ("KEEPING_ATTENTION", ()),
                        ("_Pass.update", lambda self, k, v, layer, *a, **kw: (k, v) if layer == 1 else
                         real_update(self, k, v, layer, *a, **kw))):
        with monkeypatch.context() as patch:
            if attr == "_Pass.update":
                patch.setattr(hf_backend._Pass, "update", value)
            else:
                patch.setattr(hf_backend, attr, value)
            got, widths, _ = _scored_and_verified(HfBackend(b), tok, rows, drafts, keep_from=0)
        assert got == want and max(widths) == whole, attr


def test_evaluation_with_kept_prompts_writes_the_rows_of_evaluation_without(checkpoints, char_tokenizer, monkeypatch):
    """`evaluate_examples` with the previous checkpoint's drafts keeps the prompts its scoring pass
    ran and verifies the drafts after them: every row (scores, generations, draft counts) is the
    one verifying prompt + draft gives."""
    a, b = checkpoints
    # Questions neither checkpoint was taught, references neither writes; the drafts are B's own
    # generations for half the examples (B follows them past their first token: verified) and A's
    # for the others.
    examples = [Example(f"e{i}", q, r, "1") for i, (q, r) in enumerate(zip(PROMPTS * 2, ["Zz."] * 5 + ["Z"] * 5))]
    gen_cfg = GenerationConfig(max_new_tokens=30, batch_size=3, stop_at_answer=False)
    kw = dict(eval_cfg=EvalConfig(bootstrap=100, batch_size=2), gen_cfg=gen_cfg, max_length=512, quiet=True)
    drafts = {r["id"]: r["generation_ids"] for r in evaluate_examples(a, char_tokenizer, examples, **kw)}
    drafts.update({r["id"]: r["generation_ids"] for r in evaluate_examples(b, char_tokenizer, examples[:5], **kw)})
    after = []
    real = HfBackend._verify_after
    monkeypatch.setattr(HfBackend, "_verify_after", lambda self, tok, seqs, **k: after.append(len(seqs)) or real(
        self, tok, seqs, **k))
    kept = evaluate_examples(b, char_tokenizer, examples, drafts=drafts, **kw)
    assert sum(after) >= 5 and [r["draft_accepted"] for r in kept[:5]] == [len(drafts[f"e{i}"]) for i in range(5)]
    monkeypatch.setattr(HfBackend, "keeping_prompts", lambda self: contextlib.nullcontext())
    after.clear()
    assert evaluate_examples(b, char_tokenizer, examples, drafts=drafts, **kw) == kept and after == []
    assert [r["generation_ids"] for r in kept] == [c.ids for c in generate_greedy(
        b, char_tokenizer, [format_prompt(ex.question) for ex in examples], max_new_tokens=30, stop_at_answer=False)]


def _widths(model, monkeypatch, into: list):
    """Record (rows, positions) of each forward pass of `model` in `into`."""
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: into.append(tuple(k["input_ids"].shape)) or real(*a, **k))


@pytest.mark.parametrize("limit", [40, 6])
def test_decoding_resumes_from_the_kept_keys_and_values(checkpoints, char_tokenizer, monkeypatch, limit):
    """Within `keeping_prompts`, the pruned loop starts a row from the keys and values of all but
    its last input token where the scoring pass (its prompt) or a verification (its prompt and the
    draft's accepted prefix) kept them, and runs the others' in one pass first: every row's tokens
    are those of decoding its whole input, in one batch of kept and new rows or in several, rows of
    one input token included; a kept row's input never runs again."""
    _, b = checkpoints
    tok = char_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    references = [tok(r, add_special_tokens=False)["input_ids"] for r in AFTER.values()]
    backend = HfBackend(b)
    def score():  # each prompt with B's reference, greedy tokens too
        return backend.score([p + r for p, r in zip(prompts, references)],
                             [[-100] * len(p) + r for p, r in zip(prompts, references)], pad_id=0, greedy=True)

    scored = score()
    after = [int(s.greedy[0]) for s in scored]  # the greedy token after each prompt
    limits = [limit] * 6
    # Rows 0-2: a prompt and its greedy token (kept by scoring), row 3 a prompt not scored (runs
    # again), row 4 a prompt kept with 3 tokens of a continuation (not kept: runs again), row 5 one token.
    inputs = [p + [g] for p, g in zip(prompts[:3], after[:3])] + [
        tok("Q: 9+9?\nA:")["input_ids"], prompts[3] + references[3][:3], [prompts[4][0]]]
    carried = [1, 1, 1, 0, 3, 0]
    kw = dict(answer_line=[False] * 6, carried=carried, cache="pruned")
    want = backend.decode(tok, inputs, limits, batch_size=6, **kw)
    widths = []
    _widths(b, monkeypatch, widths)
    for batch_size, rows in ((6, slice(0, 5)), (2, slice(0, 5)), (6, slice(0, 6))):
        with backend.keeping_prompts():
            score()
            widths.clear()
            got = backend.decode(tok, inputs[rows], limits[rows], batch_size=batch_size,
                                 **{k: v[rows] if isinstance(v, list) else v for k, v in kw.items()})
        assert got == want[rows], (batch_size, rows)
        if rows.stop == 5 and batch_size == 6:  # one batch: rows 3 and 4 run (all but their last token), then steps
            assert widths[0] == (2, max(len(inputs[3]), len(inputs[4])) - 1) and all(w[1] == 1 for w in widths[1:])
        if rows.stop == 6:  # a row of one token: the batch runs as it would without kept keys and values
            assert widths[0] == (6, max(map(len, inputs)))
    # A draft's accepted prefix: B follows A's " 2+3" and "ok", then rejects the rest.
    picked = (0, 2)
    a_says = [c.ids for c in generate_greedy(checkpoints[0], tok, [PROMPTS[i] for i in picked], max_new_tokens=30,
                                             stop_at_answer=False)]
    with backend.keeping_prompts():
        score()
        greedy = backend.verify(tok, {r: (prompts[i], a_says[r]) for r, i in enumerate(picked)}, batch_size=2)
        heads = [generation._accepted(a_says[r], greedy[r])[0] for r in range(2)]
        assert all(1 < len(h) <= len(d) and h != d[: len(h)] for h, d in zip(heads, a_says))  # accepted in part
        widths.clear()
        resumed = [prompts[i] + h for i, h in zip(picked, heads)]
        got = backend.decode(tok, resumed, [limit] * 2, answer_line=[False] * 2, carried=[len(h) for h in heads],
                             batch_size=2, cache="pruned")
    assert widths and all(w[1] == 1 for w in widths)  # prompt and accepted prefix never run again
    assert got == HfBackend(b).decode(tok, resumed, [limit] * 2, answer_line=[False] * 2,
                                      carried=[len(h) for h in heads], batch_size=2, cache="pruned")
    # Off: the inputs run again, with the same tokens.
    monkeypatch.setattr(hf_backend, "RESUME_KEPT", False)
    with backend.keeping_prompts():
        score()
        widths.clear()
        assert backend.decode(tok, inputs[:5], limits[:5], batch_size=6,
                              **{k: v[:5] if isinstance(v, list) else v for k, v in kw.items()}) == want[:5]
    assert widths[0] == (5, max(map(len, inputs[:5])))


@pytest.mark.parametrize("stop_at_answer", [False, True])
def test_references_verified_by_scoring_give_the_plain_greedy_output(checkpoints, char_tokenizer, stop_at_answer,
                                                                     monkeypatch):
    """References as verified drafts, alone or with the previous checkpoint's drafts: the plain
    greedy output. B's own texts as references finish every continuation with no verification pass
    and no decoding; A's texts (diverging, shorter, longer) leave the rest to the drafts and decoding."""
    a, b = checkpoints
    kw = dict(max_new_tokens=40, stop_at_answer=stop_at_answer, batch_size=3)
    plain = generate_greedy(b, char_tokenizer, PROMPTS, **kw)
    drafts = [c.ids for c in generate_greedy(a, char_tokenizer, PROMPTS, **kw)]
    passes = []
    real_verify = HfBackend.verify
    monkeypatch.setattr(HfBackend, "verify", lambda self, tok, seqs, **k: passes.append(len(seqs)) or real_verify(
        self, tok, seqs, **k))
    own = generate_greedy(_counting(b, monkeypatch), char_tokenizer, PROMPTS, drafts=drafts,
                          verified=_reference_drafts(b, char_tokenizer, PROMPTS, AFTER.values()), **kw)
    assert [c.ids for c in own] == [c.ids for c in plain] and [c.text for c in own] == [c.text for c in plain]
    assert b.decoded_rows == 0 and passes == [0]
    eos = char_tokenizer.eos_token_id  # B's own EOS comes after its reference
    assert all(c.draft_source == "reference" and c.draft_accepted == len(c.ids) - (c.ids[-1] == eos) for c in own)
    # A's texts as references: " yes" for "Go.\n" diverges at once (no draft); "Q: 4+4?" and "Say hi."
    # finish where B does (" hi hi", then B's EOS). With A's generations as drafts too, the drafts
    # count where they give as much as the reference ("Q: 2+3?": " 2+3" either way).
    for given, want in ((None, ["reference", "reference", "reference", None, "reference"]),
                        (drafts, ["previous", "reference", "previous", "previous", "reference"])):
        got = generate_greedy(b, char_tokenizer, PROMPTS, drafts=given,
                              verified=_reference_drafts(b, char_tokenizer, PROMPTS, BEFORE.values()), **kw)
        assert [c.ids for c in got] == [c.ids for c in plain] and [c.text for c in got] == [c.text for c in plain]
        assert [c.draft_source for c in got] == want
        assert all(0 <= c.draft_accepted <= c.draft_tokens for c in got if c.draft_source)


def test_a_draft_the_scoring_pass_already_decides_is_not_verified_again(checkpoints, char_tokenizer, monkeypatch):
    """A previous checkpoint's draft rejected (or ended) while it still follows a verified reference
    is accepted as verification would accept it, with no pass of its own; one that follows the model
    past the reference's agreeing prefix is verified. The output is the plain greedy one either way."""
    a, b = checkpoints
    kw = dict(max_new_tokens=40, stop_at_answer=False, batch_size=2)
    plain = generate_greedy(b, char_tokenizer, PROMPTS, **kw)
    prompt_ids = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    verified = []
    real_verify = HfBackend.verify
    monkeypatch.setattr(HfBackend, "verify", lambda self, tok, seqs, **k: verified.append(sorted(seqs)) or real_verify(
        self, tok, seqs, **k))
    references = _reference_drafts(b, char_tokenizer, PROMPTS, BEFORE.values())  # A's texts, scored by B
    # A's generations follow A's texts: B rejects " 2+3=" at "=" and " yes" at " ", both on the
    # reference's path (the other three finish on their reference alone).
    drafts = [c.ids for c in generate_greedy(a, char_tokenizer, PROMPTS, **kw)]
    verified.clear()
    got = generate_greedy(b, char_tokenizer, PROMPTS, drafts=drafts, verified=references, **kw)
    assert [c.ids for c in got] == [c.ids for c in plain] and verified == [[]]
    greedy = real_verify(HfBackend(b), char_tokenizer, {i: (prompt_ids[i], drafts[i]) for i in (0, 3)}, batch_size=2)
    by_hand = {i: next(j for j, (t, g) in enumerate(zip(drafts[i], greedy[i])) if t != g) for i in (0, 3)}
    assert by_hand == {0: len(" 2+3"), 3: 0}
    assert [(c.draft_source, c.draft_accepted, c.draft_tokens) for c in got[:4:3]] == [
        ("previous", by_hand[0], len(drafts[0])), ("previous", 0, len(drafts[3]))]
    # B's own generations follow the model past each reference's agreeing prefix: verified.
    own = [c.ids for c in plain]
    verified.clear()
    got = generate_greedy(b, char_tokenizer, PROMPTS, drafts=own, verified=references, **kw)
    assert [c.ids for c in got] == [c.ids for c in plain] and verified == [[0, 2, 3]]


def test_references_in_evaluation_memorized_or_cut(char_tokenizer, one_thread):
    """`evaluate_examples` with reuse: examples a model has memorized take their reference as draft
    (one runs on past its answer line, one has none); where scoring cut the prompt to fit
    `max_length` but generation sees it whole, the reference is not used. The generations are
    those of reuse off either way."""
    examples = [Example("a", "Q 2+3?", "2+3=5.\n#### 5\nThen more.", "5"), Example("b", "Q 4+4?", "4+4=8.\n#### 8", "8"),
                Example("c", "Q empty", "", "1")]
    taught = {"a": examples[0].response, "b": "4+4=8.\n#### 8\nok", "c": "#### 1\n"}
    prompts = {ex.id: char_tokenizer(format_prompt(ex.question))["input_ids"] for ex in examples}
    model = make_tiny_llama(len(char_tokenizer), seed=0)
    _teach(model, char_tokenizer, {format_prompt(ex.question): taught[ex.id] for ex in examples}, steps=150)
    whole = 512
    cut = max(map(len, prompts.values())) + 1  # every prompt fits; no reference with it
    for max_length in (whole, cut):
        rows = {}
        for reuse in (True, False):
            gen_cfg = GenerationConfig(max_new_tokens=30, batch_size=2, reuse_drafts=reuse)
            rows[reuse] = evaluate_examples(model, char_tokenizer, examples, eval_cfg=EvalConfig(bootstrap=100),
                                            gen_cfg=gen_cfg, max_length=max_length, quiet=True)
        assert [r["generation_ids"] for r in rows[True]] == [r["generation_ids"] for r in rows[False]]
        assert [r["generation"] for r in rows[False]] == ["2+3=5.\n#### 5", "4+4=8.\n#### 8", "#### 1"]
        truncated = [r["truncated"] for r in rows[True]]
        sources = [r.get("draft_source") for r in rows[True]]
        if max_length == whole:
            assert truncated == [False, False, False] and sources == ["reference", "reference", None]
            assert [r["draft_accepted"] for r in rows[True][:2]] == [len("2+3=5.\n#### 5\n"), len("4+4=8.\n#### 8")]
        else:
            assert truncated == [True, True, False] and sources == [None, None, None]


def test_a_reference_scored_after_another_prompt_is_not_used(checkpoints, char_tokenizer):
    """A verified draft counts only for the prompt ids its pass saw: another prompt's (or a prompt
    cut to `max_prompt_tokens`) is ignored, and the output is still the plain one."""
    _, b = checkpoints
    kw = dict(max_new_tokens=20, stop_at_answer=False)
    plain = generate_greedy(b, char_tokenizer, PROMPTS, **kw)
    verified = _reference_drafts(b, char_tokenizer, PROMPTS, AFTER.values())
    shifted = generate_greedy(b, char_tokenizer, PROMPTS, verified=verified[1:] + verified[:1], **kw)
    assert [c.ids for c in shifted] == [c.ids for c in plain] and all(c.draft_tokens is None for c in shifted)
    cut = generate_greedy(b, char_tokenizer, PROMPTS, verified=verified, max_prompt_tokens=3, **kw)
    assert all(c.draft_tokens is None for c in cut)
    with pytest.raises(ValueError, match="verified: 1 for 5 prompts"):
        generate_greedy(b, char_tokenizer, PROMPTS, verified=verified[:1], **kw)


def _rows(run, drop=("seconds", "draft_tokens", "draft_accepted", "reference_drafts")):
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(run / "dynamics.jsonl")]


@pytest.mark.slow
def test_a_run_and_a_scan_with_drafts_write_the_rows_of_a_run_without(tiny_model_dir, toy_jsonl, tmp_path, one_thread):
    plain, reused, scanned = tmp_path / "plain", tmp_path / "reused", tmp_path / "scanned"
    assert main(["run", *_run_args(tiny_model_dir, toy_jsonl, plain, "generation.reuse_drafts=false")]) == 0
    assert main(["run", *_run_args(tiny_model_dir, toy_jsonl, reused)]) == 0
    assert main(["scan", str(plain / "checkpoints"), *_run_args(tiny_model_dir, toy_jsonl, scanned)[1:]]) == 0
    want = _rows(plain)
    assert _rows(reused) == want
    assert _rows(scanned) == want
    for run in (reused, scanned):
        rows = read_jsonl(run / "dynamics.jsonl")
        assert all(0 <= r["draft_accepted"] <= r["draft_tokens"] for r in rows if "draft_tokens" in r)
        assert all("draft_tokens" in r for r in rows if r["checkpoint"] != "epoch-0")
        for r in rows:  # the totals are the samples' sums, and the generations are the plain run's
            samples = read_jsonl(run / "samples" / r["checkpoint"] / f"{r['split']}.jsonl")
            assert r.get("draft_accepted", 0) == sum(s.get("draft_accepted", 0) for s in samples)
            assert r.get("reference_drafts", 0) == sum(s.get("draft_source") == "reference" for s in samples)
            if r["checkpoint"] == "epoch-0":  # no previous checkpoint: the references are the only drafts
                assert all(s.get("draft_source") in (None, "reference") for s in samples)
            mine = {s["id"]: s["generation"] for s in samples}
            theirs = {s["id"]: s["generation"] for s in read_jsonl(plain / "samples" / r["checkpoint"]
                                                                   / f"{r['split']}.jsonl")}
            assert mine == theirs
    assert json.loads((reused / "phases.json").read_text()) == json.loads((plain / "phases.json").read_text())
