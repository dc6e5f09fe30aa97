import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from overmem.data.encoding import IGNORE, encode_example, fit_lengths, pad_right
from overmem.data.example import format_prompt
from overmem.scoring import TokenStats, score_batch, score_examples
from tests.conftest import make_tiny_llama, toy_examples

pytestmark = pytest.mark.usefixtures("one_thread")

def reference_logprobs(model, tokenizer, example, prompt_tokens=None):
    """Independent computation: one example at a time, no padding, explicit log_softmax; the
    prompt's last `prompt_tokens` tokens only, when given."""
    prompt = tokenizer(format_prompt(example.question))["input_ids"][-prompt_tokens if prompt_tokens else 0 :]
    resp = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return [float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(resp)]


def test_perplexity_matches_unbatched_reference(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer))
    examples = toy_examples(5)
    # Make lengths differ so that batches carry padding.
    examples[1] = examples[1].__class__(**{**examples[1].__dict__, "response": examples[1].response + " Done!"})
    scores = score_examples(model, char_tokenizer, examples, batch_size=3)
    for ex, s in zip(examples, scores):
        ref = reference_logprobs(model, char_tokenizer, ex)
        assert s.n_tokens == len(ref) == len(ex.response)
        assert torch.allclose(s.logprobs.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
        assert math.isclose(s.ppl, math.exp(-sum(ref) / len(ref)), rel_tol=1e-4)


def test_a_batch_runs_the_tokens_its_rows_begin_with_once(char_tokenizer, monkeypatch):
    """The prompt template's opening, which every row begins with, runs in one pass of its own and
    the batch after its keys and values: the same scores and greedy tokens as the whole pass, and
    as one example at a time."""
    from overmem import hf_backend
    from overmem.hf_backend import HfBackend

    model = make_tiny_llama(len(char_tokenizer), seed=2)
    examples = toy_examples(4)
    encoded = [encode_example(char_tokenizer, ex, max_length=4096, add_eos=False) for ex in examples]
    ids, labels = [e.ids for e in encoded], [e.labels for e in encoded]
    prompts = [len(char_tokenizer(format_prompt(ex.question))["input_ids"]) for ex in examples]
    # Worked out here: the rows' common opening, which ends inside the questions ("... Instruction:\n").
    shared = next(j for j in range(min(map(len, ids))) if len({row[j] for row in ids}) > 1)
    assert hf_backend.SHARED_MIN <= shared < min(prompts)
    widths = []
    real = model.forward

    def forward(*args, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return real(*args, input_ids=input_ids, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", forward)
        got = HfBackend(model).score(ids, labels, pad_id=0, greedy=True)
        assert widths == [shared, max(map(len, ids)) - shared]
        patch.setattr(hf_backend, "SHARED_MIN", 10**9)
        whole = HfBackend(model).score(ids, labels, pad_id=0, greedy=True)
        assert widths[2:] == [max(map(len, ids))]
    for ex, a, b in zip(examples, got, whole):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.ranks, b.ranks) and torch.equal(a.greedy, b.greedy)
        ref = torch.tensor(reference_logprobs(model, char_tokenizer, ex), dtype=torch.float64)
        assert torch.allclose(a.logprobs.double(), ref, atol=1e-4)


def test_the_shared_opening_stops_before_the_scored_positions_and_each_rows_last_token(vocab50_model, monkeypatch):
    from overmem import hf_backend
    from overmem.hf_backend import HfBackend

    monkeypatch.setattr(hf_backend, "SHARED_MIN", 2)
    backend = HfBackend(vocab50_model)
    assert backend._shared([[5, 6, 7, 8, 9], [5, 6, 7, 1]], first=10) == 3  # where they part
    assert backend._shared([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]], first=3) == 3  # the first position read
    assert backend._shared([[5, 6, 7, 8], [5, 6, 7, 8, 9]], first=10) == 3  # a token of each row's own
    assert backend._shared([[5, 6, 7, 8], [5, 9]], first=10) == 0  # fewer than SHARED_MIN
    assert backend._shared([[5, 6, 7, 8]], first=10) == 0  # one row: nothing to share
    with monkeypatch.context() as patch:
        patch.setattr(hf_backend, "KEEPING_ATTENTION", ())  # a pass may not run after another's keys
        assert HfBackend(vocab50_model)._shared([[5, 6, 7, 8, 9], [5, 6, 7, 1]], first=10) == 0
    # Scored from position 2 on (first read: 1), the opening is too short to share; from position
    # 5 on, the first 4 tokens run once.
    rows = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 11]]
    widths = []
    real = vocab50_model.forward

    def forward(*args, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(vocab50_model, "forward", forward)
    for start, want in ((2, [6]), (5, [4, 2])):
        labels = [[IGNORE] * start + row[start:] for row in rows]
        widths.clear()
        got = HfBackend(vocab50_model).score(rows, labels, pad_id=0, greedy=True)
        assert widths == want
        with monkeypatch.context() as patch:
            patch.setattr(hf_backend, "SHARED_MIN", 10**9)
            whole = HfBackend(vocab50_model).score(rows, labels, pad_id=0, greedy=True)
        for x, y in zip(got, whole):
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=1e-5)
            assert x.n_tokens == 6 - start and torch.equal(x.greedy, y.greedy)


