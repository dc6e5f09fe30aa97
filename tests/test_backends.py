"""The evaluation backend's choices that need no vLLM: engine settings, which adapters run as
adapters, `auto` without vLLM, and an engine that cannot start (one-line error, no process left).
The backends' agreement is in tests/test_vllm.py (needs vLLM)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from overmem.backends import choose_backend
from overmem.config import RunConfig
from overmem.vllm_backend import VllmEngine, VllmError, engine_settings, lora_as_adapter

PLAIN = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def _cfg(lora_mode: str | None = None, **train) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": "some/hub-model", "dtype": "float32"},
                                     "train": {"max_length": 300, **train}, "generation": {"max_new_tokens": 50},
                                     "eval": {"vllm": {"lora": lora_mode}}})


def test_hugging_face_is_the_default():
    assert RunConfig().eval.backend == "hf"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU defaults")
def test_engine_settings_on_the_cpu():
    s = engine_settings(_cfg())
    assert s["model"] == "some/hub-model" and s["dtype"] == "float32"
    assert s["max_model_len"] == 350  # train.max_length + generation.max_new_tokens
    assert s["enforce_eager"] is True and s["kv_cache_memory_bytes"] == 2**30
    assert s["max_lora_rank"] is None  # LoRA checkpoints are merged on the CPU by default
    assert engine_settings(_cfg("adapter"))["max_lora_rank"] == 64  # train.lora.r
    assert engine_settings(_cfg("adapter", method="pissa"))["max_lora_rank"] == 128  # saved as rank 2r
    assert engine_settings(_cfg("adapter", lora={"r": 12}))["max_lora_rank"] == 16  # the next rank vLLM allocates
    assert engine_settings(_cfg("adapter", method="full"))["max_lora_rank"] is None  # no LoRA in the engine
    assert engine_settings(_cfg("merge"))["max_lora_rank"] is None
    given = _cfg().model_copy(deep=True)
    given.eval.vllm.gpu_memory_utilization = 0.2
    assert engine_settings(given)["kv_cache_memory_bytes"] is None  # the share decides then


def test_which_adapters_run_as_adapters():
    assert lora_as_adapter(PLAIN, 8) is None
    assert lora_as_adapter({**PLAIN, "rank_pattern": {"q_proj": 16}}, 8) == "rank 16 > eval.vllm.max_lora_rank 8"
    assert lora_as_adapter({**PLAIN, "use_dora": True}, 8) == "DoRA"
    assert lora_as_adapter({**PLAIN, "modules_to_save": ["lm_head"]}, 8) == "modules_to_save"
    assert lora_as_adapter({**PLAIN, "bias": "lora_only"}, 8) == "trained biases"
    assert lora_as_adapter({**PLAIN, "target_modules": "q_proj|v_proj"}, 8).startswith("target modules")
    assert lora_as_adapter({**PLAIN, "peft_type": "IA3"}, 8) == "peft_type 'IA3'"
    assert lora_as_adapter(PLAIN, None).startswith("the engine runs without LoRA (eval.vllm.lora: merge")
    assert lora_as_adapter(PLAIN, None).startswith("the engine runs without LoRA")


def test_auto_without_vllm_takes_hugging_face(capsys):
    cfg = _cfg().model_copy(deep=True)
    cfg.eval.backend = "auto"
    cfg.eval.vllm.python = "/nonexistent/python"
    assert choose_backend(cfg) == "hf"
    assert capsys.readouterr().err.strip() == (
        "eval.backend auto: Hugging Face, vllm is not installed (EXTRAS=vllm bash scripts/setup.sh installs it)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_an_engine_that_cannot_start_is_one_line_and_leaves_nothing():
    with pytest.raises(VllmError, match=r"^vLLM is not installed for .*: install it with `EXTRAS=vllm bash "
                                        r"scripts/setup.sh`"):
        VllmEngine({"model": "x"}, sys.executable)
    children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split() if sys.platform == "linux" else []
    assert not children  # the worker was stopped
    with pytest.raises(VllmError, match="eval.vllm.python: cannot run '/nonexistent/python'"):
        VllmEngine({"model": "x"}, "/nonexistent/python")


def test_an_engine_that_dies_before_its_start_request_says_so(tmp_path, monkeypatch):
    """The worker's interpreter exits before the start request is sent (a race a loaded machine
    loses now and then), so the request stays buffered for a closed pipe: closing the engine must
    not turn the one-line error into a bare "Broken pipe"."""
    import subprocess

    dead = tmp_path / "python"
    dead.write_text("#!/bin/sh\nexit 3\n")
    dead.chmod(0o755)
    started = subprocess.Popen

    def exited(*args, **kwargs):  # the worker, already dead when the request is written
        proc = started(*args, **kwargs)
        proc.wait()
        return proc

    monkeypatch.setattr(subprocess, "Popen", exited)
    with pytest.raises(VllmError, match=r"^the vLLM engine process died during 'start' \(exit 3"):
        VllmEngine({"model": "x"}, str(dead))


def test_the_engine_length_is_within_the_models_context(tmp_path):
    """A model of 256 positions: the engine's max_model_len is 256, not train.max_length +
    generation.max_new_tokens (350), which vLLM would refuse; a longer context leaves 350."""
    from transformers import LlamaConfig

    for positions, want in ((256, 256), (4096, 350)):
        folder = tmp_path / str(positions)
        LlamaConfig(max_position_embeddings=positions).save_pretrained(folder)
        cfg = _cfg().model_copy(update={"model": _cfg().model.model_copy(update={"name_or_path": str(folder)})})
        assert engine_settings(cfg)["max_model_len"] == want
