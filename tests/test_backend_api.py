"""The evaluation backend interface (`overmem.backend_api.EvalBackend`): both backends implement
all of it with the same signatures; the Hugging Face one, run through the interface directly on a
tiny random Llama, against a plain computation one sequence at a time; the vLLM one's requests to
its engine (an engine that records them; tests/test_vllm.py runs the real one)."""

from __future__ import annotations

import inspect

import pytest
import torch

from overmem.backend_api import EvalBackend, TokenScores, TokenStats
from overmem.backends import BACKENDS, as_backend, load_for_eval
from overmem.config import RunConfig
from overmem.data.encoding import IGNORE
from overmem.hf_backend import HfBackend
from overmem.stops import StopRule
from overmem.vllm_backend import VllmModel
from tests.conftest import make_tiny_llama

INTERFACE = ["open", "context", "vocab_size", "drafts_exact", "score", "with_vocab_stats", "verify", "decode"]


@pytest.mark.parametrize("backend", [HfBackend, VllmModel])
def test_both_backends_implement_the_whole_interface_with_its_signatures(backend):
    assert issubclass(backend, EvalBackend) and not backend.__abstractmethods__
    assert set(EvalBackend.__abstractmethods__) == set(INTERFACE)
    for name in ("open", "score", "with_vocab_stats", "verify", "decode"):
        mine, theirs = inspect.signature(getattr(backend, name)), inspect.signature(getattr(EvalBackend, name))
        assert list(mine.parameters.values()) == list(theirs.parameters.values()), name
    assert BACKENDS == {"hf": HfBackend, "vllm": VllmModel}


def _rows(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Three sequences of different lengths; the first tokens of each are its prompt (not scored)."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 5, 12)]
    labels = [[IGNORE] * p + row[p:] for row, p in zip(ids, (4, 5, 3))]  # the second: nothing scored
    return ids, labels


def test_hf_backend_scores_as_one_sequence_at_a_time():
    model = make_tiny_llama(40, seed=3)
    backend = as_backend(model)
    ids, labels = _rows(40)
    plain = backend.score(ids, labels, pad_id=0)
    stats = backend.score(ids, labels, pad_id=0, vocab_stats=True, chunk_size=2)
    assert all(type(s) is TokenScores for s in plain) and all(isinstance(s, TokenStats) for s in stats)
    for row, lab, s, st in zip(ids, labels, plain, stats):
        start = next((t for t, y in enumerate(lab) if y != IGNORE), len(lab))
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([row])).logits[0].double().log_softmax(-1)  # (T, V)
        pos = torch.arange(max(start - 1, 0), len(row) - 1)  # position t predicts token t + 1
        y = torch.tensor(row)[pos + 1]
        lp = logp[pos, y]
        p = logp[pos].exp()
        mu = (p * logp[pos]).sum(-1)
        for got in (s, st):
            torch.testing.assert_close(got.logprobs.double(), lp, atol=1e-5, rtol=0)
            assert got.ranks.tolist() == [1 + int((logp[t] > logp[t, tok]).sum()) for t, tok in zip(pos, y)]
            torch.testing.assert_close(got.entropy.double(), -mu, atol=1e-5, rtol=0)
        torch.testing.assert_close(st.mu.double(), mu, atol=1e-5, rtol=0)
        sigma = (p * (logp[pos] - mu[:, None]) ** 2).sum(-1).sqrt()
        torch.testing.assert_close(st.sigma.double(), sigma, atol=1e-4, rtol=0)
    assert plain[1].n_tokens == 0 and plain[0].n_tokens == 5 and plain[2].n_tokens == 9


