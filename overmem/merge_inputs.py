"""Reading the inputs of a checkpoint merge (`overmem.merge`): the base and each checkpoint's
safetensors weights, and each checkpoint as a set of deltas to the base.

A full checkpoint (`FullInput`) contributes theta_i - theta_base for every tensor; a LoRA adapter
(`AdapterInput`) contributes `s * B @ A` per targeted module (minus the initial adapter's term
for a base-changing init) and its `modules_to_save` weights. Tensors are read one at a time, so
the merge streams.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .files import missing_folder
from .models import engine_model_folder, open_safetensors
from .results import ADAPTER_CONFIG, MODEL_CONFIG, read_json

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emb>.+)\.(?P<ekind>lora_embedding_[AB])")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "milora")
# The files of a tokenizer: fetched with a Hub base, copied into the merged folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def model_folder(name: str | Path) -> Path:
    """A local model folder, a Hub id fetched (weights, config, tokenizer) into the cache, or a GGUF
    file (a path or `pkg:PACKAGE/FILE.gguf`) dequantized to float32 as training loads it, into a
    folder made once (`overmem.models.engine_model_folder`)."""
    path = Path(name).expanduser()
    if str(name).endswith(".gguf"):
        from .config import ModelConfig

        return Path(engine_model_folder(ModelConfig(name_or_path=str(name), dtype="float32")))
    if path.is_dir():
        return path
    if path.exists() or str(name).startswith((".", "/", "~")):
        raise missing_folder(name, "model folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES]))
    except Exception as e:  # offline, unknown repo, ...: say which base could not be found
        raise FileNotFoundError(f"{name}: not a local folder and not fetched from the Hub ({e})") from e


class SafetensorsFolder:
    """Read-only view of a folder's safetensors weights: `filename`, or shards listed in
    `filename.index.json`. Names and shapes come from handles kept open until `__exit__`;
    tensors are read one at a time (`get`)."""

    def __init__(self, folder: Path, filename: str):
        self.folder = folder
        single, index = folder / filename, folder / f"{filename}.index.json"
        if single.is_file():
            self._handles = {single: open_safetensors(single)}
            self.file_of = dict.fromkeys(self._handles[single].keys(), single)
        elif index.is_file():
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no \"weight_map\" object; not a safetensors index: restore or re-save it")
            self.file_of = {name: folder / f for name, f in weight_map.items()}
            self._handles = {}
        else:
            raise ValueError(f"{folder}: no {filename} or {index.name} (only safetensors weights can be merged)")
        self._layout: _Layout | None = None

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    @property
    def names(self) -> list[str]:
        """The names of the stored tensors."""
        return list(self.file_of)

    def _handle(self, name: str):
        path = self.file_of[name]
        if path not in self._handles:
            if not path.is_file():
                raise ValueError(f"{path}: shard listed in the index of {self.folder} is missing")
            self._handles[path] = open_safetensors(path)
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of stored tensor `name`, read without loading it."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor. Recent safetensors return views of a private memory map: pages
        read through it stay resident (and writes become anonymous copies) while the file is
        open, so keeping handles open would grow memory to all N models. A short-lived
        handle and a copy keep only this tensor in memory."""
        with open_safetensors(self.file_of[name]) as f:
            return f.get_tensor(name).clone()

    @property
    def layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _model_layout(self.folder)
        return self._layout

    def resolve(self, name: str) -> str | None:
        """The stored tensor holding `name` (itself, or its tie source), or None."""
        if name in self.file_of:
            return name
        source = self.layout.tied.get(name)
        return source if source in self.file_of else None


@dataclass(frozen=True)
class _Layout:
    """What the files alone do not say, from the model class built on the meta device."""

    tied: dict[str, str]  # tied weight -> its source, e.g. lm_head.weight -> model.embed_tokens.weight
    conv1d: frozenset[str] | None  # modules storing weights as (in, out); None: architecture unknown


def _model_layout(folder: Path) -> _Layout:
    if not (folder / MODEL_CONFIG).is_file():
        return _Layout({}, None)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except Exception:  # unknown architecture: no aliases, and LoRA layout from adapter_config.json
        return _Layout({}, None)
    conv1d = frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))
    return _Layout(dict(getattr(model, "all_tied_weights_keys", None) or {}), conv1d)


