"""`overmem analyze`: each runner against an independent computation (hand-worked values, a float64
forward pass, brute-force pass@k / AUROC / ECE), the edge cases, and the command end to end on a
tiny run folder: the JSON schema, resuming without recomputing, and one-line errors that write nothing."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from pydantic import Field

from overmem.analysis import calibration, diversity, mia, ood, premem, robustness, sampling
from overmem.analysis.base import ANALYSES, Analysis, AnalysisResult, Context, Prepared, default_suite
from overmem.analysis.sampling import Decoding
from overmem.cli import main
from overmem.config import AnalysisSettings, ConfigError, config_from_dict, dump_config, load_config
from overmem.data.answers import is_correct
from overmem.data.example import PROMPT_TEMPLATE, Example, format_prompt
from overmem.results import RunDir, read_jsonl
from tests.conftest import DATA_DIR, hand_made_run, make_tiny_llama, toy_examples, wording_skeleton


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(char_tokenizer):
    return make_tiny_llama(len(char_tokenizer), seed=5)


def _ref_logprobs(model, tok, question: str, response: str) -> np.ndarray:
    """log p(y_t | prompt, y_<t) from one float64 log-softmax over the whole sequence."""
    p = tok(format_prompt(question))["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), dim=-1)
    return np.array([logp[len(p) + t - 1, r[t]].item() for t in range(len(r))])


def _fake_decode(answers):
    """A `decode` stand-in: `answers(prompt) -> list of response texts`."""
    def decode(model, tok, prompts, decoding, progress=None, examples=None):
        return [answers(p) for p in prompts]
    return decode


def _auroc(member_scores, nonmember_scores) -> float:
    """Mann-Whitney: P(member score > non-member score) + 0.5 P(tie)."""
    pairs = [(m > n) + 0.5 * (m == n) for m in member_scores for n in nonmember_scores]
    return float(np.mean(pairs))


def _tpr_at_fpr(member_scores, nonmember_scores, fpr=0.05) -> float:
    """Largest TPR over thresholds ('score >= t' is a member) whose FPR <= fpr."""
    best = 0.0
    for t in sorted(set(member_scores) | set(nonmember_scores)) + [math.inf]:
        f = np.mean([n >= t for n in nonmember_scores])
        if f <= fpr:
            best = max(best, float(np.mean([m >= t for m in member_scores])))
    return best


def _ece(conf, correct, n_bins) -> float:
    """Equal-width bins (m/M, (m+1)/M], confidence 0 in the first, by a plain loop."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (m == 0 and c == 0)]
        if idx:
            total += len(idx) / len(conf) * abs(np.mean([correct[i] for i in idx]) - np.mean([conf[i] for i in idx]))
    return total


# ---------------------------------------------------------------------------------------------
# Sampling shared by the analyses


def test_sampled_responses_are_reproducible_and_scored_under_the_model(model, char_tokenizer):
    exs = toy_examples(3)
    dec = Decoding(max_new_tokens=8, batch_size=2, temperature=1.0, n_samples=2, seed=3)
    rows = sampling.sample_answers(model, char_tokenizer, exs, dec)
    assert [[r["text"] for r in per] for per in rows] == \
        [[r["text"] for r in per] for per in sampling.sample_answers(model, char_tokenizer, exs, dec)]
    for ex, per in zip(exs, rows):
        assert len(per) == 2
        for r in per:
            lp = _ref_logprobs(model, char_tokenizer, ex.question, r["text"])
            assert r["n_tokens"] == lp.size
            if lp.size:
                assert r["mean_logprob"] == pytest.approx(lp.mean(), abs=1e-5)
                assert r["confidence"] == pytest.approx(np.exp(lp).mean(), abs=1e-6)
            else:
                assert math.isnan(r["confidence"])
            assert (r["extracted"], r["correct"]) == is_correct(r["text"], ex.answer, ex.kind)


def test_greedy_decoding_has_one_response():
    with pytest.raises(ValueError, match="set a temperature"):
        Decoding(temperature=None, n_samples=2)


# ---------------------------------------------------------------------------------------------
# OOD