def test_hf_backend_scores_from_the_first_scored_position_as_the_whole_pass():
    """The output layer runs only from the batch's first scored position on; the scores are those of
    the whole batched pass's logits. A row labelled from its first token scores the rest (nothing
    predicts a first token); an empty batch scores nothing."""
    model = make_tiny_llama(40, seed=4)
    backend = HfBackend(model)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (14, 11, 16)]
    starts = (9, 7, 0)
    labels = [[IGNORE] * p + row[p:] for row, p in zip(ids, starts)]
    labels[0][11] = IGNORE  # a gap inside the response
    scores = backend.score(ids, labels, pad_id=0)
    width = max(map(len, ids))
    with torch.no_grad():
        batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        logp = model(input_ids=batch).logits.float().log_softmax(-1)  # (B, T, V)
    for b, (row, lab, got) in enumerate(zip(ids, labels, scores)):
        pos = torch.tensor([t - 1 for t in range(1, len(row)) if lab[t] != IGNORE])
        y = torch.tensor(row)[pos + 1]
        torch.testing.assert_close(got.logprobs, logp[b, pos, y], atol=1e-6, rtol=0)
        assert got.ranks.tolist() == [1 + int((logp[b, t] > logp[b, t, tok]).sum()) for t, tok in zip(pos, y)]
    assert [s.n_tokens for s in scores] == [4, 4, 15]
    assert backend.score([], [], pad_id=0) == []