@dataclass
class FullInput:
    """A full checkpoint: delta = theta_i - theta_base for every tensor."""

    path: Path
    store: SafetensorsFolder
    is_adapter = False

    def check(self, base: SafetensorsFolder) -> None:
        """Every base tensor is here with the base's shape, and nothing else is."""
        for name in base.names:
            src = self.store.resolve(name)
            if src is None:
                raise ValueError(f"{self.path}: tensor {name} is missing (the base {base.folder} has it)")
            _check_shape(name, self.store.shape(src), self.path, base.shape(name), base.folder)
        for name in self.store.names:
            if name not in base.file_of and name not in base.layout.tied:
                raise ValueError(f"{self.path}: tensor {name} is not in the base {base.folder}; a different model?")

    def deltas(self, base: SafetensorsFolder) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Base tensor name -> function of the base tensor (compute dtype) giving the delta."""
        return {name: partial(self._delta, self.store.resolve(name)) for name in base.names}

    def _delta(self, stored: str, base_t: torch.Tensor) -> torch.Tensor:
        return self.store.get(stored).to(base_t.dtype).sub_(base_t)


@dataclass(frozen=True)
class _LoraTerm:
    """One `coef * B @ A` contribution to a module's weight (coef = LoRA scaling, negative for
    the initial adapter of a base-changing init); the merge weight is applied on top."""

    store: SafetensorsFolder
    a_key: str
    b_key: str
    coef: float
    transpose: bool  # Conv1D (fan_in_fan_out) and embedding weights are stored as (in, out)

    @property
    def rank(self) -> int:
        return self.store.shape(self.a_key)[0]

    @property
    def shape(self) -> tuple[int, ...]:
        out_dim, in_dim = self.store.shape(self.b_key)[0], self.store.shape(self.a_key)[1]
        return (in_dim, out_dim) if self.transpose else (out_dim, in_dim)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.store.get(self.a_key).to(dtype), self.store.get(self.b_key).to(dtype)  # (r, in), (out, r)
        d = (b @ a).mul_(self.coef)  # (out, in)
        return d.T if self.transpose else d


@dataclass
class AdapterInput:
    """A PEFT LoRA adapter: per module, a list of LoRA terms; plus full `modules_to_save` weights."""

    path: Path
    store: SafetensorsFolder
    config: dict
    modules: dict[str, list[_LoraTerm]]  # module name -> terms (the initial-adapter term included)
    full: dict[str, str]  # base tensor name -> adapter key holding its replacement
    is_adapter = True

    @property
    def plain(self) -> bool:
        """Only one LoRA term per module and no full weights (what the exact adapter needs)."""
        return not self.full and all(len(t) == 1 for t in self.modules.values())

    def check(self, base: SafetensorsFolder) -> None:
        """Every targeted module and full weight has a base tensor of the delta's shape."""
        for module, terms in self.modules.items():
            target = base.resolve(f"{module}.weight")
            if target is None:
                raise ValueError(f"{self.path}: LoRA module {module} has no weight {module}.weight "
                                 f"in the base {base.folder}; an adapter of a different base?")
            for term in terms:
                _check_shape(f"{module}.weight", term.shape, term.store.folder, base.shape(target), base.folder)
        for name, key in self.full.items():
            if base.resolve(name) is None:
                raise ValueError(f"{self.path}: tensor {key} has no counterpart {name} in the base {base.folder}")
            _check_shape(name, self.store.shape(key), self.path, base.shape(base.resolve(name)), base.folder)

    def deltas(self, base: SafetensorsFolder) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Base tensor name -> function of the base tensor (compute dtype) giving the delta.
        Names are resolved in the base, so a LoRA on a tied lm_head lands on the embedding."""
        terms: dict[str, list[_LoraTerm]] = defaultdict(list)
        for module, module_terms in self.modules.items():
            terms[base.resolve(f"{module}.weight")] += module_terms
        full = {base.resolve(name): key for name, key in self.full.items()}
        return {name: partial(self._delta, terms.get(name, []), full.get(name)) for name in {*terms, *full}}

    def _delta(self, terms: list[_LoraTerm], full_key: str | None, base_t: torch.Tensor) -> torch.Tensor:
        if full_key is None:
            d = torch.zeros_like(base_t)
        else:
            d = self.store.get(full_key).to(base_t.dtype).sub_(base_t)
        for term in terms:
            d.add_(term.delta(base_t.dtype))
        return d


def _check_shape(name: str, got: tuple, where: Path, expected: tuple, base: Path) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"tensor {name}: shape {list(got)} in {where} but {list(expected)} in the base {base}")


@contextmanager
def open_input(
    path: Path, base: SafetensorsFolder, init: SafetensorsFolder | None
) -> Iterator[FullInput | AdapterInput]:
    """Checkpoint folder `path` as a full checkpoint or a LoRA adapter, its weights open while
    the context lasts; `init` is the initial adapter of a base-changing init, or None."""
    if not path.is_dir():
        raise missing_folder(path, "checkpoint folder")
    if (path / ADAPTER_CONFIG).is_file():
        with SafetensorsFolder(path, "adapter_model.safetensors") as store:
            yield _adapter_input(path, store, base.layout, init)
    elif (path / MODEL_CONFIG).is_file():
        with SafetensorsFolder(path, "model.safetensors") as store:
            yield FullInput(path, store)
    else:
        raise ValueError(f"{path}: neither a model folder (config.json) nor a PEFT adapter (adapter_config.json)")


def _read_adapter_config(path: Path) -> dict:
    cfg = read_json(path / ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / ADAPTER_CONFIG}: expected a JSON object (an adapter config); restore the file")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} cannot be merged; only LoRA adapters")
    if "lora_alpha" not in cfg:
        raise ValueError(f"{path / ADAPTER_CONFIG}: no lora_alpha; restore the file that was saved with the adapter")
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ValueError(f"{path}: DoRA / lora_bias adapters are not a sum of B A deltas; merge_and_unload them first")
    return cfg


def _changes_base(cfg: dict) -> bool:
    init = cfg.get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS)


def _scaling(cfg: dict, module: str, r: int) -> float:
    """PEFT's scaling for `module`: alpha / r (alpha / sqrt(r) with rsLoRA), alpha_pattern first."""
    alpha = cfg["lora_alpha"]
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):  # PEFT's get_pattern_key
            alpha = value
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _lora_modules(
    path: Path, store: SafetensorsFolder, cfg: dict, layout: _Layout
) -> tuple[dict[str, _LoraTerm], dict[str, str]]:
    """Parse adapter tensor names: LoRA terms per module, and full weights (modules_to_save).
    Like PEFT, a delta is transposed for Conv1D layers whatever `fan_in_fan_out` says."""
    pairs: dict[str, dict[str, str]] = {}
    full = {}
    for key in store.names:
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{path}: tensor {key} is not a PEFT adapter tensor (expected prefix {_PEFT_PREFIX})")
        rest = key[len(_PEFT_PREFIX):]
        m = _LORA_KEY.fullmatch(rest)
        if m is None:  # modules_to_save, or embedding layers saved whole (`X.base_layer.weight`)
            full[rest.replace(".base_layer.", ".")] = key
            continue
        module = m["module"] or m["emb"]
        pairs.setdefault(module, {})[(m["kind"] or m["ekind"])[-1]] = key
    terms = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: LoRA module {module} has only lora_{''.join(ab)}; the adapter file is incomplete")
        if len(store.shape(ab["A"])) != 2:
            raise ValueError(f"{path}: LoRA module {module} is not a Linear or Embedding layer; cannot merge it")
        embedding = "lora_embedding" in ab["A"]
        r = store.shape(ab["A"])[0]
        conv1d = module in layout.conv1d if layout.conv1d is not None else bool(cfg.get("fan_in_fan_out"))
        terms[module] = _LoraTerm(store, ab["A"], ab["B"], _scaling(cfg, module, r), transpose=embedding or conv1d)
    return terms, full


