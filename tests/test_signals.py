"""The cheap signals of the scoring pass (reference tokens' rank, top-1 agreement, predictive
entropy), per token against a computation written out again, and their split figures by hand."""

import math

import pytest
import torch

from overmem.config import EvalConfig
from overmem.data.example import format_prompt
from overmem.dynamics import split_summary, token_signals
from overmem.scoring import TokenScores, score_examples
from tests.conftest import make_tiny_llama, toy_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_signals(model, tokenizer, example):
    """One example, no padding, float64: rank = 1 + #tokens more probable than the reference,
    entropy = -sum p log p, at each response position."""
    prompt = tokenizer(format_prompt(example.question))["input_ids"]
    resp = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + resp])).logits[0].double()
    ranks, entropy = [], []
    for t, tok in enumerate(resp):
        p = torch.softmax(logits[len(prompt) + t - 1], dim=-1)
        ranks.append(1 + int((p > p[tok]).sum()))
        entropy.append(float(-(p * p.log()).sum()))
    return ranks, entropy


@pytest.mark.parametrize("vocab_stats", [False, True])
def test_rank_and_entropy_of_each_reference_token(char_tokenizer, vocab_stats):
    # Logits scaled up so that the distributions are peaked: ranks spread from 1 to the vocabulary size.
    model = make_tiny_llama(len(char_tokenizer), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    examples = toy_examples(4)
    scores = score_examples(model, char_tokenizer, examples, batch_size=3, vocab_stats=vocab_stats, chunk_size=7)
    seen_ranks = set()
    for ex, s in zip(examples, scores):
        ranks, entropy = reference_signals(model, char_tokenizer, ex)
        assert s.ranks.tolist() == ranks
        assert torch.allclose(s.entropy.double(), torch.tensor(entropy, dtype=torch.float64), atol=1e-4)
        seen_ranks |= set(ranks)
    assert 1 in seen_ranks and max(seen_ranks) > 5  # the test sees greedy agreement and its absence


def test_signals_of_one_example_by_hand():
    s = TokenScores(torch.tensor([-0.1, -2.0, -0.5, -3.0]), ranks=torch.tensor([1, 3, 1, 10]),
                    entropy=torch.tensor([0.5, 1.5, 1.0, 2.0]))
    assert token_signals(s) == pytest.approx({"top1": 0.5, "mean_rank": 3.75, "entropy": 1.25})
    assert token_signals(TokenScores(torch.tensor([-0.1]))) == {}  # not computed
    # The vLLM engine's scores: ranks, no entropy.
    assert token_signals(TokenScores(torch.tensor([-0.1, -2.0]), ranks=torch.tensor([1, 4]))) == pytest.approx(
        {"top1": 0.5, "mean_rank": 2.5})
    assert token_signals(TokenScores(torch.zeros(0), ranks=torch.zeros(0), entropy=torch.zeros(0))) == {}


def test_split_figures_are_token_weighted():
    """Two examples of 1 and 3 tokens: the split's means weight each by its tokens."""
    samples = [
        {"nll_sum": 0.5, "n_tokens": 1, "ppl": math.exp(0.5), "truncated": False, "top1": 1.0, "mean_rank": 1.0,
         "entropy": 0.2},
        {"nll_sum": 3.0, "n_tokens": 3, "ppl": math.exp(1.0), "truncated": False, "top1": 1 / 3, "mean_rank": 5.0,
         "entropy": 1.0},
    ]
    row = split_summary(samples, EvalConfig(bootstrap=100))
    assert row["top1_token"] == pytest.approx((1 * 1.0 + 3 * (1 / 3)) / 4)  # 2 of 4 tokens: 0.5
    assert row["rank_token"] == pytest.approx((1 * 1.0 + 3 * 5.0) / 4)  # 4.0
    assert row["entropy_token"] == pytest.approx((1 * 0.2 + 3 * 1.0) / 4)  # 0.8
    without = split_summary([{k: v for k, v in s.items() if k not in ("top1", "mean_rank", "entropy")}
                             for s in samples], EvalConfig(bootstrap=100))
    assert not {"top1_token", "rank_token", "entropy_token"} & set(without)
    ranked = split_summary([{k: v for k, v in s.items() if k != "entropy"} for s in samples], EvalConfig(bootstrap=100))
    assert ranked["rank_token"] == pytest.approx(4.0) and "entropy_token" not in ranked  # the vLLM engine's rows


def test_the_signals_figure_without_entropies(tmp_path):
    """Rows scored by the vLLM engine (greedy agreement and rank, no entropy) still plot."""
    from overmem.plotting import plot_signals

    rows = [{"checkpoint": f"epoch-{e}", "epoch": e, "step": e, "split": s, "n": 4, "ppl": 2.0 + e, "accuracy": 0.5,
             "top1_token": 0.5 + 0.1 * e, "rank_token": 3.0 - e} for e in range(3) for s in ("train", "test")]
    paths = plot_signals(rows, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_a_run_writes_the_signals_and_their_figure(tiny_model_dir, toy_jsonl, tmp_path):
    """`overmem run` on the tiny model: every dynamics row holds the three signals, each the
    token-weighted mean of its samples file, and the run folder has signals.png."""
    from overmem.cli import main
    from overmem.results import read_jsonl

    config = tmp_path / "config.yaml"
    config.write_text("quiet: true\n")
    sets = [f"model.name_or_path={tiny_model_dir}", f"data.train={toy_jsonl['train']}[:8]",
            f"data.tests={{test: {toy_jsonl['test']}}}", "data.monitor_size=4", "data.validation_size=4",
            "train.method=full", "train.epochs=1", "train.batch_size=4", "train.micro_batch_size=4",
            "train.warmup_steps=0", "generation.max_new_tokens=4", "eval.bootstrap=100"]
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    rows = read_jsonl(out / "dynamics.jsonl")
    assert rows
    for row in rows:
        samples = read_jsonl(out / "samples" / row["checkpoint"] / f"{row['split']}.jsonl")
        tokens = sum(s["n_tokens"] for s in samples)
        for key, name in (("top1_token", "top1"), ("rank_token", "mean_rank"), ("entropy_token", "entropy")):
            assert row[key] == pytest.approx(sum(s[name] * s["n_tokens"] for s in samples) / tokens)
        assert 0 <= row["top1_token"] <= 1 and row["rank_token"] >= 1 and row["entropy_token"] >= 0
    assert (out / "signals.png").stat().st_size > 0 and (out / "signals.svg").is_file()
