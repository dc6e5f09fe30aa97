"""Checkpoint merging (paper eq. 1), checked against independent computations: full state
dicts loaded whole, and PEFT's own `merge_and_unload` for what an adapter means."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from overmem.merge import ADAPTER_SUBDIR, merge_checkpoints, merge_name

from .conftest import make_tiny_llama, random_lora_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


# ------------------------------------------------------------------ helpers


def _load_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, loaded whole (the naive way the merge avoids)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(path / "model.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for f in files for k, v in load_file(path / f).items()}


def _full_ckpt(base: Path, path: Path, tok, seed: int, **save_kw) -> Path:
    """The base plus seeded noise on every parameter, saved like the trainer saves."""
    model = _load_model(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path, **save_kw)
    tok.save_pretrained(path)
    return path


def _lora_ckpt(base: Path, path: Path, tok, seed: int, **lora_kw) -> Path:
    """A LoRA adapter with random nonzero A and B (as if trained)."""
    return random_lora_adapter(_load_model(base), path, tok, seed,
                               **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora_kw})


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """theta_i of an adapter checkpoint according to PEFT itself."""
    merged = PeftModel.from_pretrained(_load_model(base), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _expected(base_sd: dict, thetas: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """Eq. 1 with weights: base + sum_i w_i (theta_i - base), on whole state dicts."""
    return {k: v + sum(w * (t[k] - v) for t, w in zip(thetas, weights)) for k, v in base_sd.items()}


def _assert_weights(out: Path, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = _weights(out)
    assert set(got) <= set(expected)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=atol, rtol=0, msg=name)


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def full_ckpts(tiny_model_dir, char_tokenizer, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("full")
    return [_full_ckpt(tiny_model_dir, root / f"epoch-{i}", char_tokenizer, seed=i) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def lora_ckpts(tiny_model_dir, char_tokenizer, tmp_path_factory) -> list[Path]:
    """Three adapters with different ranks, alphas, rsLoRA and a per-module rank/alpha pattern."""
    root = tmp_path_factory.mktemp("lora")
    return [
        _lora_ckpt(tiny_model_dir, root / "epoch-3", char_tokenizer, seed=3),
        _lora_ckpt(tiny_model_dir, root / "epoch-6", char_tokenizer, seed=6, r=2, lora_alpha=5, use_rslora=True),
        _lora_ckpt(tiny_model_dir, root / "epoch-10", char_tokenizer, seed=10,
                   rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 2}),
    ]


# ------------------------------------------------------------------ full checkpoints


@pytest.mark.parametrize("weights", [None, [0.7, -0.2, 0.5]])
def test_full_merge_matches_formula(tiny_model_dir, full_ckpts, tmp_path, weights):
    out = merge_checkpoints(tiny_model_dir, full_ckpts, weights, out=tmp_path / "merged", progress=False)
    w = weights or [1 / 3] * 3
    _assert_weights(out, _expected(_weights(tiny_model_dir), [_weights(c) for c in full_ckpts], w))
    assert json.loads((out / "merge.json").read_text())["weights"] == pytest.approx(w)
    # A plain Hugging Face model folder: loads, with its tokenizer.
    assert _load_model(out).config.hidden_size == 32
    assert (out / "tokenizer.json").exists()


def test_sharded_inputs_and_output(tiny_model_dir, char_tokenizer, tmp_path):
    base = tmp_path / "base"
    _load_model(tiny_model_dir).save_pretrained(base, max_shard_size="20KB")
    char_tokenizer.save_pretrained(base)
    ckpts = [_full_ckpt(base, tmp_path / f"epoch-{i}", char_tokenizer, seed=i, max_shard_size="20KB") for i in (1, 2)]
    assert (ckpts[0] / "model.safetensors.index.json").exists()

    out = merge_checkpoints(base, ckpts, [0.25, 0.75], out=tmp_path / "merged", max_shard_bytes=30_000,
                            progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    _assert_weights(out, _expected(_weights(base), [_weights(c) for c in ckpts], [0.25, 0.75]))
    reloaded = _load_model(out)
    assert set(reloaded.state_dict()) == set(_weights(out))


def test_tied_embeddings_without_lm_head(char_tokenizer, tmp_path):
    """GPT-2 ties lm_head to wte and stores no lm_head.weight; LoRA on its Conv1D layers needs
    fan_in_fan_out. theta_i comes from PEFT's merge_and_unload."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(char_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(base)
    char_tokenizer.save_pretrained(base)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    # PEFT transposes Conv1D deltas and not the Linear lm_head's, whatever fan_in_fan_out says;
    # the LoRA on the tied lm_head changes the shared embedding.
    kw = {"target_modules": ["c_attn", "c_fc", "lm_head"], "fan_in_fan_out": True}
    ckpts = [_lora_ckpt(base, tmp_path / f"epoch-{i}", char_tokenizer, seed=i, **kw) for i in (1, 2)]

    out = merge_checkpoints(base, ckpts, out=tmp_path / "merged", progress=False)
    thetas = [_peft_merged(base, c) for c in ckpts]
    _assert_weights(out, _expected(_load_model(base).state_dict(), thetas, [0.5, 0.5]), atol=1e-5)
    assert "lm_head.weight" not in _weights(out)
    wte = "transformer.wte.weight"
    assert not torch.allclose(_weights(out)[wte], _weights(base)[wte])  # the lm_head LoRA landed here
    merged = _load_model(out)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()

    # Full tied checkpoints merge too: every name is in the files, none is missing.
    fulls = [_full_ckpt(base, tmp_path / f"full-{i}", char_tokenizer, seed=i) for i in (1, 2)]
    out = merge_checkpoints(base, fulls, out=tmp_path / "merged-full", progress=False)
    _assert_weights(out, _expected(_weights(base), [_weights(c) for c in fulls], [0.5, 0.5]))


