"""What the command line checks before any work: numbers and paths on the command line, run
settings that would otherwise fail (or silently do nothing) only after training, result files read
back, and whether a folder's earlier results were made with the same data and model.

Each check raises `ConfigError` (exit 2) or argparse's own error, with one line naming the option,
field or file and what to do.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import ConfigError, ModelConfig, RunConfig, load_config
from .results import epoch_name, read_json, step_name


def count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def band(text: str) -> float:
    """An argparse type: a finite number >= 0 (a relative perplexity band)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def quoted(value: str | Path) -> str:
    """A path as an override value: quoted, so that YAML keeps `2024`, `yes` or `a: b` as text."""
    return json.dumps(str(value))


def check_output_folder(path: str | Path | None) -> None:
    """Refuse an --out folder path that names a file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--out {path}: is a file; give a folder (a new one, or a run to resume)")


def check_output_file(path: str | Path, example: str) -> None:
    """Refuse an --out file path that names a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file path, e.g. {path / example}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is a file, not a folder; give another path")


def check_tracked_splits(cfg: RunConfig) -> None:
    """`phases.split` and `selection.valid_split` name splits the run tracks: found out only after
    training, a wrong name costs the run its phases, or (silently) its selection.json."""
    from .data.splits import TRAIN, VALIDATION

    tracked = [TRAIN, VALIDATION, *cfg.data.tests]
    for field, name in (("phases.split", cfg.phases.split), ("selection.valid_split", cfg.selection.valid_split)):
        if name is not None and name not in tracked:
            raise ConfigError(f"{field}: {name!r} is not a tracked split; choose one of {', '.join(tracked)}")


def check_merge_groups(cfg: RunConfig) -> None:
    """Every `merge` name is a checkpoint the run saves (else the merge fails after training)."""
    every = cfg.train.save_every_steps
    epochs = {epoch_name(e) for e in range(1, cfg.train.epochs + 1)}
    for group in cfg.merge:
        for name in group:
            number = name.rpartition("-")[2]
            step = int(number) if number.isdigit() and name == step_name(int(number)) else None
            if name not in epochs and not (every and step and step % every == 0):
                extra = f", or step-K for K a multiple of {every}" if every else ""
                raise ConfigError(f"merge: {name!r} in {group} is not a checkpoint this run saves "
                                  f"(epoch-1 .. epoch-{cfg.train.epochs}{extra})")
        if len(set(group)) < len(group):
            raise ConfigError(f"merge: {group} names a checkpoint twice")


def check_same_results(saved: Path, cfg: RunConfig) -> None:
    """New rows may join the results of a folder (its config `saved`) only when they describe the
    same data and model; the default model stands for the base that adapters recorded."""
    old = load_config(saved)
    keys = ["data", "model"] if cfg.model.name_or_path != ModelConfig().name_or_path else ["data"]
    for key in keys:
        new_section, old_section = (getattr(c, key).model_dump(exclude={"data_dir"}) for c in (cfg, old))
        diff = next((f for f in new_section if new_section[f] != old_section.get(f)), None)
        if diff is not None:
            raise ConfigError(f"{saved}: the results in {saved.parent} were made with {key}.{diff}="
                              f"{old_section.get(diff)!r}, not {new_section[diff]!r}; write to a new --out folder, "
                              "or use that folder's own settings (no --config)")


def stored_result(path: Path, model: type[BaseModel]) -> dict[str, Any] | None:
    """A result file a command would write again (`selection.json`, `phases.json`), or None when it
    is missing or unreadable (truncated, edited): then it is computed afresh, with a note."""
    if not path.exists():
        return None
    try:
        stored = read_json(path)
        model.model_validate(stored)
    except ValueError as err:  # not JSON, or not what overmem writes there
        print(f"note: {path} is unreadable ({str(err).splitlines()[0]}); computing it afresh", file=sys.stderr)
        return None
    return stored


def check_checkpoint_bases(checkpoints: list, base: str) -> None:
    """Adapter checkpoints trained on a base with other weights than `base` are refused before any
    work (loading one refuses it too, but only after the earlier checkpoints' results are written)."""
    from .models import check_adapter_base, is_adapter

    for ckpt in checkpoints:
        if ckpt.path is not None and is_adapter(ckpt.path):
            check_adapter_base(ckpt.path, base, uncomparable_ok=True,
                               fix="set model.name_or_path to the base the checkpoints were trained on")
