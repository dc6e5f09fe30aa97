"""The library entry points behind the CLI: run, scan, evaluate, finalize.

`run` reads like the table of contents of a finetuning study: prepare the splits, evaluate the
base model as epoch 0, finetune while evaluating every epoch checkpoint, then detect phases,
select a checkpoint, draw the figure and write the report. Every step skips work already on disk;
each stage's wall time goes to `timings.json`.
"""

from __future__ import annotations

import gc
import json
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig, dump_config
from .data.example import Example
from .dynamics import evaluate_checkpoint, evaluate_examples, split_summary
from .models import adapter_base, is_adapter, load_checkpoint, load_model, load_tokenizer
from .results import RunDir, atomic_write_text, write_json, write_jsonl

# Settings that change what a run computes; a resumed run must agree on all of them.
_RESUME_KEYS = ("model", "train", "data")


@dataclass
class Splits:
    """The training set and the tracked splits (name -> examples)."""

    train: list[Example]
    tracked: dict[str, list[Example]]


def prepare_splits(cfg: RunConfig) -> Splits:
    """Training data plus the paper's tracked splits (B.1): a monitored training subset
    `train`, a `validation` set from the unseen remainder of the training source (or an
    explicit spec), and each test set."""
    from .data.datasets import load_dataset_spec, make_monitor_splits, parse_spec, sample_examples

    d = cfg.data

    def load(text: str, **kw: Any) -> list[Example]:
        spec = parse_spec(text, seed=d.seed)
        field_map = d.field_map if spec.is_file else None  # a field map describes files only
        return load_dataset_spec(spec, data_dir=d.data_dir, field_map=field_map, **kw)

    spec = parse_spec(d.train)
    if d.validation is None:
        if spec.start not in (None, 0) or spec.stop is None:
            raise ConfigError(
                f"data.train {d.train!r}: to draw the validation set from the unseen remainder, "
                "give the training slice as name:split[:N]; or set data.validation"
            )
        source = load(str(spec.unsliced()))
        train, monitor, valid = make_monitor_splits(
            source, train_size=spec.stop, monitor_size=min(d.monitor_size, spec.stop),
            valid_size=d.validation_size, seed=d.seed,
        )
    else:
        train = load(d.train)
        monitor = sample_examples(train, min(d.monitor_size, len(train)), d.seed)
        valid = load(d.validation)
        valid = sample_examples(valid, min(d.validation_size, len(valid)), d.seed)
    tracked = {"train": monitor, "validation": valid}
    for name, test_spec in d.tests.items():
        test = load(test_spec)
        tracked[name] = sample_examples(test, min(d.test_size or len(test), len(test)), d.seed)
    if not train:
        raise ConfigError(f"data.train {d.train!r}: no examples")
    return Splits(train, tracked)


def _check_resumable(run: RunDir, cfg: RunConfig) -> None:
    import yaml

    if not run.config.exists():
        return
    old = yaml.safe_load(run.config.read_text()) or {}
    new = json.loads(cfg.model_dump_json())
    for key in _RESUME_KEYS:
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"{run.config}: the existing run was made with a different '{key}' section; "
                "use a new --out folder to start a new run"
            )


def _release_memory() -> None:
    """Return freed model memory (callers drop their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_libraries(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _eval_kwargs(cfg: RunConfig, tracked: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation settings; test splits keep per-token losses for the report's token view."""
    tests = [s for s in tracked if s not in ("train", cfg.selection.valid_split)]
    return dict(eval_cfg=cfg.eval, gen_cfg=cfg.generation, max_length=cfg.train.max_length, quiet=cfg.quiet,
                token_splits=tests)


def _record_environment(run_dir: RunDir) -> None:
    from .doctor import environment

    write_json(run_dir.root / "environment.json", environment())


