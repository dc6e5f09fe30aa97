"""Shared fixtures: a character-level tokenizer and tiny random Llama models, built in seconds."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from overmem.data.example import Example
from overmem.hf_backend import _Slots

DATA_DIR = Path(os.environ.get("OVERMEM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def random_lora_adapter(model, path: Path, tokenizer, seed: int, **lora_kw) -> Path:
    """A LoRA adapter over the loaded base `model`, saved to `path`, with random nonzero A and B (as
    if trained; a fresh adapter's B is zero). `lora_kw` are LoraConfig fields."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fixed_continuation(model, tokenizer, text: str) -> None:
    """Make `model` write the tokens of `text` after every prompt it decodes (`model.generate`, and
    the greedy loop of `overmem.hf_backend`, which then writes EOS): what a model that wrote `text`
    would return, so that what is done with a generation can be checked exactly. Its other forward
    passes (scoring, verification) are the model's own."""
    tail = tokenizer(text, add_special_tokens=False)["input_ids"]

    def fixed(input_ids, **kw):
        return torch.cat([input_ids, torch.tensor([tail] * input_ids.shape[0])], dim=1)

    real_forward = model.forward

    def forward(*args, cache=None, **kwargs):
        if not isinstance(cache, _Slots):
            return real_forward(*args, cache=cache, **kwargs)
        written = getattr(cache, "fixed_written", 0)  # tokens of `text` written into this batch's cache so far
        cache.fixed_written = written + 1
        token = tail[written] if written < len(tail) else tokenizer.eos_token_id
        logits = torch.full((kwargs["input_ids"].shape[0], 1, model.config.vocab_size), -1e4)
        logits[..., token] = 0.0
        return CausalLMOutputWithPast(logits=logits)

    model.generate = fixed
    model.forward = forward


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, char_tokenizer) -> Path:
    """A saved tiny random Llama + tokenizer folder, loadable with plain transformers."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(char_tokenizer)).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def toy_examples(n: int, prefix: str = "toy", offset: int = 0) -> list[Example]:
    """Small GSM8K-style problems with correct references."""
    out = []
    for i in range(offset, offset + n):
        a, b = 2 + i % 7, 3 + (i * 5) % 11
        out.append(Example(
            id=f"{prefix}/{i}",
            question=f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            response=f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            answer=str(a + b),
        ))
    return out


def wording_skeleton(response: str) -> str:
    """A synthetic reference with its numbers, operations and the person's name blanked: what
    its wording chose."""
    from overmem.data.synthetic_wording import PEOPLE

    text = re.sub(r"[+-]", "OP", re.sub(r"\d+", "N", response))
    return re.sub(r"\b(" + "|".join(p[0] for p in PEOPLE) + r")\b", "NAME", text)


def write_toy_jsonl(folder: Path) -> dict[str, Path]:
    """GSM8K-shaped JSONL files (question / answer fields) for train (24) and test (8) in `folder`."""
    import json

    files = {}
    for name, n, off in (("train", 24, 0), ("test", 8, 100)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"question": e.question, "answer": e.response}) + "\n"
                             for e in toy_examples(n, name, off)))
        files[name] = p
    return files


@pytest.fixture()
def toy_jsonl(tmp_path) -> dict[str, Path]:
    """GSM8K-shaped JSONL files (question / answer fields) for train and test."""
    return write_toy_jsonl(tmp_path)


@pytest.fixture()
def one_thread():
    """Tiny tensors: a second thread only waits on the other processes sharing the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_made_run(run: Path, model_dir: Path, tokenizer, *, train: str, tests: dict[str, str], max_new_tokens: int,
                  accuracies: dict[str, float | None]) -> Path:
    """A run folder as `overmem run` leaves it, made by hand: config, checkpoint `epoch-1` (a tiny
    random Llama), and one `test` dynamics row per checkpoint with the given accuracy."""
    import json

    from overmem.config import config_from_dict, dump_config

    cfg = config_from_dict({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": train, "tests": tests},
        "generation": {"max_new_tokens": max_new_tokens}, "eval": {"bootstrap": 100}, "quiet": True,
    })
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    ckpt = run / "checkpoints" / "epoch-1"
    make_tiny_llama(len(tokenizer), seed=1).save_pretrained(ckpt)
    (ckpt / "overmem.json").write_text(json.dumps({"epoch": 1.0, "step": 2}))
    (run / "dynamics.jsonl").write_text("".join(
        json.dumps({"checkpoint": c, "split": "test", "accuracy": a}) + "\n" for c, a in accuracies.items()))
    return run


def processes_named(token: str) -> list[int]:
    """Live processes called `token`; zombies (killed, waiting for init to reap them) do not count."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Name", "").strip() == token and not fields.get("State", "").strip().startswith("Z"):
                found.append(int(entry.name))
    return found