def test_ood_accuracy_per_set_and_averages(monkeypatch):
    sets = {"id": toy_examples(4, "id"), "a": toy_examples(2, "a", 10), "b": toy_examples(3, "b", 20)}
    right = {ex.question for ex in sets["id"][:3] + sets["a"] + sets["b"][:1]}
    answers = {ex.question: ex.answer for exs in sets.values() for ex in exs}

    def respond(prompt):
        q = next(q for q in answers if q in prompt)
        return [f"#### {answers[q]}" if q in right else "no idea"]

    monkeypatch.setattr(ood, "decode", _fake_decode(respond))
    res = ood.ood_accuracy(None, None, sets, id_sets=["id"], n_boot=200)
    m = res.metrics
    assert (m["id"], m["a"], m["b"]) == (0.75, 1.0, pytest.approx(1 / 3))
    assert m["id_avg"] == 0.75 and m["ood_avg"] == pytest.approx((1.0 + 1 / 3) / 2)  # unweighted over sets
    assert (m["a_ci_low"], m["a_ci_high"]) == (1.0, 1.0)  # every resample of an all-correct set
    assert m["id_ci_low"] <= 0.75 <= m["id_ci_high"] and m["b_n"] == 3
    assert len(res.rows) == 9 and sum(r["correct"] for r in res.rows) == 6
    assert [r["extracted"] for r in res.rows if r["set"] == "b"][1:] == [None, None]
    assert math.isnan(ood.ood_accuracy(None, None, {"a": sets["a"]}, id_sets=[]).metrics["id_avg"])
    with pytest.raises(ValueError, match="not evaluated"):
        ood.ood_accuracy(None, None, sets, id_sets=["c"])


def test_default_ood_sets():
    sets, ids = ood.default_sets({"gsm8k": "gsm8k:test"}, "metamathqa")
    assert list(sets) == ["gsm8k", "math500", "svamp", "asdiv", "mawps", "tabmwp", "mmlu_stem"]
    assert ids == ["gsm8k", "math500"]
    sets, ids = ood.default_sets({"test": "synthetic:test"}, "synthetic")
    assert sets == {"test": "synthetic:test", "ood_steps": "synthetic:ood_steps", "ood_wording": "synthetic:ood_wording",
                    "ood_numbers": "synthetic:ood_numbers", "ood_distractor": "synthetic:ood_distractor"}
    assert ids == ["test"]


@pytest.mark.skipif(not (DATA_DIR / "tabmwp").is_dir(), reason="local data folder not present")
def test_paper_sets_load_with_their_answer_kinds(tmp_path):
    cfg = config_from_dict({"data": {"train": "gsm8k:train[:100]", "data_dir": str(DATA_DIR)},
                            "analysis": {"ood": {"size": 3}}})
    prepared = ood.Ood(Context(RunDir(tmp_path), cfg)).prepare()
    settings, (data, id_sets), total = prepared.settings, prepared.data, prepared.total
    assert set(data) == {"gsm8k", "math500", "svamp", "asdiv", "mawps", "tabmwp", "mmlu_stem"} and total == 21
    assert {ex.kind for ex in data["math500"]} == {"math"} and {ex.kind for ex in data["mmlu_stem"]} == {"choice"}
    assert all(ex.question.startswith("Table") and "|" in ex.question for ex in data["tabmwp"])  # table in the prompt
    assert id_sets == ["gsm8k", "math500"] and settings["size"] == 3


# ---------------------------------------------------------------------------------------------
# Robustness


def test_paper_preambles_verbatim_and_placed():
    assert robustness.PAPER_PREAMBLES == {
        "First": "First, let's tackle this step by step together.",
        "Today": "Today, we'll work through this problem together and find a clear solution.",
        "We": "We understand the problem we're tackling and will work together to solve it.",
        "Good": "That's a great question! We understand the problem we're tackling and will work together to solve it.",
    }
    q, pre = "What is 2+2?", "First, let's tackle this step by step together."
    head = PROMPT_TEMPLATE.split("{instruction}")[0]
    assert robustness.perturbed_prompt(q, pre) == format_prompt(q) + pre
    assert robustness.perturbed_prompt(q, pre, "instruction") == format_prompt(q).replace(head, head + pre + " ")
    assert robustness.perturbed_prompt(q, "") == format_prompt(q)