def run(cfg: RunConfig) -> RunDir:
    """Finetune and track every checkpoint; resumes an existing run folder."""
    from .train.trainer import finetune

    _quiet_libraries(cfg.quiet)
    if not cfg.out_dir:
        raise ConfigError("out_dir: no output folder given (use --out or set out_dir)")
    run_dir = RunDir(cfg.out_dir)
    _check_resumable(run_dir, cfg)
    # Everything that can fail on bad input happens before the run folder is created.
    t0 = time.perf_counter()
    splits = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir.config, dump_config(cfg))
    _record_environment(run_dir)
    run_dir.record_timing("load data and model", time.perf_counter() - t0)
    ev = _eval_kwargs(cfg, splits.tracked)
    evaluate_checkpoint(model, tokenizer, splits.tracked, run_dir, checkpoint="epoch-0", epoch=0, step=0, **ev)

    if not all((run_dir.checkpoints / f"epoch-{e}").exists() for e in range(1, cfg.train.epochs + 1)):
        eval_seconds = 0.0

        # Evaluate each checkpoint while the trained model is still in memory.
        def track(name: str, m: Any, state: Any) -> None:
            nonlocal eval_seconds
            t = time.perf_counter()
            evaluate_checkpoint(
                m, tokenizer, splits.tracked, run_dir, checkpoint=name,
                epoch=round(state.epoch, 4), step=state.global_step, **ev,
            )
            eval_seconds += time.perf_counter() - t

        t0 = time.perf_counter()
        finetune(cfg, model, tokenizer, splits.train, run_dir, on_checkpoint=track)
        run_dir.record_timing("train", time.perf_counter() - t0 - eval_seconds,
                              "training and checkpoint saving, without the evaluations during it")
    del model
    _release_memory()
    if cfg.merge:
        with run_dir.timed("merge"):
            merge_groups(run_dir, cfg)
    scan_checkpoints(run_dir, cfg, splits.tracked, include_base=False)  # merges, and any a resume left
    finalize(run_dir, cfg)
    write_run_report(run_dir, cfg)
    return run_dir


def write_run_report(run_dir: RunDir, cfg: RunConfig) -> Path | None:
    """`RUN/report.html`; a failure warns (the run's results are on disk) instead of raising."""
    from .report import write_report

    try:
        with run_dir.timed("report"):
            return write_report([run_dir.root], quiet=cfg.quiet)
    except Exception as err:  # noqa: BLE001 - a report bug must not cost a finished run
        warnings.warn(f"report not written ({type(err).__name__}: {err}); retry with `overmem report {run_dir.root}`",
                      stacklevel=2)
        return None


def merge_groups(run_dir: RunDir, cfg: RunConfig) -> list[Path]:
    """Merge each `cfg.merge` group of epoch checkpoints into `checkpoints/merge(...)` (paper eq. 1,
    equal weights), so that the merged models are tracked like checkpoints."""
    from .merge import merge_checkpoints, merge_name

    outs = []
    for group in cfg.merge:
        paths = [run_dir.checkpoints / name for name in group]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ConfigError(f"merge: checkpoints not found: {', '.join(missing)}")
        out = run_dir.checkpoints / merge_name(paths)
        if not out.exists():
            merge_checkpoints(cfg.model.name_or_path, paths, out=out, progress=not cfg.quiet)
        outs.append(out)
    return outs


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    epoch: float | None
    step: int


def _ckpt_meta(path: Path) -> tuple[float | None, int]:
    meta = path / "overmem.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return m["epoch"], m["step"]
    state = path / "trainer_state.json"  # a Hugging Face Trainer checkpoint-STEP folder
    if state.exists():
        s = json.loads(state.read_text())
        return s.get("epoch"), s.get("global_step", 0)
    return None, 0


def find_checkpoints(folder: str | Path) -> list[Checkpoint]:
    """Checkpoints in an overmem run (`checkpoints/epoch-N`, `step-K`) or a Trainer output
    folder (`checkpoint-STEP`), ordered by step."""
    folder = Path(folder)
    root = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    found = []
    for p in root.iterdir():
        if not p.is_dir() or not re.fullmatch(r"(epoch|step|checkpoint)-\d+|merge\(.*\)", p.name):
            continue
        if not ((p / "config.json").exists() or is_adapter(p)):
            continue
        epoch, step = _ckpt_meta(p)
        if epoch is None and p.name.startswith("epoch-"):
            epoch = float(p.name.split("-")[1])
        found.append(Checkpoint(p.name, p, epoch, step))
    if not found:
        raise FileNotFoundError(f"{folder}: no checkpoints (epoch-N, step-K or checkpoint-STEP folders) found")
    return sorted(found, key=lambda c: (c.step, c.epoch or 0.0, c.name))


