"""The evaluation backends (`eval.backend`, docs/backends.md): which one evaluates (`choose_backend`),
a checkpoint loaded for it (`load_for_eval`), and a model as its backend (`as_backend`). Both
implement `overmem.backend_api.EvalBackend`: `overmem.hf_backend.HfBackend` (a Hugging Face model)
and `overmem.vllm_backend.VllmModel` (a handle on the process's one vLLM engine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import PreTrainedModel

from .backend_api import EvalBackend
from .config import RunConfig
from .hf_backend import HfBackend
from .vllm_backend import VllmError, VllmModel, engine_for, engine_python, engine_settings, vllm_importable

BACKENDS: dict[str, type[EvalBackend]] = {"hf": HfBackend, "vllm": VllmModel}  # `eval.backend` -> its backend

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


def load_for_eval(path: str | Path | None, cfg: RunConfig) -> EvalBackend:
    """The checkpoint at `path` (None: the base model) as `cfg.eval.backend` evaluates it: a Hugging
    Face model in this process, or a handle on the process's one vLLM engine with these weights
    loaded in place (`overmem.vllm_backend`)."""
    return BACKENDS[choose_backend(cfg)].open(path, cfg)


def as_backend(model: PreTrainedModel | EvalBackend) -> EvalBackend:
    """`model` as an evaluation backend: a backend as it is, a Hugging Face model (the one being
    trained, one a caller loaded) in an `HfBackend`."""
    return model if isinstance(model, EvalBackend) else HfBackend(model)