def test_robustness_accuracy_per_preamble(monkeypatch):
    exs = toy_examples(4)
    answers = {ex.question: ex.answer for ex in exs}

    def respond(prompt):  # right without preamble; with "Shy", right on the first example only
        q = next(q for q in answers if q in prompt)
        ok = prompt.endswith("### Response:\n") or (prompt.endswith("Shy") and q == exs[0].question)
        return [f"#### {answers[q]}" if ok else "#### 0"]

    monkeypatch.setattr(robustness, "decode", _fake_decode(respond))
    res = robustness.prompt_robustness(None, None, exs, {**robustness.PAPER_PREAMBLES, "Shy": "Shy"}, n_boot=100)
    m = res.metrics
    assert m["none"] == 1.0 and all(m[n] == 0.0 for n in robustness.PAPER_PREAMBLES) and m["Shy"] == 0.25
    assert m["avg"] == pytest.approx(0.25 / 5) and m["drop"] == pytest.approx(1 - 0.05)
    assert len(res.rows) == 4 * 6
    with pytest.raises(ValueError, match="reserved"):
        robustness.prompt_robustness(None, None, exs, {"none": "x"})


# ---------------------------------------------------------------------------------------------
# Diversity


def _brute_pass_at_k(correct_row, k) -> float:
    subsets = list(itertools.combinations(correct_row, k))
    return float(np.mean([any(s) for s in subsets]))


def test_diversity_metrics_against_brute_force(monkeypatch, char_tokenizer):
    exs = toy_examples(2)
    texts = [["ab", "ab", "abc"], ["x", "yz", "x"]]
    correct = [[True, False, False], [False, True, True]]
    logprob = [[-1.0, -0.5, -0.5], [-2.0, -3.0, -1.0]]

    def fake_sample(model, tok, examples, decoding, **kw):
        return [[{"text": t, "extracted": None, "correct": c, "n_tokens": len(t), "mean_logprob": lp,
                  "confidence": math.exp(lp)} for t, c, lp in zip(*row)] for row in zip(texts, correct, logprob)]

    monkeypatch.setattr(diversity, "sample_answers", fake_sample)
    emb = {"ab": [1.0, 0.0], "abc": [0.0, 1.0], "x": [1.0, 1.0], "yz": [1.0, -1.0]}
    res = diversity.diversity_analysis(None, char_tokenizer, exs, Decoding(temperature=1.0, n_samples=3),
                                     ead_ns=[1, 2], embed=lambda ts: np.array([emb[t] for t in ts]))
    m = res.metrics
    for k in (1, 2, 3):
        assert m[f"pass@{k}"] == pytest.approx(np.mean([_brute_pass_at_k(row, k) for row in correct]))
    # Best-of-k by the policy's own log-prob, first on ties: q1 picks samples 0, 1 (tie -> 1), 1; q2: 0, 0, 2.
    assert (m["bon@1"], m["bon@2"], m["bon@3"]) == (0.5, 0.0, 0.5)
    v = len(char_tokenizer)

    def ead(n_distinct, total):
        return n_distinct / (v * (1 - ((v - 1) / v) ** total))

    q1 = (ead(3, 7) + ead(2, 4)) / 2  # unigrams a b c of 7; bigrams ab bc of 4 (ab three times)
    q2 = (ead(3, 4) + ead(1, 1)) / 2  # unigrams x y z of 4; bigrams yz of 1
    assert m["ead"] == pytest.approx((q1 + q2) / 2)
    cos_q1 = np.mean([1, 0, 0])  # (ab, ab), (ab, abc), (ab, abc)
    cos_q2 = np.mean([0, 1, 0])  # (x, yz), (x, x), (yz, x)
    assert m["sbert"] == pytest.approx(((1 - cos_q1) + (1 - cos_q2)) / 2)
    assert [r["n_correct"] for r in res.rows] == [1, 2] and res.rows[0]["samples"][2]["score"] == -0.5
    with pytest.raises(ValueError, match="at least 2"):
        diversity.diversity_analysis(None, char_tokenizer, exs, Decoding(temperature=1.0, n_samples=1))
    no_sbert = diversity.diversity_analysis(None, char_tokenizer, exs, Decoding(temperature=1.0, n_samples=3), embed=None)
    assert no_sbert.metrics["sbert"] is None


