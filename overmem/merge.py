"""Checkpoint merging (paper eq. 1): theta = theta_base + sum_i w_i (theta_i - theta_base).

The paper merges the epoch-3 and epoch-10 LoRA checkpoints with w_i = 1/2; any number of
checkpoints (two or more) and any weights are allowed here. Inputs, each relative to one base:

- full checkpoints: model folders with safetensors weights (one file or shards + index);
- LoRA adapters over the base: the delta of a targeted module is `s * B @ A` (transposed for
  Conv1D (`fan_in_fan_out`) and embedding layers), s = lora_alpha / r, or lora_alpha / sqrt(r) with
  rsLoRA, `alpha_pattern` honoured; `modules_to_save` weights count as full weights.
- adapters whose initialisation rewrote the base (PiSSA, MiLoRA, ...): the finetuned layer is
  `W - s B0 A0 + s B A`, so their delta is `s (B A - B0 A0)` and needs the initial adapter
  (B0, A0), passed as `initial_adapter`. Such adapters are recognised by `init_lora_weights`
  ("pissa...", "olora", "corda", or our marker "milora") in adapter_config.json. overmem's
  trainer does not produce them: it saves PiSSA/MiLoRA checkpoints already converted by PEFT
  (`path_initial_model_for_weight_conversion`) into plain rank-2r LoRA over the original base,
  and keeps the initial adapter in `checkpoints/adapter-init` (see train/methods.py).

The output is a dense Hugging Face model folder. The dense merge streams: one tensor of each
input at a time, output written shard by shard, so peak memory is one output shard plus a few
tensors, not N models. Tensors are combined in float32 (float64 stays float64) and stored in the
base tensor's dtype. With `exact_adapter=True` and only plain LoRA inputs, an adapter that is
exactly the merge is written too, by rank concatenation. PEFT's `add_weighted_adapter` with
combination_type="linear" is not used: it mixes cross terms B_i A_j (REFERENCE.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

DEFAULT_SHARD_BYTES = 2 * 2**30
ADAPTER_SUBDIR = "adapter"  # where the exact merged adapter goes inside the output folder
MERGE_INFO = "merge.json"

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emb>.+)\.(?P<ekind>lora_embedding_[AB])")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "milora")
# config.json fields that must agree between checkpoints of one base model.
_ARCH_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
_VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


def merge_name(checkpoints: Sequence[str | Path], weights: Sequence[float] | None = None) -> str:
    """Name of a merged model, e.g. `merge(epoch-3,epoch-10)`; non-uniform weights are
    appended as `merge(epoch-3:0.25,epoch-10:0.75)`."""
    names = [Path(c).name for c in checkpoints]
    if weights is not None and len(set(weights)) > 1:
        names = [f"{n}:{w:g}" for n, w in zip(names, weights, strict=True)]
    return f"merge({','.join(names)})"


def merge_checkpoints(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    exact_adapter: bool = False,
    initial_adapter: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge `checkpoints` of one base model into a dense model folder at `out`.

    `weights` default to 1/N each. `initial_adapter` is the adapter saved before training by a
    base-changing init (PiSSA/MiLoRA); it is subtracted from every adapter checkpoint. With
    `exact_adapter`, `out/adapter` also holds a PEFT adapter equal to the merge (plain LoRA
    inputs only). Everything is checked before anything is written; the folder is built next
    to `out` and renamed at the end, so a failure leaves nothing at `out`. Returns `out`.
    """
    out = Path(out)
    weights = _check_weights(checkpoints, weights)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    base_dir = _model_folder(base)
    with ExitStack() as stack:
        base_w = stack.enter_context(_Safetensors(base_dir, "model.safetensors"))
        init = stack.enter_context(_Safetensors(Path(initial_adapter), "adapter_model.safetensors")) \
            if initial_adapter is not None else None
        inputs = [stack.enter_context(_open_input(Path(c), base_w, init)) for c in checkpoints]
        _check_same_base(base_dir, inputs, init)
        for inp in inputs:
            inp.check(base_w)
        if exact_adapter:
            _check_exact(inputs)
        with _atomic_folder(out, overwrite) as tmp:
            _write_dense(tmp, base_w, inputs, weights, max_shard_bytes, progress)
            _copy_model_files(tmp, base_dir, [Path(c) for c in checkpoints])
            if exact_adapter:
                _write_exact_adapter(tmp / ADAPTER_SUBDIR, inputs, weights, base_dir)
            info = {"name": merge_name(checkpoints, weights), "base": str(base), "weights": weights,
                    "checkpoints": [str(c) for c in checkpoints], "exact_adapter": exact_adapter,
                    "initial_adapter": str(initial_adapter) if initial_adapter is not None else None}
            (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- inputs and checks


def _check_weights(checkpoints: Sequence[str | Path], weights: Sequence[float] | None) -> list[float]:
    if isinstance(checkpoints, (str, Path)) or len(checkpoints) < 2:
        n = 1 if isinstance(checkpoints, (str, Path)) else len(checkpoints)
        raise ValueError(f"merging needs at least two checkpoints, got {n}")
    if weights is None:
        return [1.0 / len(checkpoints)] * len(checkpoints)
    if len(weights) != len(checkpoints):
        raise ValueError(f"{len(weights)} weights for {len(checkpoints)} checkpoints; give one weight per checkpoint")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    return [float(w) for w in weights]


def _model_folder(name: str | Path) -> Path:
    """A local model folder, or a Hub id fetched (weights, config, tokenizer) into the cache."""
    path = Path(name).expanduser()
    if str(name).endswith(".gguf"):
        raise ValueError(f"{name}: a GGUF base cannot be merged; load it and save_pretrained it to a folder first")
    if path.is_dir():
        return path
    if path.exists() or str(name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: model folder not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", *_TOKENIZER_FILES]))
    except Exception as e:  # offline, unknown repo, ...: say which base could not be found
        raise FileNotFoundError(f"{name}: not a local folder and not fetched from the Hub ({e})") from e


class _Safetensors:
    """Read-only view of a folder's safetensors weights: `filename`, or shards listed in
    `filename.index.json`. Names and shapes come from handles kept open until `__exit__`;
    tensors are read one at a time (`get`)."""

    def __init__(self, folder: Path, filename: str):
        self.folder = folder
        single, index = folder / filename, folder / f"{filename}.index.json"
        if single.is_file():
            self._handles = {single: safe_open(str(single), "pt")}
            self.file_of = dict.fromkeys(self._handles[single].keys(), single)
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: folder / f for name, f in weight_map.items()}
            self._handles = {}
        else:
            raise ValueError(f"{folder}: no {filename} or {index.name} (only safetensors weights can be merged)")
        self._layout: _Layout | None = None

    def __enter__(self) -> _Safetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def _handle(self, name: str):
        path = self.file_of[name]
        if path not in self._handles:
            if not path.is_file():
                raise ValueError(f"{path}: shard listed in the index of {self.folder} is missing")
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor. Recent safetensors return views of a private memory map: pages
        read through it stay resident (and writes become anonymous copies) while the file is
        open, so keeping handles open would grow memory to all N models. A short-lived
        handle and a copy keep only this tensor in memory."""
        with safe_open(str(self.file_of[name]), "pt") as f:
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
    if not (folder / "config.json").is_file():
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
class _FullInput:
    """A full checkpoint: delta = theta_i - theta_base for every tensor."""

    path: Path
    store: _Safetensors
    is_adapter = False

    def check(self, base: _Safetensors) -> None:
        for name in base.names:
            src = self.store.resolve(name)
            if src is None:
                raise ValueError(f"{self.path}: tensor {name} is missing (the base {base.folder} has it)")
            _check_shape(name, self.store.shape(src), self.path, base.shape(name), base.folder)
        for name in self.store.names:
            if name not in base.file_of and name not in base.layout.tied:
                raise ValueError(f"{self.path}: tensor {name} is not in the base {base.folder}; a different model?")

    def deltas(self, base: _Safetensors) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Base tensor name -> function of the base tensor (compute dtype) giving the delta."""
        return {name: partial(self._delta, self.store.resolve(name)) for name in base.names}

    def _delta(self, stored: str, base_t: torch.Tensor) -> torch.Tensor:
        return self.store.get(stored).to(base_t.dtype).sub_(base_t)


@dataclass(frozen=True)
class _LoraTerm:
    """One `coef * B @ A` contribution to a module's weight (coef = LoRA scaling, negative for
    the initial adapter of a base-changing init); the merge weight is applied on top."""

    store: _Safetensors
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
class _AdapterInput:
    """A PEFT LoRA adapter: per module, a list of LoRA terms; plus full `modules_to_save` weights."""

    path: Path
    store: _Safetensors
    config: dict
    modules: dict[str, list[_LoraTerm]]  # module name -> terms (the initial-adapter term included)
    full: dict[str, str]  # base tensor name -> adapter key holding its replacement
    is_adapter = True

    @property
    def plain(self) -> bool:
        return not self.full and all(len(t) == 1 for t in self.modules.values())

    def check(self, base: _Safetensors) -> None:
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

    def deltas(self, base: _Safetensors) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
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
def _open_input(path: Path, base: _Safetensors, init: _Safetensors | None) -> Iterator[_FullInput | _AdapterInput]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    if (path / "adapter_config.json").is_file():
        with _Safetensors(path, "adapter_model.safetensors") as store:
            yield _adapter_input(path, store, base.layout, init)
    elif (path / "config.json").is_file():
        with _Safetensors(path, "model.safetensors") as store:
            yield _FullInput(path, store)
    else:
        raise ValueError(f"{path}: neither a model folder (config.json) nor a PEFT adapter (adapter_config.json)")


def _read_adapter_config(path: Path) -> dict:
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} cannot be merged; only LoRA adapters")
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
    path: Path, store: _Safetensors, cfg: dict, layout: _Layout
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


