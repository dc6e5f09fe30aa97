"""Writing the result of a checkpoint merge (`overmem.merge`): the dense model folder, built
next to its destination and renamed into place, its weights saved shard by shard as they are
merged, and the exact merged adapter by rank concatenation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .merge_inputs import TOKENIZER_FILES, AdapterInput, SafetensorsFolder
from .results import ADAPTER_CONFIG, MODEL_CONFIG


# Temporary folders beside the output: `.NAME.tmp-HOST-PID-X` (the merge being written) and
# `.NAME.old-HOST-PID-X` (the folder it replaces, until the new one is in place).
_TEMP_FOLDER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` on success and removed on failure. The
    temporary folders a killed merge left in the same parent are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out.parent)
    prefix = f".{out.name}.{{}}-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix.format("tmp")))
    try:
        yield tmp
        if out.exists() and overwrite:
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix.format("old")))
            out.rename(old / out.name)
            try:
                tmp.rename(out)
            except BaseException:
                (old / out.name).rename(out)  # the previous folder stays what `out` is
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_folders(parent: Path) -> None:
    """Remove the temporary folders of merges into `parent` whose process is gone (killed). A
    merge killed while replacing its output leaves the previous folder in its `old` folder: it
    goes back in place when nothing has taken that place since."""
    host = socket.gethostname()
    for path in parent.iterdir():
        m = _TEMP_FOLDER.fullmatch(path.name)
        if m is None or m["host"] != host or not path.is_dir() or _running(int(m["pid"])):
            continue
        kept, place = path / m["name"], parent / m["name"]
        if m["kind"] == "old" and kept.is_dir() and not place.exists():
            kept.rename(place)
        shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether another process with id `pid` runs (this process merges one folder at a time)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`save_file`, its failures to write (a full disk, an I/O error) raised as the `OSError` they are,
    which the command line reports in one line (safetensors wraps them in its own error type)."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


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
        save_tensors(self.pending, self.folder / f".shard-{len(self.shards)}.safetensors")
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


def write_dense(
    folder: Path, base: SafetensorsFolder, inputs: list, weights: list[float], max_shard_bytes: int, progress: bool
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


def copy_model_files(folder: Path, base: Path, checkpoints: list[Path]) -> None:
    """config.json and generation_config.json from the base; tokenizer files from the first
    checkpoint that has them (what training used, e.g. its pad token), else the base."""
    for name in (MODEL_CONFIG, "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)
    source = next((p for p in [*checkpoints, base] if any((p / f).is_file() for f in TOKENIZER_FILES)), None)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)


def write_exact_adapter(folder: Path, adapters: list[AdapterInput], weights: list[float], base: Path) -> None:
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
    save_tensors(tensors, folder / "adapter_model.safetensors")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: rm for m, rm in ranks.items() if rm != r}
    cfg = dict(adapters[0].config)
    cfg.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
               init_lora_weights=True, inference_mode=True)
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = str(base)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