def test_reward_model_scorer_matches_unbatched_logits(tmp_path, char_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    char_tokenizer.save_pretrained(tmp_path / "rm")
    score = diversity.reward_model_scorer(tmp_path / "rm", batch_size=2, device="cpu")
    questions, responses = ["1+1?", "2+5?"], [["#### 2", "it is 3, I think"], ["7", "#### 7 apples"]]
    got = score(questions, responses, None)
    assert got.shape == (2, 2)
    for i, j in itertools.product(range(2), range(2)):
        ids = char_tokenizer(format_prompt(questions[i]) + responses[i][j], return_tensors="pt")
        with torch.no_grad():
            assert got[i, j] == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-5)
    LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 2})).save_pretrained(tmp_path / "rm2")
    char_tokenizer.save_pretrained(tmp_path / "rm2")
    with pytest.raises(ValueError, match="one output label"):
        diversity.reward_model_scorer(tmp_path / "rm2")


# ---------------------------------------------------------------------------------------------
# Calibration


def test_calibration_ece_empty_responses_and_one_bin(monkeypatch):
    exs = toy_examples(2)
    rows = [[(0.95, True, 5), (0.85, False, 4)], [(0.3, True, 2), (float("nan"), False, 0)]]

    def fake_sample(model, tok, examples, decoding, **kw):
        return [[{"text": "t", "extracted": None, "correct": c, "n_tokens": n, "mean_logprob": math.log(p),
                  "confidence": p} for p, c, n in per] for per in rows]

    monkeypatch.setattr(calibration, "sample_answers", fake_sample)
    dec = Decoding(temperature=1.0, n_samples=2)
    m = calibration.calibration_analysis(None, None, exs, dec, n_bins=10).metrics
    conf, corr = [0.95, 0.85, 0.3], [1, 0, 1]
    assert m["ece"] == pytest.approx((0.05 + 0.85 + 0.7) / 3) == pytest.approx(_ece(conf, corr, 10))
    assert (m["n"], m["n_empty"]) == (3, 1)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["confidence"] == pytest.approx(0.7)
    assert m["bin_counts"][2] == m["bin_counts"][8] == m["bin_counts"][9] == 1 and m["bin_accuracy"][0] is None
    one = calibration.calibration_analysis(None, None, exs, dec, n_bins=1).metrics
    assert one["ece"] == pytest.approx(abs(2 / 3 - 0.7))
    rows[:] = [[(float("nan"), False, 0)] * 2] * 2
    assert calibration.calibration_analysis(None, None, exs, dec).metrics["ece"] is None


# ---------------------------------------------------------------------------------------------
# Membership inference


def test_mia_scores_and_roc_against_independent_computation(model, char_tokenizer):
    members, nonmembers = toy_examples(5, "m"), toy_examples(6, "n", 40)
    res = mia.mia_analysis(model, char_tokenizer, members, nonmembers, ks=[0.2, 1.0], batch_size=4)
    rows = {r["id"]: r for r in res.rows}
    for ex in members[:2] + nonmembers[:1]:
        lp = _ref_logprobs(model, char_tokenizer, ex.question, ex.response)
        r = rows[ex.id]
        assert r["loss"] == pytest.approx(lp.mean(), abs=1e-5)
        assert r["min_k@1"] == pytest.approx(lp.mean(), abs=1e-5)
        assert r["min_k@0.2"] == pytest.approx(np.sort(lp)[: int(0.2 * lp.size)].mean(), abs=1e-5)
    m = res.metrics
    assert (m["n_members"], m["n_nonmembers"], m["n_empty"]) == (5, 6, 0)
    for attack in ("loss", "zlib", "min_k@0.2", "min_k++@0.2", "min_k++@1"):
        ms = [r[attack] for r in res.rows if r["member"]]
        ns = [r[attack] for r in res.rows if not r["member"]]
        assert m[f"{attack}/auroc"] == pytest.approx(_auroc(ms, ns))
        assert m[f"{attack}/tpr_at_5fpr"] == pytest.approx(_tpr_at_fpr(ms, ns))


def test_mia_direction_on_texts_the_model_prefers(model, char_tokenizer):
    """Members are the model's own greedy continuations: every attack must rank them above references."""
    from overmem.generation import generate

    base = toy_examples(6)
    greedy = generate(model, char_tokenizer, [format_prompt(ex.question) for ex in base[:3]], max_new_tokens=12,
                      stop_at_answer=False)
    members = [Example(f"g{i}", ex.question, texts[0], ex.answer) for i, (ex, texts) in enumerate(zip(base, greedy))]
    res = mia.mia_analysis(model, char_tokenizer, members, base[3:], ks=[0.2])
    assert res.metrics["loss/auroc"] == 1.0 and res.metrics["min_k@0.2/auroc"] == 1.0
    assert res.metrics["loss/tpr_at_5fpr"] == 1.0


