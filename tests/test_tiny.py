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