# ------------------------------------------------------------------ LoRA adapters


def test_lora_merge_matches_peft_merge_and_unload(tiny_model_dir, lora_ckpts, tmp_path):
    weights = [0.5, 0.2, 0.3]
    out = merge_checkpoints(tiny_model_dir, lora_ckpts, weights, out=tmp_path / "merged", progress=False)
    thetas = [_peft_merged(tiny_model_dir, c) for c in lora_ckpts]
    expected = _expected(_load_model(tiny_model_dir).state_dict(), thetas, weights)
    _assert_weights(out, expected, atol=1e-5)
    base = _weights(tiny_model_dir)
    got = _weights(out)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])  # untouched by LoRA
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])


def test_lora_delta_is_scaled_b_times_a(tiny_model_dir, lora_ckpts, tmp_path):
    """The delta formula written out by hand: s * B @ A, s = alpha/r or alpha/sqrt(r) (rsLoRA),
    with the per-module alpha_pattern of the third adapter."""
    out = merge_checkpoints(tiny_model_dir, lora_ckpts[1:], [1.0, 1.0], out=tmp_path / "m", progress=False)
    name = "model.layers.1.self_attn.v_proj"
    a6, a10 = load_file(lora_ckpts[1] / "adapter_model.safetensors"), load_file(lora_ckpts[2] / "adapter_model.safetensors")
    key = f"base_model.model.{name}.lora_{{}}.weight"
    d6 = 5 / 2**0.5 * a6[key.format("B")] @ a6[key.format("A")]  # r=2, alpha=5, rsLoRA
    d10 = 2 / 3 * a10[key.format("B")] @ a10[key.format("A")]  # rank_pattern 3, alpha_pattern 2
    expected = _weights(tiny_model_dir)[f"{name}.weight"] + d6 + d10
    torch.testing.assert_close(_weights(out)[f"{name}.weight"], expected, atol=1e-6, rtol=0)


