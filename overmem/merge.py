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
combination_type="linear" is not used: it concatenates sqrt(w_i)-scaled A and B factors, so
its merged delta (sum_i sqrt(w_i) B_i)(sum_j sqrt(w_j) A_j) carries cross terms B_i A_j and is not
the weighted sum of the deltas.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .merge_inputs import SafetensorsFolder, model_folder, open_input
from .merge_writing import atomic_folder, copy_model_files, write_dense, write_exact_adapter
from .models import check_adapter_base
from .results import MODEL_CONFIG, read_json

DEFAULT_SHARD_BYTES = 2 * 2**30
ADAPTER_SUBDIR = "adapter"  # where the exact merged adapter goes inside the output folder
MERGE_INFO = "merge.json"
# Largest |weight|: merges interpolate or extrapolate a little (weights near 0..1); a larger one is a
# typo, and past float32's range (3.4e38) the sum no longer fits the tensors at all.
MAX_WEIGHT = 100.0

# config.json fields that must agree between checkpoints of one base model.
_ARCH_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
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
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Merge `checkpoints` of one base model into a dense model folder at `out`.

    `weights` default to 1/N each. `initial_adapter` is the adapter saved before training by a
    base-changing init (PiSSA/MiLoRA); it is subtracted from every adapter checkpoint. With
    `exact_adapter`, `out/adapter` also holds a PEFT adapter equal to the merge (plain LoRA
    inputs only). Everything is checked before anything is written; the folder is built next
    to `out` and renamed at the end, so a failure leaves nothing at `out`. `overwrite` replaces
    an earlier merge at `out` (a folder with merge.json), nothing else. Each adapter's recorded base
    must be `base` (`models.check_adapter_base`); `force` skips that check. Returns `out`.
    """
    out = Path(out)
    weights = _check_weights(checkpoints, weights)
    _check_out(out, overwrite)
    base_dir = model_folder(base)
    with ExitStack() as stack:
        base_w = stack.enter_context(SafetensorsFolder(base_dir, "model.safetensors"))
        init = stack.enter_context(SafetensorsFolder(Path(initial_adapter), "adapter_model.safetensors")) \
            if initial_adapter is not None else None
        inputs = [stack.enter_context(open_input(Path(c), base_w, init)) for c in checkpoints]
        _check_same_base(base_dir, inputs)
        for inp in inputs:
            inp.check(base_w)
        if not force:
            for folder in [inp.path for inp in inputs if inp.is_adapter] + ([init.folder] if init else []):
                check_adapter_base(folder, base, uncomparable_ok=False, base_dir=base_dir, role="the merge's base",
                                   fix="merge onto the base the adapter was trained on, or pass --force if they "
                                       "are the same model")
        if exact_adapter:
            _check_exact(inputs)
        with _naming_out(out), atomic_folder(out, overwrite) as tmp:
            write_dense(tmp, base_w, inputs, weights, max_shard_bytes, progress)
            copy_model_files(tmp, base_dir, [Path(c) for c in checkpoints])
            if exact_adapter:
                write_exact_adapter(tmp / ADAPTER_SUBDIR, inputs, weights, base_dir)
            info = {"name": merge_name(checkpoints, weights), "base": str(base), "weights": weights,
                    "checkpoints": [str(c) for c in checkpoints], "exact_adapter": exact_adapter,
                    "initial_adapter": str(initial_adapter) if initial_adapter is not None else None}
            if force:
                info["forced"] = True  # the adapters' recorded base was not checked
            (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- checks


@contextmanager
def _naming_out(out: Path) -> Iterator[None]:
    """A failed write in the temporary folder (a full disk) reported as a failure to write `out`."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise type(err)(err.errno, err.strerror, str(out)) from None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists (pass --overwrite / overwrite=True to replace it)",
                              str(out))
    if out.exists() and not (out / MERGE_INFO).is_file():
        raise ValueError(f"{out}: exists and is not a merged model folder (no {MERGE_INFO}); "
                         "it is not replaced: choose another output folder")


def _check_weights(checkpoints: Sequence[str | Path], weights: Sequence[float] | None) -> list[float]:
    if isinstance(checkpoints, (str, Path)) or len(checkpoints) < 2:
        n = 1 if isinstance(checkpoints, (str, Path)) else len(checkpoints)
        raise ValueError(f"merging needs at least two checkpoints, got {n}")
    seen = [Path(c).resolve() for c in checkpoints]
    twice = next((c for c, r in zip(checkpoints, seen) if seen.count(r) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice}: listed twice; give each checkpoint once (--weights sets how much each counts)")
    if weights is None:
        return [1.0 / len(checkpoints)] * len(checkpoints)
    if len(weights) != len(checkpoints):
        raise ValueError(f"{len(weights)} weights for {len(checkpoints)} checkpoints; give one weight per checkpoint")
    if not all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in weights):
        raise ValueError(f"weights must be finite numbers between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g} (e.g. 0.5 0.5), "
                         f"got {' '.join(f'{w:g}' for w in weights)}")
    return [float(w) for w in weights]


def _arch(folder: Path) -> dict:
    cfg = read_json(folder / MODEL_CONFIG)
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / MODEL_CONFIG}: expected a JSON object (a model config); restore the file")
    return {k: cfg[k] for k in _ARCH_KEYS if k in cfg}


def _tokenizer_fingerprint(folder: Path) -> str | None:
    """Hash of the vocabulary (tokenizer.json's model and added tokens, or the vocab files);
    padding/truncation settings and tokenizer_config.json do not count."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        d = read_json(tj)
        if not isinstance(d, dict):
            raise ValueError(f"{tj}: expected a JSON object (a tokenizer); restore the file")
        added = sorted((t["id"], t["content"]) for t in d.get("added_tokens") or [])
        blob = json.dumps({"model": d.get("model"), "added": added}, sort_keys=True).encode()
    else:
        files = [folder / f for f in _VOCAB_FILES if (folder / f).is_file()]
        if not files:
            return None
        blob = b"".join(f.name.encode() + f.read_bytes() for f in files)
    return hashlib.sha256(blob).hexdigest()


def _check_same_base(base: Path, inputs: list) -> None:
    """Different base models: architecture fields of full checkpoints, tokenizers."""
    base_arch = _arch(base) if (base / MODEL_CONFIG).is_file() else None
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