def _adapter_input(path: Path, store: _Safetensors, layout: _Layout, init: _Safetensors | None) -> _AdapterInput:
    cfg = _read_adapter_config(path)
    terms, full = _lora_modules(path, store, cfg, layout)
    if init is None:
        if _changes_base(cfg):
            raise ValueError(
                f"{path}: init_lora_weights={cfg['init_lora_weights']!r} rewrote the base weights, so the delta is "
                "s (B A - B0 A0); pass initial_adapter= (the adapter saved before training)"
            )
        return _AdapterInput(path, store, cfg, {m: [t] for m, t in terms.items()}, full)
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
    return _AdapterInput(path, store, cfg, modules, full)


def _arch(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return {k: cfg[k] for k in _ARCH_KEYS if k in cfg}


def _tokenizer_fingerprint(folder: Path) -> str | None:
    """Hash of the vocabulary (tokenizer.json's model and added tokens, or the vocab files);
    padding/truncation settings and tokenizer_config.json do not count."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        d = json.loads(tj.read_text())
        added = sorted((t["id"], t["content"]) for t in d.get("added_tokens") or [])
        blob = json.dumps({"model": d.get("model"), "added": added}, sort_keys=True).encode()
    else:
        files = [folder / f for f in _VOCAB_FILES if (folder / f).is_file()]
        if not files:
            return None
        blob = b"".join(f.name.encode() + f.read_bytes() for f in files)
    return hashlib.sha256(blob).hexdigest()


def _check_same_base(base: Path, inputs: list, init: _Safetensors | None) -> None:
    """Different base models: architecture fields, recorded adapter bases, tokenizers."""
    base_arch = _arch(base) if (base / "config.json").is_file() else None
    if base_arch is None:
        raise ValueError(f"{base}: the base has no config.json; give the base model folder")
    paths = [inp.path for inp in inputs]
    for inp in inputs:
        if inp.is_adapter:
            continue
        path, arch = inp.path, _arch(inp.path)
        for key in sorted(set(arch) | set(base_arch)):
            if arch.get(key) != base_arch.get(key):
                raise ValueError(f"{path}/config.json: {key}={arch.get(key)!r} but {base_arch.get(key)!r} in the "
                                 f"base {base}/config.json; checkpoints of a different base model?")
    recorded = {}
    for path in paths + ([init.folder] if init is not None else []):
        if (path / "adapter_config.json").is_file():
            name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if name is not None:
                recorded[path] = name
    if len(set(recorded.values())) > 1:
        listing = ", ".join(f"{p} -> {n}" for p, n in recorded.items())
        raise ValueError(f"adapters of different base models: {listing}")
    prints = {p: fp for p in [base, *paths] if (fp := _tokenizer_fingerprint(p)) is not None}
    if len(set(prints.values())) > 1:
        first = next(iter(prints))
        other = next(p for p, fp in prints.items() if fp != prints[first])
        raise ValueError(f"{other}: tokenizer differs from the one in {first}; merge checkpoints of one base model")


def _check_exact(inputs: list) -> None:
    """The exact adapter needs plain LoRA adapters on the same modules."""
    for inp in inputs:
        if not inp.is_adapter or not inp.plain:
            what = "a full checkpoint" if not inp.is_adapter else "an adapter with modules_to_save or an initial adapter"
            raise ValueError(f"{inp.path}: exact_adapter needs plain LoRA adapters, this is {what}; "
                             "use the dense merge (exact_adapter=False)")
    first = inputs[0]
    for inp in inputs[1:]:
        if set(inp.modules) != set(first.modules):
            diff = sorted(set(inp.modules) ^ set(first.modules))[:3]
            raise ValueError(f"{inp.path}: LoRA modules differ from {first.path} (e.g. {diff}); exact_adapter needs "
                             "the same target modules")


# ---------------------------------------------------------------- writing


@contextmanager
def _atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` on success and removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists() and overwrite:
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _ShardWriter:
    """Collects output tensors and saves a shard whenever the next one would pass `max_bytes`;
    `finish` names them like save_pretrained (model.safetensors, or shards + index)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f".shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-0.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i}.safetensors").rename(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_dense(
    folder: Path, base: _Safetensors, inputs: list, weights: list[float], max_shard_bytes: int, progress: bool
) -> None:
    """Stream over the base tensors: merged = base + sum_i w_i delta_i, one tensor at a time."""
    deltas = [inp.deltas(base) for inp in inputs]
    writer = _ShardWriter(folder, max_shard_bytes)
    for name in tqdm(base.names, desc="merge", unit="tensor", disable=not progress):
        stored = base.get(name)
        if not any(name in d for d in deltas):
            writer.add(name, stored)  # untouched by every input (e.g. norms under LoRA)
            continue
        base_t = stored.to(torch.promote_types(stored.dtype, torch.float32))
        merged = base_t.clone()
        for d, w in zip(deltas, weights):
            if name in d:
                merged.add_(d[name](base_t), alpha=w)
        writer.add(name, merged.to(stored.dtype))
    writer.finish()


def _copy_model_files(folder: Path, base: Path, checkpoints: list[Path]) -> None:
    """config.json and generation_config.json from the base; tokenizer files from the first
    checkpoint that has them (what training used, e.g. its pad token), else the base."""
    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)
    source = next((p for p in [*checkpoints, base] if any((p / f).is_file() for f in _TOKENIZER_FILES)), None)
    if source is not None:
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)


