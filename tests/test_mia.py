"""Membership inference: each attack on hand-worked values, ROC metrics against brute force, and
the score direction on a model that has memorized its members. The token statistics the attacks
read are tested against a float64 full-vocabulary computation in test_scoring."""

from __future__ import annotations

import math
import random
import string
import zlib

import numpy as np
import pytest
import torch

from overmem.analysis import mia
from overmem.data.encoding import IGNORE
from overmem.scoring import TokenStats, score_batch
from tests.conftest import make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hand_worked_scores():
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]
    assert mia.loss_score(lp) == pytest.approx(-3.0)
    assert mia.min_k_score(lp, 0.4) == pytest.approx(-4.5)  # floor(2.0) = 2 tokens: -5, -4
    assert mia.min_k_score(lp, 0.5) == pytest.approx(-4.5)  # floor(2.5) = 2
    assert mia.min_k_score(lp, 1.0) == pytest.approx(-3.0)
    assert mia.zlib_score(lp, "2+2=4") == pytest.approx(-3.0 / len(zlib.compress(b"2+2=4")))
    assert mia.min_k_score(torch.tensor(lp), 0.4) == pytest.approx(-4.5)


def test_min_k_uses_at_least_one_token_when_k_times_t_below_one():
    lp = [-1.0, -5.0, -2.0]
    assert mia.n_lowest(3, 0.1) == 1
    assert mia.min_k_score(lp, 0.1) == pytest.approx(-5.0)
    assert mia.min_k_score([-0.7], 0.2) == pytest.approx(-0.7)


def test_min_k_count_is_not_lost_to_float_error():
    assert 0.29 * 100 < 29  # the float product alone would keep 28 tokens
    assert mia.n_lowest(100, 0.29) == 29
    assert [mia.n_lowest(10, k) for k in mia.DEFAULT_KS] == list(range(1, 11))


def test_min_k_ties():
    assert mia.min_k_score([-1.0, -2.0, -2.0, -2.0], 0.5) == pytest.approx(-2.0)
    assert mia.min_k_score([-3.0, -3.0, -3.0], 0.34) == pytest.approx(-3.0)


def test_min_k_plus_plus_hand_worked():
    lp, mu, sigma = [-1.0, -3.0, -2.0], [-2.0, -2.0, -2.0], [0.5, 2.0, 1.0]
    # z = (2.0, -0.5, 0.0)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, 1 / 3) == pytest.approx(-0.5)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, 0.67) == pytest.approx(-0.25)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, 1.0) == pytest.approx(0.5)
    # A one-hot distribution (sigma = 0) whose token is the certain one: z = 0, not NaN.
    assert mia.min_k_plus_plus_score([0.0], [0.0], [0.0], 1.0) == 0.0
    with pytest.raises(ValueError, match="one value per token"):
        mia.min_k_plus_plus_score(lp, mu[:2], sigma, 0.5)


def test_empty_text_scores_nan_and_bad_k_raises():
    stats = TokenStats(torch.zeros(0), torch.zeros(0), torch.zeros(0))
    scores = mia.all_scores(stats, "")
    assert all(math.isnan(v) for v in scores.values())
    for k in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            mia.min_k_score([-1.0], k)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            mia.min_k_score([], k)


def test_all_scores_keys_and_values():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(17, generator=g) * 5
    mu, sigma = -torch.rand(17, generator=g) * 3, torch.rand(17, generator=g) + 0.1
    stats = TokenStats(lp, mu, sigma)
    scores = mia.all_scores(stats, "some text", ks=(0.2, 0.5))
    assert list(scores) == ["loss", "zlib", "min_k@0.2", "min_k@0.5", "min_k++@0.2", "min_k++@0.5"]
    assert scores["min_k@0.2"] == pytest.approx(float(np.sort(lp.double().numpy())[:3].mean()))
    z = ((lp - mu) / sigma).double().numpy()
    assert scores["min_k++@0.5"] == pytest.approx(float(np.sort(z)[:8].mean()), rel=1e-6)
    assert len(mia.all_scores(stats, "x")) == 2 + 2 * 10  # default sweep 0.1 .. 1.0


def _brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    members, others = scores[labels == 1], scores[labels == 0]
    wins = [(m > o) + 0.5 * (m == o) for m in members for o in others]
    return float(np.mean(wins))


def test_roc_metrics_hand_worked_tpr_at_5_percent_fpr():
    non_members = np.arange(20.0)  # each non-member is 5% FPR
    members = np.array([25, 24, 19.5, 18.5, 3, 2, 1, 0.5, 0.2, 0.1])
    scores = np.concatenate([members, non_members])
    labels = np.array([1] * 10 + [0] * 20)
    out = mia.roc_metrics(scores, labels)
    # Threshold 18.5: only the non-member at 19 is above it (FPR 0.05), 4 members are (TPR 0.4).
    assert out["tpr_at_5fpr"] == pytest.approx(0.4)
    assert out["auroc"] == pytest.approx(_brute_force_auroc(scores, labels))
    assert out["fpr"][0] == 0 and out["tpr"][-1] == 1


def test_roc_metrics_direction_and_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(labels * 0.7 + rng.normal(size=60), 1)  # members higher, with ties
    out = mia.roc_metrics(scores, labels)
    assert out["auroc"] == pytest.approx(_brute_force_auroc(scores, labels))
    assert out["auroc"] > 0.5
    assert mia.roc_metrics(-scores, labels)["auroc"] == pytest.approx(1 - out["auroc"])
    perfect = mia.roc_metrics([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])
    assert perfect["auroc"] == 1.0 and perfect["tpr_at_5fpr"] == 1.0


def test_roc_metrics_refuses_bad_labels_and_scores():
    with pytest.raises(ValueError, match="only members"):
        mia.roc_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="only non-members"):
        mia.roc_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="1 \\(member\\) or 0"):
        mia.roc_metrics([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        mia.roc_metrics([float("nan"), 0.2], [1, 0])
    with pytest.raises(ValueError, match="equal length"):
        mia.roc_metrics([0.1, 0.2, 0.3], [1, 0])


def test_members_the_model_memorized_score_higher(char_tokenizer):
    """Every attack must rank memorized training texts above unseen texts of the same kind."""
    rng = random.Random(0)
    texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(24)) for _ in range(12)]
    ids = torch.tensor([char_tokenizer(t)["input_ids"] for t in texts])  # (12, 25): BOS + 24 letters
    labels = ids.clone()
    labels[:, 0] = IGNORE
    is_member = [1] * 6 + [0] * 6
    model = make_tiny_llama(len(char_tokenizer), seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # the 6 members go from loss ~4.6 to ~0.1
        opt.zero_grad()
        model(input_ids=ids[:6], labels=labels[:6]).loss.backward()
        opt.step()
    model.eval()

    stats = score_batch(model, ids.tolist(), labels.tolist(), 0, vocab_stats=True, chunk_size=7)
    table = [mia.all_scores(s, text, ks=(0.2, 1.0)) for s, text in zip(stats, texts)]
    for name in table[0]:
        result = mia.roc_metrics([row[name] for row in table], is_member)
        assert result["auroc"] == 1.0, name
        assert result["tpr_at_5fpr"] == 1.0, name