def _brute_cut(widths, max_rows, max_slots, pass_tokens):
    """Independent computation: every way to cut `widths` into consecutive batches, the cheapest."""
    import itertools

    n, best = len(widths), None
    for ends in itertools.product((False, True), repeat=n - 1):
        bounds = [0] + [i + 1 for i, e in enumerate(ends) if e] + [n]
        parts = [widths[a:b] for a, b in zip(bounds, bounds[1:])]
        if any(len(p) > max_rows or (len(p) > 1 and len(p) * max(p) > max_slots) for p in parts):
            continue
        cost = sum(pass_tokens + len(p) * max(p) for p in parts)
        if best is None or cost < best[0]:
            best = (cost, [len(p) for p in parts])
    return best


def test_rows_are_cut_into_the_batches_that_cost_least():
    from overmem.hf_backend import _cut

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 10))
        widths = sorted(rng.integers(1, 120, size=n).tolist(), reverse=bool(trial % 2))
        max_rows, max_slots, pass_tokens = int(rng.integers(1, 6)), int(rng.integers(100, 400)), int(rng.integers(0, 80))
        sizes = _cut(widths, max_rows, max_slots=max_slots, pass_tokens=pass_tokens)
        cost, _ = _brute_cut(widths, max_rows, max_slots, pass_tokens)
        assert sum(sizes) == n and all(1 <= k <= max_rows for k in sizes)
        bounds = np.cumsum([0] + sizes)
        parts = [widths[a:b] for a, b in zip(bounds, bounds[1:])]
        assert all(len(p) == 1 or len(p) * max(p) <= max_slots for p in parts)
        assert sum(pass_tokens + len(p) * max(p) for p in parts) == cost
    # Worked by hand: two short rows and two long ones, a pass worth 10 tokens: two batches
    # (2 x 3 + 2 x 50 + 20 = 126) rather than one (4 x 50 + 10 = 210).
    assert _cut([3, 3, 50, 50], 4, pass_tokens=10) == [2, 2]
    assert _cut([3, 3, 50, 50], 4, pass_tokens=200) == [4]  # a pass costs more than the padding
    assert _cut([], 4) == []


def test_a_batch_of_rows_far_apart_in_length_runs_in_passes_of_similar_rows(char_tokenizer, monkeypatch):
    """Long and short rows in one `score` call run in two passes, each padded to its own longest:
    every row's scores within float32 rounding of one pass over the whole batch, and of one
    example at a time; results in the order given."""
    from overmem import hf_backend
    from overmem.hf_backend import HfBackend

    model = make_tiny_llama(len(char_tokenizer), seed=3)
    examples = toy_examples(6)
    for i in (1, 4):  # two rows much longer than the others
        examples[i] = replace(examples[i], response=examples[i].response + " and so on" * 12)
    encoded = [encode_example(char_tokenizer, ex, max_length=4096, add_eos=False) for ex in examples]
    ids, labels = [e.ids for e in encoded], [e.labels for e in encoded]
    lengths = [len(row) for row in ids]
    shapes = []
    real = model.forward

    def forward(*args, input_ids=None, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(hf_backend, "SHARED_MIN", 10**9)  # one pass per batch: its shape is the batch's
    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", forward)
        got = HfBackend(model).score(ids, labels, pad_id=0, greedy=True)
        short = [n for i, n in enumerate(lengths) if i not in (1, 4)]
        assert shapes == [(4, max(short)), (2, max(lengths[1], lengths[4]))]
        patch.setattr(hf_backend, "PASS_TOKENS", 10**9)  # a pass costs more than any padding: one pass
        whole = HfBackend(model).score(ids, labels, pad_id=0, greedy=True)
        assert shapes[2:] == [(6, max(lengths))]
    for ex, a, b in zip(examples, got, whole):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.ranks, b.ranks) and torch.equal(a.greedy, b.greedy)
        assert a.n_tokens == len(ex.response)
        ref = torch.tensor(reference_logprobs(model, char_tokenizer, ex), dtype=torch.float64)
        assert torch.allclose(a.logprobs.double(), ref, atol=1e-4)