def _write_exact_adapter(folder: Path, adapters: list[_AdapterInput], weights: list[float], base: Path) -> None:
    """Rank concatenation: A_cat = [A_1; ...; A_N] (rows), B_cat = [c_1 B_1, ..., c_N B_N]
    (columns) with c_i = w_i s_i, and scaling 1 (lora_alpha = r_cat), so that
    B_cat A_cat = sum_i w_i s_i B_i A_i exactly."""
    folder.mkdir()
    tensors, ranks = {}, {}
    for module in adapters[0].modules:
        terms = [(ad.modules[module][0], w) for ad, w in zip(adapters, weights)]
        a_list = [t.store.get(t.a_key) for t, _ in terms]
        a_cat = torch.cat([a.float() for a in a_list], dim=0)  # (r_cat, in)
        b_cat = torch.cat([t.store.get(t.b_key).float() * (w * t.coef) for t, w in terms], dim=1)  # (out, r_cat)
        first = terms[0][0]
        tensors[first.a_key], tensors[first.b_key] = a_cat.to(a_list[0].dtype), b_cat.to(a_list[0].dtype)
        ranks[module] = a_cat.shape[0]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: rm for m, rm in ranks.items() if rm != r}
    cfg = dict(adapters[0].config)
    cfg.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
               init_lora_weights=True, inference_mode=True)
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