def test_mia_non_members_of_a_synthetic_run_are_worded_like_its_training_set(tmp_path, toy_jsonl):
    """A run trained on `synthetic` draws its non-members from `synthetic:nonmembers` (references
    worded per item kind, like the training split), not from its validation set (worded afresh);
    other runs keep the unseen rest of their source or the validation set."""
    cfg = config_from_dict({"data": {"train": "synthetic:train@30", "validation": "synthetic:validation"},
                            "analysis": {"mia": {"size": 40}}})
    prepared = mia.Mia(Context(RunDir(tmp_path), cfg)).prepare()
    settings, (members, nonmembers) = prepared.settings, prepared.data
    assert settings["nonmembers"] == "synthetic:nonmembers"
    assert len(members) == 30 and len(nonmembers) == 40
    assert all(ex.id.startswith("synthetic-nonmembers-") for ex in nonmembers)
    # Same wording per item kind and number of amounts in both pools.
    wording = {}
    for ex in [*members, *nonmembers]:
        key = (ex.question.split(". ")[0].split()[-1], ex.meta["n_terms"])
        wording.setdefault(key, set()).add(wording_skeleton(ex.response))
    assert all(len(v) == 1 for v in wording.values()) and len(wording) > 5
    cfg = config_from_dict({"data": {"train": str(toy_jsonl["train"]), "validation": str(toy_jsonl["test"])}})
    settings = mia.Mia(Context(RunDir(tmp_path), cfg)).prepare().settings
    assert settings["nonmembers"] == f"unseen: {toy_jsonl['test']}"


def test_mia_needs_both_classes_and_drops_empty_texts(model, char_tokenizer):
    with pytest.raises(ValueError, match="only members"):
        mia.mia_analysis(model, char_tokenizer, toy_examples(3), [], ks=[0.2])
    empty = Example("e", "Say nothing.", "", "0")
    res = mia.mia_analysis(model, char_tokenizer, toy_examples(2), [*toy_examples(2, "n", 9), empty], ks=[0.2])
    assert (res.metrics["n_empty"], res.metrics["n_nonmembers"]) == (1, 2)


# ---------------------------------------------------------------------------------------------
# Pre-memorization


def test_premem_checkpoint_accuracy_ppl_and_mask(monkeypatch, model, char_tokenizer):
    exs = toy_examples(3)
    answers = {ex.question: ex.answer for ex in exs}
    right = {exs[0].question: 2, exs[1].question: 1, exs[2].question: 0}  # correct samples of 2

    def respond(prompt):
        q = next(q for q in answers if q in prompt)
        return [f"#### {answers[q]}"] * right[q] + ["#### -1"] * (2 - right[q])

    monkeypatch.setattr(premem, "decode", _fake_decode(respond))
    ppls = [math.exp(-_ref_logprobs(model, char_tokenizer, ex.question, ex.response).mean()) for ex in exs]
    tau = math.log(math.log(sorted(ppls)[1]))  # the middle ppl sits exactly on the threshold: not memorized
    res = premem.premem_checkpoint(model, char_tokenizer, exs, Decoding(temperature=0.8, n_samples=2), tau=tau)
    assert [r["acc"] for r in res.rows] == [1.0, 0.5, 0.0]
    assert [r["ppl"] for r in res.rows] == pytest.approx(ppls, rel=1e-5)
    assert [r["not_memorized"] for r in res.rows] == [p >= sorted(ppls)[1] for p in ppls]
    assert res.metrics["train_accuracy"] == 0.5 and res.metrics["memorized"] == pytest.approx(1 / 3)


def test_premem_summary_hand_worked():
    # Two examples over three checkpoints; ppl 1.0 is memorized (log log undefined), 2.0 is not.
    acc = [[0.4, 0.0], [0.8, 0.6], [1.0, 0.2]]
    ppl = [[2.0, 2.0], [2.0, 1.0], [1.0, 2.0]]
    per_ckpt = [[{"id": f"e{i}", "acc": a, "ppl": p} for i, (a, p) in enumerate(zip(ar, pr))] for ar, pr in zip(acc, ppl)]
    means, last, ids = premem.premem_summary(per_ckpt, tau=-2.4)
    # e0: best unmemorized 0.4, 0.8, 0.8 -> min with acc: 0.4, 0.8, 0.8; e1: 0, 0 (memorized at t=1), 0.2 -> min 0.2
    assert means.tolist() == pytest.approx([0.2, 0.4, 0.5]) and last.tolist() == pytest.approx([0.8, 0.2])
    assert ids == ["e0", "e1"]
    with pytest.raises(ValueError, match="same training examples"):
        premem.premem_summary([per_ckpt[0], per_ckpt[1][::-1]], tau=-2.4)


