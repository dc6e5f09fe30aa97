"""The tiny model stack: tokenizer round trip, HF save/load, a few pretraining steps learn."""

from __future__ import annotations

import json
import re
from itertools import islice

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from overmem import tiny
from overmem.data import synthetic as syn
from overmem.data.example import format_prompt

SMALL = tiny.TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny.build_tokenizer()


def _texts() -> list[str]:
    out = []
    for split in syn.SPLITS:
        for ex in syn.generate_split(split, 15):
            out += [ex.question, ex.response, format_prompt(ex.question) + ex.response]
    return out + ["unseen wörds, émojis 🙂 and\ttabs  ", "12345 + -7 = <<12345-7=12338>>"]


def test_round_trip(tokenizer):
    for text in _texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens_and_prompt(tokenizer):
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        tiny.BOS, tiny.EOS, tiny.PAD}
    ids = tokenizer(format_prompt("Q?"))["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    # The fixed parts of the prompt template are one token each.
    assert tokenizer.convert_ids_to_tokens(ids[1]) == tiny.PROMPT_HEAD
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == tiny.PROMPT_TAIL
    # Every digit is its own token (optionally with a leading space).
    for tok in tokenizer.convert_ids_to_tokens(tokenizer("1234 + 56")["input_ids"][1:]):
        assert sum(c.isdigit() for c in tok) <= 1


def test_tokenizer_deterministic(tokenizer):
    assert tiny.build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_pretraining_stream_uses_the_plain_format(tokenizer):
    feature = next(iter(tiny._PretrainStream(tokenizer, seed=0, max_length=512)))
    ids, labels = feature["input_ids"], feature["labels"]
    n_prompt = labels.index(next(x for x in labels if x != -100))
    prompt = tokenizer.decode(ids[:n_prompt], skip_special_tokens=True)
    assert prompt.startswith("Question: ") and prompt.endswith("\nSolution:\n")
    assert "### Instruction" not in prompt
    assert ids[-1] == tokenizer.eos_token_id and labels[n_prompt:] == ids[n_prompt:]


def test_save_load_through_auto_classes(tokenizer, tmp_path):
    model = tiny.build_model(SMALL, tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    text = format_prompt("Ava has 3 apples.") + "3 + 4 = <<3+4=7>>7"
    assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok2.decode(tok2(text, add_special_tokens=False)["input_ids"]) == text
    x = torch.tensor([tokenizer(text)["input_ids"]])
    torch.testing.assert_close(model2(x).logits, model(x).logits)


def test_pretrain_reduces_loss_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path))
    cfg = tiny.PretrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2,
                              cooldown_steps=0, model=SMALL)
    folder = tiny.get_tiny_base(cfg, progress=False)
    assert folder.parent == tmp_path and folder.name == f"tiny-base-{cfg.digest()}"
    info = json.loads((folder / "pretrain_info.json").read_text())
    assert info["last_loss"] < info["first_loss"] * 0.8
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert tiny.get_tiny_base(cfg, progress=False) == folder  # cached: not retrained
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id


def test_arithmetic_drills_are_the_solutions_calculations():
    from overmem.data import synthetic

    problems = list(islice(synthetic.pretrain_stream(seed=5), 20))
    drill = tiny.arithmetic_drill(iter(problems), 6)
    lines = drill.response.splitlines()
    assert len(lines) == 6 and drill.question == tiny.DRILL_QUESTION
    # Independent extraction: every "a op b = <<...>>c" in the first problems, in order.
    expected = [m.group(0) for p in problems for m in re.finditer(r"\d+(?: [-+*] \d+)+ = <<[^>]+>>\d+", p.response)]
    assert lines == expected[:6]
    for line in lines:
        shown, note = line.split(" = <<")
        expr, result = note.split("=")
        assert eval(expr) == eval(shown) == int(result.split(">>")[1])  # digits and + - * only


def test_pretrain_stream_mixes_drills_at_the_asked_share():
    tokenizer = tiny.build_tokenizer()
    stream = tiny._PretrainStream(tokenizer, seed=0, max_length=256, drill_frac=0.4, drill_lines=5)
    drill_head = tokenizer(tiny.DRILL_QUESTION, add_special_tokens=False)["input_ids"]
    n, drills = 300, 0
    for feature in islice(iter(stream), n):
        ids = feature["input_ids"]
        drills += any(ids[i:i + len(drill_head)] == drill_head for i in range(len(ids)))
    assert abs(drills / n - 0.4) < 0.1


# The demo's base, shipped in the package (overmem/assets/demo_base) with its build.json.

