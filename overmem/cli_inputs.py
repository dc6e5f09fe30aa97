"""What the command line checks before any work: numbers and paths on the command line, run
settings that would otherwise fail (or silently do nothing) only after training, result files read
back, whether a folder's earlier results were made with the same data and model, and that no
output overwrites one of the command's own inputs.

Each check raises `ConfigError` (exit 2) or argparse's own error, with one line naming the option,
field or file and what to do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import ConfigError, ModelConfig, RunConfig, load_config
from .results import ADAPTER_CONFIG, SAMPLES_DIR, RunDir, epoch_name, read_json, step_name


def count(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least` and at most `most` (argparse names the
    flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
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


# ---- inputs never overwritten by outputs -------------------------------------------------------


def data_file(spec: str) -> Path | None:
    """The local file a data spec reads (`d.jsonl[:50]` -> d.jsonl), None for a dataset name or a
    spec that does not parse (loading it gives that error)."""
    from .data.specs import parse_spec

    try:
        parsed = parse_spec(spec)
    except ValueError:
        return None
    return Path(parsed.name_or_path) if parsed.is_file else None


def check_outputs_spare_inputs(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Neither --out nor the per-example rows written beside it (`<stem>.samples.jsonl`) is one of
    the command's input files, or an existing file in one of its input folders (a model, an adapter).
    `inputs` are (option, path) pairs; a path that is None or not on this machine (a hub id) is skipped."""
    out = Path(out)
    samples = out.with_name(out.stem + ".samples.jsonl")
    written = [("", out), (f"its per-example rows would go to {samples}, ", samples)]
    for option, given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given)
        for how, target in written:
            if not target.is_file():
                continue  # a new file overwrites nothing (an output that is a folder is refused elsewhere)
            if source.is_dir() and target.resolve().is_relative_to(source.resolve()):
                raise ConfigError(f"--out {out}: {how}{'a' if how else 'is a'} file of {option} {given}; "
                                  "give another path")
            if source.is_file() and os.path.samefile(target, source):
                raise ConfigError(f"--out {out}: {how or 'is '}the {option} file; give another path")


def check_adapter_folder(adapter: str | Path | None) -> None:
    """`--adapter` is a PEFT adapter folder: a full model there would be evaluated instead of --model."""
    from .models import is_adapter

    if adapter is not None and Path(adapter).exists() and not is_adapter(adapter):
        raise ConfigError(f"--adapter {adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); a full model is "
                          "evaluated as --model")


def check_merge_out(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """`merge --out` (a folder replaced whole with --overwrite) neither is nor holds one of its inputs."""
    target = Path(out).resolve()
    for option, given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if source == target or source.is_relative_to(target):
            raise ConfigError(f"--out {out}: {'is' if source == target else 'holds'} {option} {given}; "
                              "write the merge elsewhere")


def check_report_out(out: str | Path, runs: Iterable[str | Path]) -> None:
    """`report --out` is none of the files of a run that the report reads (a new HTML page beside them is)."""
    target = Path(out).resolve()
    for root in runs:
        run = RunDir(root)
        files = [run.config, run.dynamics, run.phases, run.selection, run.keep, run.timings, run.environment,
                 run.figure.with_suffix(".png"), run.figure.with_suffix(".svg")]
        folders = [run.checkpoints, run.trainer_state, run.root / SAMPLES_DIR, run.analysis_dir]
        if any(target == f.resolve() for f in files) or any(target.is_relative_to(f.resolve()) for f in folders):
            raise ConfigError(f"--out {out}: is a result file of the run {root} that the report reads; give another "
                              f"path, e.g. {run.report}")