def test_premem_r2_across_runs(tmp_path):
    pm = {"a": [0.1, 0.3, 0.5], "b": [0.2, 0.6]}
    acc = {"a": [0.2, 0.5, 0.6], "b": [0.3, 0.9]}
    runs = []
    for name in pm:
        root = tmp_path / name
        root.mkdir()
        rows = [{"checkpoint": f"epoch-{i}", "split": "test", "accuracy": a} for i, a in enumerate(acc[name])]
        (root / "dynamics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append((root, {"checkpoints": {f"epoch-{i}": {"pm": p} for i, p in enumerate(pm[name])}}))
    out = premem.premem_r2(runs, "test")
    x, y = pm["a"] + pm["b"], acc["a"] + acc["b"]
    assert len(out["points"]) == 5
    assert out["value"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert premem.premem_r2(runs[:1], "other")["value"] is None
    two = premem.premem_r2(runs[1:], "test")
    assert two["value"] is None and "at least 3" in two["reason"]


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("override, field", [
    ("analysis.mia.size=0", "analysis.mia.size"),
    ("analysis.diversity.n_samples=1", "analysis.diversity.n_samples"),
    ("analysis.mia.ks=[0.2, 1.5]", "analysis.mia.ks"),
    ("analysis.robustness.position=middle", "analysis.robustness.position"),
    ("analysis.calibraton.n_bins=3", "analysis.calibraton"),
])
def test_invalid_analysis_settings_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"field '{field}" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture()
def tiny_run(tmp_path, tiny_model_dir, toy_jsonl, char_tokenizer):
    """A run folder made by hand (as `overmem run` leaves it): config, one checkpoint, dynamics."""
    return hand_made_run(tmp_path / "run", tiny_model_dir, char_tokenizer, train=f"{toy_jsonl['train']}[:16]",
                         tests={"test": str(toy_jsonl["test"])}, max_new_tokens=6,
                         accuracies={"epoch-0": 0.0, "epoch-1": 0.25})


SMALL = ["analysis.ood.size=3", "analysis.robustness.size=2", "analysis.robustness.preambles={Extra: Well.}",
         "analysis.diversity.size=2", "analysis.diversity.n_samples=3", "analysis.diversity.sbert=false",
         "analysis.calibration.size=3", "analysis.calibration.n_samples=2", "analysis.mia.size=5",
         "analysis.premem.size=3", "analysis.premem.n_samples=2"]


def _analyze(run, toy_jsonl, *extra):
    sets = f"analysis.ood.sets={{test: {toy_jsonl['test']}, heldout: '{toy_jsonl['train']}[16:]'}}"
    args = ["analyze", str(run), "--checkpoints", "epoch-0", "epoch-1", "-q", "--set", sets,
            "--set", "analysis.ood.id_sets=[test]", *[a for s in SMALL for a in ("--set", s)], *extra]
    return main(args)


def test_analyze_end_to_end_schema_and_resume(tiny_run, toy_jsonl, capsys):
    assert _analyze(tiny_run, toy_jsonl) == 0
    out = capsys.readouterr().out
    assert "w/o perturb" in out and "min_k++@0.2 AUROC" in out and "BoN@3" in out
    files = sorted(p for p in (tiny_run / "analysis").rglob("*") if p.is_file())
    assert not (tiny_run / "analysis" / "judge.json").exists()  # off by default: it needs a judge server
    for name in default_suite():
        doc = json.loads((tiny_run / "analysis" / f"{name}.json").read_text())
        assert {"analysis", "settings", "checkpoints", "table", "figures", "samples"} <= set(doc)
        assert doc["analysis"] == name and list(doc["checkpoints"]) == ["epoch-0", "epoch-1"]
        assert doc["table"]["columns"][0] == "checkpoint" and [r[0] for r in doc["table"]["rows"]] == ["epoch-0", "epoch-1"]
        assert all(len(r) == len(doc["table"]["columns"]) for r in doc["table"]["rows"])
        assert all((tiny_run / f).is_file() and f.endswith(".png") for f in doc["figures"])
        assert doc["checkpoints"]["epoch-1"]["step"] == 2
        for ckpt, metrics in doc["checkpoints"].items():
            rows = read_jsonl(tiny_run / doc["samples"][ckpt])
            _check_against_rows(name, doc, metrics, rows)
    assert json.loads((tiny_run / "analysis" / "mia.json").read_text())["settings"]["n_members"] == 5

    # A second run recomputes nothing: every file keeps its bytes and its modification time.
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert _analyze(tiny_run, toy_jsonl) == 0
    assert sorted(p for p in (tiny_run / "analysis").rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before

    # An interruption after the samples of a checkpoint but before its JSON entry: only that is redone.
    mia_json = tiny_run / "analysis" / "mia.json"
    doc = json.loads(mia_json.read_text())
    kept = doc["checkpoints"]["epoch-1"]
    del doc["checkpoints"]["epoch-1"]
    mia_json.write_text(json.dumps(doc))
    ood_bytes = (tiny_run / "analysis" / "ood.json").read_bytes()
    assert _analyze(tiny_run, toy_jsonl, "--suite", "mia,ood") == 0
    again = json.loads(mia_json.read_text())
    assert again["checkpoints"]["epoch-1"] == kept and list(again["checkpoints"]) == ["epoch-0", "epoch-1"]
    assert (tiny_run / "analysis" / "ood.json").read_bytes() == ood_bytes
    assert len(read_jsonl(tiny_run / "analysis" / "mia" / "epoch-1.jsonl")) == 10

    # Other settings for an analysis that has results: refused, naming the setting; nothing written.
    capsys.readouterr()
    assert _analyze(tiny_run, toy_jsonl, "--suite", "mia", "--set", "analysis.mia.size=4") == 2
    err = capsys.readouterr().err
    assert "size" in err and "mia.json" in err and len(err.strip().splitlines()) == 1
    assert json.loads(mia_json.read_text()) == again


def _check_against_rows(name, doc, m, rows):
    """Each aggregate recomputed from the per-sample file in the simplest way."""
    if name == "ood":
        for s in ("test", "heldout"):
            assert m[s] == pytest.approx(np.mean([r["correct"] for r in rows if r["set"] == s]))
        assert m["ood_avg"] == m["heldout"] and m["id_avg"] == m["test"]
    elif name == "robustness":
        assert set(doc["settings"]["preambles"]) == {"First", "Today", "We", "Good", "Extra"}
        acc = {p: np.mean([r["correct"] for r in rows if r["preamble"] == p]) for p in ["none", *doc["settings"]["preambles"]]}
        assert m["avg"] == pytest.approx(np.mean([acc[p] for p in doc["settings"]["preambles"]]))
        assert len(rows) == 2 * 6
    elif name == "diversity":
        assert len(rows) == 2 and all(len(r["samples"]) == 3 for r in rows)
        assert m["pass@3"] == pytest.approx(np.mean([r["n_correct"] > 0 for r in rows]))
        assert m["ead"] == pytest.approx(np.mean([r["ead"] for r in rows])) and m["sbert"] is None
        assert "not a reward model" in doc["settings"]["scorer_label"]
    elif name == "calibration":
        kept = [r for r in rows if r["n_tokens"]]
        assert len(rows) == 6 and m["n"] == len(kept)
        assert m["ece"] == pytest.approx(_ece([r["confidence"] for r in kept], [r["correct"] for r in kept], 10))
    elif name == "mia":
        ms = [r["loss"] for r in rows if r["member"]]
        ns = [r["loss"] for r in rows if not r["member"]]
        assert len(ms) == len(ns) == 5 and m["loss/auroc"] == pytest.approx(_auroc(ms, ns))
        assert not {r["id"] for r in rows if r["member"]} & {r["id"] for r in rows if not r["member"]}
    elif name == "premem":
        assert m["train_accuracy"] == pytest.approx(np.mean([r["acc"] for r in rows]))
        assert m["pm"] is not None and doc["r2"]["test_split"] == "test" and len(doc["r2"]["points"]) == 2
        assert doc["r2"]["value"] is None
        assert (doc["ranking"] == "analysis/premem/ranking.jsonl")


def test_analyze_bad_input_is_one_line_and_writes_nothing(tiny_run, toy_jsonl, capsys):
    cases = [
        (["--suite", "ood,calibraton"], "calibraton"),
        (["--checkpoints", "epoch-7"], "epoch-7"),
        (["--suite", "robustness", "--set", "analysis.robustness.data=gsm8:test"], "gsm8k"),
        (["--suite", "mia,premem", "--set", "analysis.mia.k=0.25"], "analysis.mia.k"),
        (["--suite", "premem", "--set", "analysis.premem.compare_runs=[nowhere]"], "nowhere"),
    ]
    for extra, needle in cases:
        args = ["analyze", str(tiny_run), "--checkpoints", "epoch-1", "-q", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not (tiny_run / "analysis").exists()
    assert main(["analyze", str(tiny_run.parent), "--checkpoints", "epoch-1"]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_analyze_accepts_model_folders(tiny_run, tiny_model_dir, toy_jsonl, capsys):
    assert main(["analyze", str(tiny_run), "--checkpoints", str(tiny_model_dir), "epoch-1", "--suite", "mia", "-q",
                 "--set", "analysis.mia.size=3", "--set", "analysis.mia.ks=[0.2]"]) == 0
    doc = json.loads((tiny_run / "analysis" / "mia.json").read_text())
    # Base-model weights under another name, and the checkpoint: the folder has no training position.
    assert list(doc["checkpoints"]) == ["epoch-1", tiny_model_dir.name]
    assert doc["checkpoints"][tiny_model_dir.name]["step"] is None
    assert tiny_model_dir.name in capsys.readouterr().out


@pytest.mark.slow
def test_sentence_bert_diversity_end_to_end(tiny_run, toy_jsonl):
    pytest.importorskip("sentence_transformers")
    assert main(["analyze", str(tiny_run), "--checkpoints", "epoch-1", "--suite", "diversity", "-q",
                 "--set", "analysis.diversity.size=2", "--set", "analysis.diversity.n_samples=2"]) == 0
    doc = json.loads((tiny_run / "analysis" / "diversity.json").read_text())
    sb = doc["checkpoints"]["epoch-1"]["sbert"]
    assert sb is not None and -1e-6 <= sb <= 2


class _LengthSettings(AnalysisSettings):
    size: int = Field(2, gt=0)


class _Length(Analysis[_LengthSettings]):
    """The smallest analysis: reference lengths of the run's first test set (no model needed)."""

    name = "length"
    description = "Mean reference length"
    Settings = _LengthSettings

    def prepare(self):
        examples = self.ctx.load(self.ctx.first_test("analysis.length.data"), self.settings.size)
        return Prepared({"size": self.settings.size, **self.ctx.common()}, examples, len(examples))

    def run(self, data, model, tokenizer, progress):
        progress(len(data))
        rows = [{"id": ex.id, "chars": len(ex.response)} for ex in data]
        return AnalysisResult({"mean_chars": float(np.mean([r["chars"] for r in rows]))}, rows)

    def columns(self, settings):
        return [("mean chars", "mean_chars")]


def test_a_registered_analysis_gets_a_config_section_and_runs(tiny_run, monkeypatch, capsys):
    """The contract: a registered analysis is a section of the run config (defaults from its own
    settings model, overrides validated at load) and runs under `overmem analyze` like the others."""
    monkeypatch.setitem(ANALYSES, _Length.name, _Length)
    assert dump_config(config_from_dict({})).endswith("  length:\n    size: 2\nmerge: []\nout_dir: null\nquiet: false\n")
    with pytest.raises(ConfigError, match="field 'analysis.length.size'"):
        load_config(None, ["analysis.length.size=0"])
    assert main(["analyze", str(tiny_run), "--checkpoints", "epoch-1", "--suite", "length", "-q",
                 "--set", "analysis.length.size=3"]) == 0
    assert "mean chars" in capsys.readouterr().out
    doc = json.loads((tiny_run / "analysis" / "length.json").read_text())
    rows = read_jsonl(tiny_run / "analysis" / "length" / "epoch-1.jsonl")
    assert doc["settings"]["size"] == 3 and len(rows) == 3 and doc["figures"] == []
    assert doc["table"] == {"columns": ["checkpoint", "mean chars"],
                            "rows": [["epoch-1", pytest.approx(np.mean([r["chars"] for r in rows]))]]}


def test_analyze_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: overmem analyze" in text and "--checkpoints" in text and "--suite" in text