def test_greedy_tokens_are_the_first_largest_logit():
    from overmem.hf_backend import _argmax

    logits = torch.randn(3, 5, 40)
    logits[0, 0, [3, 7, 30]] = 100.0  # a tie: the first of them
    logits[1, 2, [0, 39]] = 100.0
    picks = _argmax(logits)
    assert torch.equal(picks, logits.argmax(dim=-1))
    assert int(picks[0, 0]) == 3 and int(picks[1, 2]) == 0


def test_encode_masks_prompt_and_appends_eos(char_tokenizer):
    ex = toy_examples(1)[0]
    ids, labels, _ = encode_example(char_tokenizer, ex, max_length=4096, add_eos=True)
    n_prompt = len(char_tokenizer(format_prompt(ex.question))["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == char_tokenizer.eos_token_id
    assert char_tokenizer.decode(ids[n_prompt:-1]) == ex.response


# ---------------------------------------------------------------------------------------------
# Over-length examples: the prompt loses its start; the response, which is scored, stays whole


@pytest.mark.parametrize("n_prompt, n_response, kept", [
    (10, 5, (10, 5)),  # fits: untouched
    (15, 5, (15, 5)),  # fits exactly
    (30, 5, (15, 5)),  # the prompt loses its first 15 tokens
    (30, 19, (1, 19)),  # the response needs all but the one prompt token before it
    (30, 25, (1, 19)),  # a response too long even then keeps its first tokens
    (5, 25, (1, 19)),
    (0, 25, (0, 20)),  # no prompt token to keep
])
def test_fit_lengths(n_prompt, n_response, kept):
    assert fit_lengths(n_prompt, n_response, 20) == kept


def test_encode_cuts_an_overlong_prompt_from_the_left(char_tokenizer):
    """Training's encoding (with EOS) keeps the whole response and the end of the prompt."""
    (ex,) = toy_examples(1)
    long = replace(ex, question="Tom counts apples. " * 40 + ex.question)
    prompt = char_tokenizer(format_prompt(long.question))["input_ids"]
    ids, labels, truncated = encode_example(char_tokenizer, long, max_length=512, add_eos=True)
    n_response = len(ex.response) + 1
    assert truncated and len(ids) == len(labels) == 512
    assert ids[: 512 - n_response] == prompt[-(512 - n_response) :]
    assert labels[512 - n_response :] == ids[512 - n_response :] and ids[-1] == char_tokenizer.eos_token_id
    assert not encode_example(char_tokenizer, ex, max_length=512, add_eos=True).truncated


def test_overlong_question_is_scored_after_the_end_of_its_prompt(char_tokenizer):
    """A question of ~700 tokens with max_length 512 used to score no token (NaN perplexity): now the
    prompt keeps its last tokens, the whole response is scored, and the scores say `truncated`."""
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    short = toy_examples(3)
    long = replace(short[1], id="long", question="Tom counts apples. " * 32 + short[1].question)
    assert len(char_tokenizer(format_prompt(long.question))["input_ids"]) > 600
    scores = score_examples(model, char_tokenizer, [*short, long], batch_size=4, max_length=512)
    assert [s.truncated for s in scores] == [False, False, False, True]
    got = scores[-1]
    ref = reference_logprobs(model, char_tokenizer, long, prompt_tokens=512 - len(long.response))
    assert got.n_tokens == len(ref) == len(long.response) and math.isfinite(got.ppl)
    assert torch.allclose(got.logprobs.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    # The other examples score as they do without the long one.
    for a, b in zip(scores, score_examples(model, char_tokenizer, short, batch_size=4, max_length=512)):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Vocabulary statistics (Min-K%++): the same pass, chunked, against a full float64 softmax


@pytest.fixture(scope="module")
def vocab50_model():
    return make_tiny_llama(vocab_size=50, seed=3)


def _rows() -> tuple[list[list[int]], list[list[int]]]:
    """Three rows of different lengths (so the batch is padded); prompts masked; the last row
    scores nothing."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (12, 7, 5)]
    labels = [[IGNORE] * 4 + r[4:] for r in rows[:2]] + [[IGNORE] * 5]
    return rows, labels


def _naive_stats(model, rows, labels) -> list[tuple[np.ndarray, ...]]:
    """Full (B, L, V) float64 computation with the uncentered formula of the reference code."""
    ids, lab = pad_right(rows, 0), pad_right(labels, IGNORE)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[:, :-1]  # (B, L-1, V)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp**2).sum(-1) - mu**2).sqrt()
    target = lab[:, 1:]
    out = []
    for b in range(ids.shape[0]):
        keep = target[b] != IGNORE
        lp = logp[b][keep].gather(-1, target[b][keep][:, None]).squeeze(-1)
        out.append((lp.numpy(), mu[b][keep].numpy(), sigma[b][keep].numpy()))
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_vocab_stats_match_full_vocabulary_float64(vocab50_model, chunk_size):
    rows, labels = _rows()
    stats = score_batch(vocab50_model, rows, labels, 0, vocab_stats=True, chunk_size=chunk_size)
    assert [s.n_tokens for s in stats] == [8, 3, 0] and all(isinstance(s, TokenStats) for s in stats)
    for got, (lp, mu, sigma) in zip(stats, _naive_stats(vocab50_model, rows, labels)):
        assert got.logprobs.dtype == got.mu.dtype == got.sigma.dtype == torch.float32
        np.testing.assert_allclose(got.logprobs.numpy(), lp, atol=1e-5)
        np.testing.assert_allclose(got.mu.numpy(), mu, atol=1e-5)
        np.testing.assert_allclose(got.sigma.numpy(), sigma, atol=1e-5)


def test_vocab_stats_of_a_bfloat16_model():
    """16-bit logits go through their own gather buffer before the float32 statistics."""
    model = make_tiny_llama(vocab_size=50, seed=3).to(torch.bfloat16)
    rows, labels = _rows()
    stats = score_batch(model, rows, labels, 0, vocab_stats=True, chunk_size=5)
    for got, (lp, mu, sigma) in zip(stats, _naive_stats(model, rows, labels)):
        np.testing.assert_allclose(got.logprobs.numpy(), lp, atol=1e-5)
        np.testing.assert_allclose(got.mu.numpy(), mu, atol=1e-5)
        np.testing.assert_allclose(got.sigma.numpy(), sigma, atol=1e-5)


def test_vocab_stats_with_nothing_to_score(vocab50_model):
    rows, _ = _rows()
    stats = score_batch(vocab50_model, rows, [[IGNORE] * len(r) for r in rows], 0, vocab_stats=True)
    assert [s.n_tokens for s in stats] == [0, 0, 0] and math.isnan(stats[0].ppl)


def test_vocab_stats_logprobs_agree_with_the_plain_pass(vocab50_model):
    rows, labels = _rows()
    reference = score_batch(vocab50_model, rows, labels, pad_id=0)
    for got, ref in zip(score_batch(vocab50_model, rows, labels, 0, vocab_stats=True, chunk_size=2), reference):
        torch.testing.assert_close(got.logprobs, ref.logprobs)


def test_score_batch_rejects_bad_input(vocab50_model):
    rows, labels = _rows()
    with pytest.raises(ValueError, match="chunk_size"):
        score_batch(vocab50_model, rows, labels, 0, vocab_stats=True, chunk_size=0)
    with pytest.raises(ValueError, match="same length"):
        score_batch(vocab50_model, rows, [labels[0][:-1], *labels[1:]], 0, vocab_stats=True)


def test_example_vocab_stats_agree_with_plain_scores(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    examples = toy_examples(5)
    stats = score_examples(model, char_tokenizer, examples, batch_size=2, vocab_stats=True, chunk_size=16)
    reference = score_examples(model, char_tokenizer, examples, batch_size=3)
    for ex, got, ref in zip(examples, stats, reference):
        assert got.n_tokens == len(char_tokenizer(ex.response, add_special_tokens=False)["input_ids"])
        assert got.mu.shape == got.sigma.shape == got.logprobs.shape
        torch.testing.assert_close(got.logprobs, ref.logprobs)


def test_token_ids_are_the_tokenizers_and_follow_added_tokens():
    from overmem.data import encoding
    from tests.conftest import make_char_tokenizer

    tok = make_char_tokenizer()
    text = "Tom has 12 apples.\n#### 12"
    first = encoding.token_ids(tok, text, add_special_tokens=True)
    assert first == tok(text, add_special_tokens=True)["input_ids"]
    assert encoding.token_ids(tok, text, add_special_tokens=False) == tok(text, add_special_tokens=False)["input_ids"]
    first.append(-1)  # the caller's list is its own
    assert encoding.token_ids(tok, text, add_special_tokens=True) == tok(text, add_special_tokens=True)["input_ids"]
    tok.add_tokens(["apples"])  # a new token changes the ids: the cache must not answer with the old ones
    fresh = tok(text, add_special_tokens=True)["input_ids"]
    assert len(fresh) < len(first) - 1
    assert encoding.token_ids(tok, text, add_special_tokens=True) == fresh
