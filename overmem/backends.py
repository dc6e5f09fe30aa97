"""The evaluation backends (`eval.backend`, docs/backends.md): which one evaluates (`choose_backend`)
and a checkpoint loaded for it (`load_for_eval`): a Hugging Face model, or a handle on the
process's one vLLM engine (`overmem.vllm_backend.VllmModel`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .config import RunConfig
from .models import load_checkpoint, load_model
from .vllm_backend import VllmError, engine_for, engine_python, engine_settings, open_checkpoint, vllm_importable

_choice: dict[str, str] = {}


def choose_backend(cfg: RunConfig) -> str:
    """'hf' or 'vllm' for `cfg.eval.backend`; `auto` takes vLLM when it is installed and starts on
    the model (else Hugging Face), says which once per process, and remembers it."""
    if cfg.eval.backend != "auto":
        return cfg.eval.backend
    key = json.dumps([engine_settings(cfg), engine_python(cfg)], sort_keys=True)
    if key not in _choice:
        why = ""
        if not vllm_importable(engine_python(cfg)):
            why = "vllm is not installed (EXTRAS=vllm bash scripts/setup.sh installs it)"
        else:
            try:
                engine_for(cfg)
            except VllmError as err:
                why = str(err)
        _choice[key] = "hf" if why else "vllm"
        if not cfg.quiet:
            print(f"eval.backend auto: {'Hugging Face, ' + why if why else 'vLLM'}", file=sys.stderr)
    return _choice[key]


def load_for_eval(path: str | Path | None, cfg: RunConfig) -> Any:  # PreTrainedModel | VllmModel
    """The checkpoint at `path` (None: the base model) as `cfg.eval.backend` evaluates it: a Hugging
    Face model, or a handle on the process's one vLLM engine with these weights loaded in place
    (`overmem.vllm_backend`). `scoring` and `generation` take either."""
    if choose_backend(cfg) == "vllm":
        return open_checkpoint(path, cfg)
    return load_model(cfg.model) if path is None else load_checkpoint(path, cfg.model)