def _greedy_one_at_a_time(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, each from a full forward pass over everything before it."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_hf_backend_verifies_and_decodes_as_one_sequence_at_a_time(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=5)
    backend = HfBackend(model)
    prompts = [char_tokenizer(p)["input_ids"] for p in ("Q: 2+3?\nA:", "Hi.", "A longer prompt, this one.\n")]
    drafts = [char_tokenizer(d, add_special_tokens=False)["input_ids"] for d in (" 5", "abc", "")]
    greedy = backend.verify(char_tokenizer, {i: (p, d) for i, (p, d) in enumerate(zip(prompts, drafts))},
                            batch_size=2)
    for i, (p, d) in enumerate(zip(prompts, drafts)):
        with torch.no_grad():
            picks = model(input_ids=torch.tensor([p + d])).logits[0, len(p) - 1 :].argmax(-1).tolist()
        assert greedy[i] == picks and len(picks) == len(d) + 1

    limits = [6, 3, 8]
    new = backend.decode(char_tokenizer, prompts, limits, answer_line=[False] * 3, batch_size=2, cache="dynamic")
    rule = StopRule(char_tokenizer, max(limits))
    for p, limit, (got,) in zip(prompts, limits, new):
        want = _greedy_one_at_a_time(model, p, limit)
        want = want[: rule.end(want, False, limit)]
        assert got[: rule.end(got, False, limit)] == want
    assert backend.vocab_size == len(char_tokenizer) and backend.context == 1024 and backend.drafts_exact
    assert model.training is False


def test_hf_backend_leaves_the_model_in_the_mode_it_found():
    model = make_tiny_llama(40).train()
    ids, labels = _rows(40)
    HfBackend(model).score(ids, labels, pad_id=0)
    assert model.training


def test_load_for_eval_opens_the_backend_the_config_names(tiny_model_dir):
    cfg = RunConfig.model_validate({"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                                    "eval": {"backend": "hf"}})
    backend = load_for_eval(None, cfg)
    assert type(backend) is HfBackend and as_backend(backend) is backend and backend.with_vocab_stats() is backend
    assert type(as_backend(backend.model)) is HfBackend


class _Engine:
    """Stands in for `VllmEngine`: records each request and answers it from `replies`."""

    def __init__(self, replies):
        self.settings, self.vocab_size, self.replies, self.sent, self.loaded = {"max_model_len": 64}, 99, replies, [], []

    def load(self, weights):
        self.loaded.append(weights)

    def request(self, op, **args):
        self.sent.append((op, args))
        return self.replies[op](**args)


def test_vllm_handle_sends_token_ids_and_builds_the_scores(char_tokenizer):
    def score(ids, start, lora, greedy):
        rows = [[[-0.5] * (len(x) - s), [2] * (len(x) - s)] for x, s in zip(ids, start)]
        return [row + [[7] * (len(x) - s + 1) if s < len(x) else None] if greedy else row
                for row, x, s in zip(rows, ids, start)]

    engine = _Engine({"score": score,
                      "greedy": lambda ids, start, lora: [[7] * (len(x) - s + 1) for x, s in zip(ids, start)],
                      "generate": lambda prompts, max_tokens, **kw: [[[5] * m] for m in max_tokens]})
    handle = VllmModel(engine, RunConfig(), None, weights="/w")
    assert handle.context == 64 and handle.vocab_size == 99 and handle.drafts_exact
    assert handle.min_request > 1 and handle.verify_lookahead == 1

    scores = handle.score([[1, 2, 3, 4], [1, 2]], [[IGNORE, IGNORE, 3, 4], [IGNORE, IGNORE]], pad_id=0)
    assert engine.sent[-1] == ("score", {"ids": [[1, 2, 3, 4], [1, 2]], "start": [2, 2], "lora": None,
                                         "greedy": False})
    assert [s.logprobs.dtype for s in scores] == [torch.float32] * 2 and [s.n_tokens for s in scores] == [2, 0]
    assert scores[0].ranks.tolist() == [2, 2] and scores[0].entropy is None and engine.loaded == ["/w"]
    assert scores[0].greedy is None
    scores = handle.score([[1, 2, 3, 4], [1, 2]], [[IGNORE, IGNORE, 3, 4], [IGNORE, IGNORE]], pad_id=0, greedy=True)
    assert engine.sent[-1][1]["greedy"] and scores[0].greedy.tolist() == [7, 7, 7] and scores[1].greedy is None
    with pytest.raises(ValueError, match="labelled from its first"):
        handle.score([[1, 2, 3]], [[IGNORE, 2, IGNORE]], pad_id=0)
    with pytest.raises(ValueError, match="vocabulary statistics"):
        handle.score([[1, 2]], [[IGNORE, 2]], pad_id=0, vocab_stats=True)

    assert handle.verify(char_tokenizer, {3: ([1, 2], [4, 5])}, batch_size=1) == {3: [7, 7, 7]}
    assert engine.sent[-1] == ("greedy", {"ids": [[1, 2, 4, 5]], "start": [2], "lora": None})

    inputs = [[1, 2]] * 70
    out = handle.decode(char_tokenizer, inputs, [3] * 70, answer_line=[True] * 70, batch_size=4, seed=10)
    assert out == [[[5, 5, 5]]] * 70
    requests = [args for op, args in engine.sent if op == "generate"]
    assert [len(r["prompts"]) for r in requests] == [handle.min_request, 70 - handle.min_request]
    assert [r["seed"] for r in requests] == [10, 10 + handle.min_request]  # prompt i: seed + i
    assert requests[0]["stop_token_ids"] == [char_tokenizer.eos_token_id] and requests[0]["temperature"] == 0.0


def test_vllm_handle_takes_vocabulary_statistics_from_hugging_face(tiny_model_dir, char_tokenizer, capsys,
                                                                   monkeypatch):
    import overmem.vllm_backend
    from overmem.models import load_model
    from overmem.scoring import score_examples
    from tests.conftest import toy_examples

    cfg = RunConfig.model_validate({"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}})
    monkeypatch.setattr(overmem.vllm_backend, "_noted", set())  # the note is printed once per process
    handle = VllmModel(_Engine({}), cfg, None)  # the base: no request reaches the engine
    examples = toy_examples(3)
    got = score_examples(handle, char_tokenizer, examples, vocab_stats=True)
    want = score_examples(load_model(cfg.model), char_tokenizer, examples, vocab_stats=True, max_length=63)
    assert handle.engine.sent == [] and "from the Hugging Face backend" in capsys.readouterr().err
    for a, b in zip(got, want):
        assert isinstance(a, TokenStats) and a.truncated == b.truncated
        for x, y in ((a.logprobs, b.logprobs), (a.mu, b.mu), (a.sigma, b.sigma), (a.ranks, b.ranks)):
            assert torch.equal(x, y)