def scan_checkpoints(
    run_dir: RunDir, cfg: RunConfig, tracked: Mapping[str, Sequence[Example]], *, include_base: bool = True,
    folder: str | Path | None = None,
) -> None:
    """Evaluate every checkpoint (and the base as epoch 0) not yet in the dynamics."""
    ev = _eval_kwargs(cfg, tracked)
    done = run_dir.done()
    todo = [c for c in find_checkpoints(folder or run_dir.root)
            if any((c.name, s) not in done for s in tracked)] if (folder or run_dir.checkpoints.exists()) else []
    tokenizer = None
    if include_base and any(("epoch-0", s) not in done for s in tracked):
        tokenizer = load_tokenizer(cfg.model)
        base = load_model(cfg.model)
        evaluate_checkpoint(base, tokenizer, tracked, run_dir, checkpoint="epoch-0", epoch=0, step=0, **ev)
        del base
        _release_memory()
    for ckpt in tqdm(todo, desc="checkpoints", disable=cfg.quiet):
        model = load_checkpoint(ckpt.path, cfg.model)
        tok = tokenizer or load_tokenizer(cfg.model)
        evaluate_checkpoint(model, tok, tracked, run_dir, checkpoint=ckpt.name, epoch=ckpt.epoch, step=ckpt.step, **ev)
        del model
        _release_memory()


def scan(folder: str | Path, cfg: RunConfig) -> RunDir:
    """Track checkpoints that already exist (an overmem run or a Trainer output folder)."""
    _quiet_libraries(cfg.quiet)
    folder = Path(folder)
    adapters = [c for c in find_checkpoints(folder) if is_adapter(c.path)]
    if adapters and cfg.model.name_or_path == RunConfig().model.name_or_path:
        base = adapter_base(adapters[0].path)
        if base:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": base})})
    run_dir = RunDir(cfg.out_dir or folder)
    splits = prepare_splits(cfg)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    if not run_dir.config.exists():
        atomic_write_text(run_dir.config, dump_config(cfg))
    _record_environment(run_dir)
    with run_dir.timed("evaluate checkpoints", "loading included"):
        scan_checkpoints(run_dir, cfg, splits.tracked, folder=folder)
    finalize(run_dir, cfg)
    write_run_report(run_dir, cfg)
    return run_dir


def evaluate_model(
    cfg: RunConfig, data: str, out: str | Path, *, adapter: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """Evaluate one model (optionally with an adapter) on one dataset spec.

    Writes `out` (the split's figures, same fields as a dynamics row) and the per-example
    rows beside it (`<out stem>.samples.jsonl`).
    """
    from .data.datasets import load_dataset_spec, parse_spec

    _quiet_libraries(cfg.quiet)
    spec = parse_spec(data, seed=cfg.data.seed)
    examples = load_dataset_spec(spec, data_dir=cfg.data.data_dir, field_map=cfg.data.field_map if spec.is_file else None,
                                 sample=cfg.data.test_size, seed=cfg.data.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_checkpoint(adapter, cfg.model) if adapter else load_model(cfg.model)
    samples = evaluate_examples(model, tokenizer, examples, eval_cfg=cfg.eval, gen_cfg=cfg.generation,
                                max_length=cfg.train.max_length, desc=data, quiet=cfg.quiet)
    row = {"checkpoint": name or adapter or cfg.model.name_or_path, "epoch": None, "step": 0, "split": data}
    row.update(split_summary(samples, cfg.eval))
    out = Path(out)
    write_jsonl(out.with_name(out.stem + ".samples.jsonl"), samples)
    write_json(out, row)
    return row


def finalize(run_dir: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """Phases, checkpoint selection and the dynamics figure, from `dynamics.jsonl` alone."""
    from .phases import PhaseRule, detect_phases
    from .plotting import plot_dynamics
    from .selection import select_checkpoint, write_selection

    rows = run_dir.read_dynamics()
    splits = list(dict.fromkeys(r["split"] for r in rows))
    tests = [s for s in splits if s not in ("train", "validation")]
    phase_split = cfg.phases.split or (tests[0] if tests else splits[-1])
    rule = PhaseRule(eps=cfg.phases.eps, delta=cfg.phases.delta, learn_frac=cfg.phases.learn_frac)
    report = detect_phases(rows, split=phase_split, rule=rule)
    write_json(run_dir.root / "phases.json", report.to_dict())
    out: dict[str, Any] = {"phases": report}
    valid = [r for r in rows if r["split"] == cfg.selection.valid_split]
    if any(r.get("accuracy") is not None for r in valid):
        sel = select_checkpoint(rows, valid_split=cfg.selection.valid_split, test_splits=tests,
                                ppl_band=cfg.selection.ppl_band)
        write_selection(sel, run_dir.root / "selection.json")
        out["selection"] = sel
    out["figures"] = plot_dynamics(rows, run_dir.root, phase_report=report)
    return out


def iter_rows(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    yield from RunDir(run_dir).read_dynamics()