def test_shipped_base_matches_its_build_record():
    """The shipped files are what build.json says: the demo's settings, file hashes, parameter shapes
    and count, each computed here independently of `verify_base`."""
    import hashlib
    from dataclasses import asdict

    from safetensors import safe_open

    from overmem.demo import DEMO_PRETRAIN, REBUILD_COMMAND

    folder = tiny.SHIPPED_BASE
    record = json.loads((folder / "build.json").read_text())
    assert record["config"] == json.loads(json.dumps(asdict(DEMO_PRETRAIN)))
    assert record["digest"] == DEMO_PRETRAIN.digest() and record["seed"] == DEMO_PRETRAIN.seed == 0
    assert record["command"] == REBUILD_COMMAND and record["generator_version"] == tiny._GENERATOR_VERSION
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    for name in tiny.HASHED_FILES:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == record["sha256"][name], name
    config = json.loads((folder / "config.json").read_text())
    for key, value in asdict(DEMO_PRETRAIN.model).items():
        assert config[key] == value, key
    # The architecture the settings build, against the file's tensors and the record.
    tokenizer = tiny.build_tokenizer(DEMO_PRETRAIN.vocab_size)
    fresh = tiny.build_model(DEMO_PRETRAIN.model, tokenizer)
    expected = {k: list(v.shape) for k, v in fresh.state_dict().items() if k != "lm_head.weight"}  # tied
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {k: list(f.get_slice(k).get_shape()) for k in f.keys()} == expected == record["shapes"]
    assert record["parameters"] == sum(p.numel() for p in fresh.parameters())
    assert config["vocab_size"] == len(tokenizer)
    shipped_tok = AutoTokenizer.from_pretrained(folder)
    assert shipped_tok.get_vocab() == tokenizer.get_vocab()
    assert tiny.verify_base(folder) == []


def test_the_shipped_base_serves_its_settings_and_the_cache_the_others(tmp_path, monkeypatch):
    from overmem.demo import DEMO_PRETRAIN, demo_pretrain

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained although the base ships")

    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "pretrain_base", no_pretraining)
    assert tiny.get_tiny_base(DEMO_PRETRAIN, progress=False) == tiny.SHIPPED_BASE
    assert list(tmp_path.iterdir()) == []
    other = demo_pretrain(600)
    assert tiny.shipped_base(other) is None
    with pytest.raises(AssertionError, match="pretrained although"):  # other settings: trained into the cache
        tiny.get_tiny_base(other, progress=False)


def test_verify_base_names_what_disagrees(tmp_path):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(tiny.SHIPPED_BASE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    problems = tiny.verify_base(folder)
    assert "model.safetensors: sha256 differs from build.json" in problems
    assert "config.json: sha256 differs from build.json" in problems
    assert any(p.startswith("config.json: hidden_size is 129") for p in problems)
    (folder / "build.json").write_text("{not json")
    with pytest.raises(ValueError, match="build.json: not valid JSON"):
        tiny.verify_base(folder)


def test_rebuild_on_a_short_schedule_is_recorded_and_reproducible(tmp_path, monkeypatch):
    """The rebuild path on a few steps: a base folder that verifies against its own build.json,
    loads with the Auto classes, and comes out bit for bit the same when built again."""
    from overmem.demo import REBUILD_COMMAND, rebuild_base

    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path / "cache"))
    cfg = tiny.PretrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, cooldown_steps=1, model=SMALL)
    first = rebuild_base(tmp_path / "a", cfg, progress=False)
    second = rebuild_base(tmp_path / "b", cfg, progress=False)
    assert tiny.verify_base(first) == [] and tiny.verify_base(second) == []
    a = json.loads((first / "build.json").read_text())
    b = json.loads((second / "build.json").read_text())
    assert a["sha256"] == b["sha256"]
    assert a["command"] == f"{REBUILD_COMMAND} --out {tmp_path / 'a'} --pretrain-steps 4"
    assert a["config"]["steps"] == 4 and a["digest"] == cfg.digest()
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.hidden_size == SMALL.hidden_size
    assert not list(tmp_path.glob("*.tmp*"))  # built aside, then renamed


def test_rebuild_command_line(tmp_path, monkeypatch, capsys):
    """`python -m overmem.demo --rebuild-base` pretrains the demo's settings into the shipped folder;
    too few steps are refused before any work."""
    from overmem import demo

    calls = []

    def fake_build(out_dir, cfg, command, progress=True):
        calls.append((out_dir, cfg, command))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "build.json").write_text(json.dumps({"parameters": 1, "sha256": {"model.safetensors": "ab" * 32}}))
        return out_dir

    monkeypatch.setattr(demo, "build_base", fake_build)
    monkeypatch.setattr(demo, "SHIPPED_BASE", tmp_path / "shipped")
    assert demo.main(["--rebuild-base", "-q", "--out", str(tmp_path / "shipped")]) == 0
    assert calls == [(tmp_path / "shipped", demo.DEMO_PRETRAIN, demo.REBUILD_COMMAND)]
    assert "wrote" in capsys.readouterr().out
    assert demo.main(["--rebuild-base", "--pretrain-steps", "10", "--out", str(tmp_path / "x")]) == 2
    assert "--pretrain-steps: 10 is too few" in capsys.readouterr().err
    assert len(calls) == 1