def _adapter_input(
    path: Path, store: SafetensorsFolder, layout: _Layout, init: SafetensorsFolder | None
) -> AdapterInput:
    cfg = _read_adapter_config(path)
    terms, full = _lora_modules(path, store, cfg, layout)
    if init is None:
        if _changes_base(cfg):
            raise ValueError(
                f"{path}: init_lora_weights={cfg['init_lora_weights']!r} rewrote the base weights, so the delta is "
                "s (B A - B0 A0); pass initial_adapter= (the adapter saved before training)"
            )
        return AdapterInput(path, store, cfg, {m: [t] for m, t in terms.items()}, full)
    init_terms, _ = _lora_modules(init.folder, init, _read_adapter_config(init.folder), layout)
    modules = {}
    for module, term in terms.items():
        t0 = init_terms.get(module)
        if t0 is None:
            raise ValueError(f"{path}: LoRA module {module} is not in the initial adapter {init.folder}")
        if term.rank != t0.rank:
            raise ValueError(
                f"{path}: LoRA module {module} has rank {term.rank} but {t0.rank} in the initial adapter "
                f"{init.folder}; a checkpoint already converted to plain LoRA (B A - B0 A0) needs no initial_adapter"
            )
        modules[module] = [term, _LoraTerm(init, t0.a_key, t0.b_key, -t0.coef, t0.transpose)]
    return AdapterInput(path, store, cfg, modules, full)
