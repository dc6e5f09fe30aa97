"""Sampling metrics: pass@k against enumeration of subsets, best-of-n, EAD and Sentence-BERT
diversity on hand-worked cases."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import zipfile
from fractions import Fraction

import pytest

from overmem.analysis import diversity
from overmem.analysis.diversity import (
    best_of_n,
    ead,
    ead_mean,
    pass_at_k,
    pass_at_k_curve,
    sbert_embed,
    semantic_diversity,
)


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - Fraction(math.comb(197, 100), math.comb(200, 100))
    assert pass_at_k(200, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_k_curve_averages_over_questions():
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    curve = pass_at_k_curve(correct, ks=[1, 2, 4])
    assert curve == pytest.approx({1: (0.25 + 0 + 1) / 3, 2: (0.5 + 0 + 1) / 3, 4: (1 + 0 + 1) / 3})


def test_best_of_n_picks_the_highest_score_first_on_ties():
    scores = [[0.2, 0.9, 0.9, 0.1], [0.5, 0.5, 0.7, 0.9], [float("nan"), 0.1, 0.3, 0.0]]
    correct = [[0, 0, 1, 1], [1, 0, 0, 0], [1, 0, 1, 0]]
    # n=2: q0 picks sample 1 (wrong), q1 ties 0.5/0.5 -> sample 0 (right), q2 NaN ranks last -> sample 1 (wrong)
    assert best_of_n(scores, correct, 2) == pytest.approx(1 / 3)
    # n=4: q0 ties 0.9/0.9 -> sample 1 (wrong), q1 -> sample 3 (wrong), q2 -> sample 2 (right)
    assert best_of_n(scores, correct, 4) == pytest.approx(1 / 3)
    assert best_of_n(scores, correct, 1) == pytest.approx(2 / 3)  # n=1: the first sample, NaN or not
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(scores, correct, 5)
    with pytest.raises(ValueError, match="same shape"):
        best_of_n(scores, [[1, 0]], 1)


def test_ead_by_hand():
    texts, v = ["a b a", "b c"], 10
    # unigrams a b a | b c: N=3, C=5
    assert ead(texts, 1, v, str.split) == pytest.approx(3 / (10 * (1 - 0.9**5)))
    # bigrams (a b) (b a) | (b c), none across the boundary: N=3, C=3
    assert ead(texts, 2, v, str.split) == pytest.approx(3 / (10 * (1 - 0.9**3)))
    assert ead(texts, 3, v, str.split) == pytest.approx(1 / (10 * (1 - 0.9)))
    assert ead(texts, 4, v, str.split) == 0.0  # no response has 4 tokens: C = 0
    expected_mean = (3 / (10 * (1 - 0.9**5)) + 3 / (10 * (1 - 0.9**3)) + 1.0 + 0 + 0) / 5
    assert ead_mean(texts, v, str.split) == pytest.approx(expected_mean)
    assert ead_mean(texts, v, str.split, ns=[1, 3]) == pytest.approx((3 / (10 * (1 - 0.9**5)) + 1.0) / 2)


def test_ead_repetition_lowers_it_and_large_vocabularies_reduce_to_distinct_ratio():
    assert ead(["x x x x"], 1, 100, str.split) < ead(["w x y z"], 1, 100, str.split)
    # V >> C: the expected distinct count is ~C, so EAD ~ N / C (distinct-n).
    assert ead(["a b a c"], 1, 10**12, str.split) == pytest.approx(3 / 4, rel=1e-9)
    assert ead(["a a"], 1, 1, str.split) == 1.0  # V = 1: one distinct unigram expected


def test_ead_of_empty_generations_is_zero():
    assert ead(["", ""], 1, 50, str.split) == 0.0
    assert ead([], 2, 50, str.split) == 0.0
    with pytest.raises(ValueError):
        ead(["a"], 0, 50, str.split)


def test_semantic_diversity_by_hand():
    emb = [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]  # pairwise cosines: 0, 1/sqrt2, 1/sqrt2
    assert semantic_diversity(emb) == pytest.approx(1 - (2 / math.sqrt(2)) / 3)
    assert semantic_diversity([[1.0, 2.0], [2.0, 4.0]]) == pytest.approx(0.0)
    assert semantic_diversity([[1.0, 0.0], [-1.0, 0.0]]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n >= 2"):
        semantic_diversity([[1.0, 0.0]])
    with pytest.raises(ValueError, match="zero embedding"):
        semantic_diversity([[1.0, 0.0], [0.0, 0.0]])


def test_missing_sentence_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install overmem\[analysis\]"):
        sbert_embed(["a"], model_name_or_path="/no/such/model")


def test_missing_model_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(diversity, "_MINILM_PACKAGES", ("overmem_no_such_package",))
    with pytest.raises(ImportError, match=r"pip install overmem\[analysis\]"):
        diversity.minilm_path()


def test_zipped_model_is_extracted_once(tmp_path, monkeypatch):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("modules.json", "[]")
        zf.writestr("1_Pooling/config.json", "{}")
    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path / "cache"))
    folder = diversity._extract_once(archive)
    assert folder == tmp_path / "cache" / "all-MiniLM-L6-v2"
    assert (folder / "1_Pooling" / "config.json").read_text() == "{}"
    archive.unlink()  # a second call must not need the archive
    assert diversity._extract_once(archive) == folder


def _minilm_available() -> bool:
    if importlib.util.find_spec("sentence_transformers") is None:
        return False
    try:
        diversity.minilm_path()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _minilm_available(),
                    reason="sentence-transformers or a packaged all-MiniLM-L6-v2 is not installed (overmem[analysis])")
def test_sbert_embed_packaged_minilm():
    texts = ["He has 5 apples, so the answer is 5.", "He has 5 apples, so the answer is 5.",
             "The derivative of x squared is 2x."]
    emb = sbert_embed(texts)
    assert emb.shape == (3, 384)
    assert semantic_diversity(emb[:2]) == pytest.approx(0.0, abs=1e-5)
    assert semantic_diversity(emb) > 0.3