def test_exact_adapter_equals_dense_merge(tiny_model_dir, lora_ckpts, char_tokenizer, tmp_path):
    weights = [0.6, 0.3, 0.1]
    out = merge_checkpoints(tiny_model_dir, lora_ckpts, weights, out=tmp_path / "merged", exact_adapter=True,
                            progress=False)
    cfg = json.loads((out / ADAPTER_SUBDIR / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 2 + 4 and cfg["rank_pattern"] == {  # v_proj: 4 + 2 + 3
        f"model.layers.{i}.self_attn.v_proj": 9 for i in range(2)}
    dense = _logits(_load_model(out), len(char_tokenizer))
    exact = PeftModel.from_pretrained(_load_model(tiny_model_dir), str(out / ADAPTER_SUBDIR)).eval()
    torch.testing.assert_close(_logits(exact, len(char_tokenizer)), dense, atol=1e-5, rtol=0)


def test_pissa_delta_uses_the_initial_adapter(tiny_model_dir, char_tokenizer, tmp_path):
    """PiSSA rewrites the base (W_res = W - s B0 A0); a checkpoint computes W_res + s B A, so
    its delta from the original W is s (B A - B0 A0). theta_i is read off the in-memory PEFT
    model; PEFT's own conversion to plain LoRA must merge to the same weights."""
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = get_peft_model(_load_model(tiny_model_dir), lora)
    init_dir = tmp_path / "adapter-init"
    model.peft_config["default"].init_lora_weights = True  # as train/methods.save_initial_adapter
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = "pissa"
    raw, converted, thetas = [], [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.2)  # "training"
        model.save_pretrained(tmp_path / f"raw-{seed}")
        model.save_pretrained(tmp_path / f"conv-{seed}", path_initial_model_for_weight_conversion=str(init_dir))
        raw.append(tmp_path / f"raw-{seed}")
        converted.append(tmp_path / f"conv-{seed}")
        thetas.append({k: v.detach().clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()})
    assert json.loads((raw[0] / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    expected = _expected(_load_model(tiny_model_dir).state_dict(), thetas, [0.5, 0.5])

    out = merge_checkpoints(tiny_model_dir, raw, out=tmp_path / "m-raw", initial_adapter=init_dir, progress=False)
    _assert_weights(out, expected, atol=1e-5)
    out = merge_checkpoints(tiny_model_dir, converted, out=tmp_path / "m-conv", progress=False)
    _assert_weights(out, expected, atol=1e-5)

    with pytest.raises(ValueError, match="initial_adapter"):
        merge_checkpoints(tiny_model_dir, raw, out=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="already converted"):
        merge_checkpoints(tiny_model_dir, converted, out=tmp_path / "x", initial_adapter=init_dir, progress=False)
    assert not (tmp_path / "x").exists()


def test_full_and_adapter_checkpoints_mix(tiny_model_dir, full_ckpts, lora_ckpts, tmp_path):
    out = merge_checkpoints(tiny_model_dir, [full_ckpts[0], lora_ckpts[0]], out=tmp_path / "m", progress=False)
    thetas = [_weights(full_ckpts[0]), _peft_merged(tiny_model_dir, lora_ckpts[0])]
    _assert_weights(out, _expected(_weights(tiny_model_dir), thetas, [0.5, 0.5]), atol=1e-5)


# ------------------------------------------------------------------ errors and atomicity


def test_shape_mismatch_names_the_tensor(tiny_model_dir, full_ckpts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in full_ckpts[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:60]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: shape \[60, 32\] .* \[64, 32\]"):
        merge_checkpoints(tiny_model_dir, [full_ckpts[1], bad], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tiny_model_dir, full_ckpts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((full_ckpts[0] / "config.json").read_bytes())
    sd = load_file(full_ckpts[0] / "model.safetensors")
    del sd["model.layers.0.post_attention_layernorm.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.post_attention_layernorm\.weight is missing"):
        merge_checkpoints(tiny_model_dir, [full_ckpts[0], bad], out=tmp_path / "out", progress=False)


def test_checkpoints_of_another_base_are_refused(tiny_model_dir, full_ckpts, lora_ckpts, char_tokenizer, tmp_path):
    other = tmp_path / "other"
    model = make_tiny_llama(len(char_tokenizer))
    model.config.hidden_size = 48  # a differently shaped "base"
    AutoModelForCausalLM.from_config(model.config).save_pretrained(other)
    with pytest.raises(ValueError, match=r"other/config.json: hidden_size=48 but 32"):
        merge_checkpoints(tiny_model_dir, [full_ckpts[0], other], out=tmp_path / "out", progress=False)

    moved = tmp_path / "moved"
    moved.mkdir()
    for f in lora_ckpts[1].iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"moved/adapter_config.json: trained on base 'someone/another-model', but "
                       r"the merge's base is '\S+tiny-llama\d*' \('someone/another-model' is neither a local folder"):
        merge_checkpoints(tiny_model_dir, [lora_ckpts[0], moved], out=tmp_path / "out", progress=False)

    # An adapter over the right base merged onto a differently shaped base.
    other_base = tmp_path / "other-base"
    _load_model(other).save_pretrained(other_base)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\.\S+\.weight: shape \[\d+, \d+\] in \S+epoch-3 but \["):
        merge_checkpoints(other_base, lora_ckpts[:2], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _another_base(char_tokenizer, path: Path) -> Path:
    """A base of the same architecture and shapes as the tiny one, with other weights."""
    make_tiny_llama(len(char_tokenizer), seed=7).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def test_adapters_of_another_base_of_the_same_shapes_are_refused_unless_forced(
        tiny_model_dir, lora_ckpts, char_tokenizer, tmp_path):
    """Every shape fits, so the merge used to succeed and write a wrong model. The adapters record the
    base they were trained on; a merge onto other weights names both, and --force overrides."""
    other = _another_base(char_tokenizer, tmp_path / "other")
    with pytest.raises(ValueError, match=rf"epoch-3/adapter_config.json: trained on base '{tiny_model_dir}', but the "
                       rf"merge's base is '{other}' \({tiny_model_dir} holds other weights\); .* pass --force"):
        merge_checkpoints(other, lora_ckpts[:2], out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]

    out = merge_checkpoints(other, lora_ckpts[:2], out=tmp_path / "out", force=True, progress=False)
    assert json.loads((out / "merge.json").read_text())["forced"] is True


def test_the_recorded_base_may_be_named_differently(tiny_model_dir, lora_ckpts, char_tokenizer, tmp_path,
                                                    monkeypatch):
    """Not refused: the base under another path (relative, or a copy: same weights), or the Hub
    cache's copy of the name the adapter recorded."""
    monkeypatch.chdir(tiny_model_dir.parent)
    merge_checkpoints(tiny_model_dir.name, lora_ckpts[:2], out=tmp_path / "relative", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    merge_checkpoints(copy, lora_ckpts[:2], out=tmp_path / "copied", progress=False)

    # An adapter trained on the Hub's "someone/tiny", merged onto a folder: compared with the cached copy.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    hub = []
    for i, ckpt in enumerate(lora_ckpts[:2]):
        hub.append(shutil.copytree(ckpt, tmp_path / f"hub-{i}"))
        cfg = json.loads((hub[-1] / "adapter_config.json").read_text())
        (hub[-1] / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someone/tiny"}))
    merge_checkpoints(copy, hub, out=tmp_path / "from-hub", progress=False)
    with pytest.raises(ValueError, match=r"trained on base 'someone/tiny', but .* \(\S+abc123 holds other weights\)"):
        merge_checkpoints(_another_base(char_tokenizer, tmp_path / "other"), hub, out=tmp_path / "x", progress=False)


def test_overwrite_replaces_only_an_earlier_merge(tiny_model_dir, full_ckpts, tmp_path):
    """--overwrite used to replace whatever lay at --out (a file, a run folder) with the merge."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    for out in (tmp_path / "notes.txt", tmp_path / "run"):
        with pytest.raises(ValueError, match=r"exists and is not a merged model folder \(no merge.json\)"):
            merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=out, overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "run").is_dir()


def test_a_checkpoint_listed_twice_is_refused(tiny_model_dir, full_ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"epoch-1: listed twice"):
        merge_checkpoints(tiny_model_dir, [full_ckpts[0], full_ckpts[1], full_ckpts[0]], out=tmp_path / "m")


def test_different_tokenizers_are_refused(tiny_model_dir, full_ckpts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in full_ckpts[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    Tokenizer.from_file(str(bad / "tokenizer.json"))  # still a valid tokenizer
    with pytest.raises(ValueError, match="bad: tokenizer differs"):
        merge_checkpoints(tiny_model_dir, [full_ckpts[1], bad], out=tmp_path / "out", progress=False)


def test_argument_errors(tiny_model_dir, full_ckpts, lora_ckpts, tmp_path):
    with pytest.raises(ValueError, match="at least two checkpoints, got 1"):
        merge_checkpoints(tiny_model_dir, full_ckpts[:1], out=tmp_path / "out")
    with pytest.raises(ValueError, match="3 weights for 2 checkpoints"):
        merge_checkpoints(tiny_model_dir, full_ckpts[:2], [0.2, 0.3, 0.5], out=tmp_path / "out")
    with pytest.raises(ValueError, match="exact_adapter needs plain LoRA adapters"):
        merge_checkpoints(tiny_model_dir, [lora_ckpts[0], full_ckpts[0]], out=tmp_path / "out", exact_adapter=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_failure_while_writing_leaves_nothing(tiny_model_dir, full_ckpts, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("overmem.merge_writing.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=tmp_path / "merged", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_merge_leaves_temporary_folders_that_the_next_merge_removes(tiny_model_dir, full_ckpts, tmp_path):
    """A killed merge (SIGKILL: no exception, no cleanup) leaves `.NAME.tmp-HOST-PID-X` beside its
    output, and `.NAME.old-...` holding the previous output when it was replacing one. The next merge
    into the same parent removes them (putting a previous output back where nothing replaced it);
    those of a merge still running are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".merged.tmp-{host}-{dead.pid}-abc"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    kept = tmp_path / f".earlier.old-{host}-{dead.pid}-def" / "earlier"
    kept.mkdir(parents=True)
    (kept / "merge.json").write_text("{}")
    running = tmp_path / f".other.tmp-{host}-{os.getppid()}-ghi"
    running.mkdir()

    merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=tmp_path / "merged", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "earlier", "merged"]
    assert (tmp_path / "earlier" / "merge.json").exists()


def test_failed_replacement_keeps_the_previous_output(tiny_model_dir, full_ckpts, tmp_path, monkeypatch):
    """A failure between moving the previous output aside and moving the new one in used to leave no
    output at all (the previous one stranded in a temporary folder)."""
    out = merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=tmp_path / "merged", progress=False)
    before = _weights(out)
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".merged.tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        merge_checkpoints(tiny_model_dir, full_ckpts[1:], out=out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    _assert_weights(out, before)


def test_overwrite_replaces_the_folder(tiny_model_dir, full_ckpts, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoints(tiny_model_dir, full_ckpts[:2], out=out, progress=False)
    merge_checkpoints(tiny_model_dir, full_ckpts[1:], out=out, overwrite=True, progress=False)
    _assert_weights(out, _expected(_weights(tiny_model_dir), [_weights(c) for c in full_ckpts[1:]], [0.5, 0.5]))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_merge_name():
    assert merge_name(["run/checkpoints/epoch-3", Path("run/checkpoints/epoch-10")]) == "merge(epoch-3,epoch-10)"
    assert merge_name(["a/epoch-3", "a/epoch-10"], [0.5, 0.5]) == "merge(epoch-3,epoch-10)"
    assert merge_name(["a/epoch-3", "a/epoch-10"], [0.25, 0.75]) == "merge(epoch-3:0.25,epoch-10:0.75)"
