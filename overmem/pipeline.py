"""The library entry points behind the CLI: run, scan, evaluate, finalize.

`run` reads like the table of contents of a finetuning study: prepare the splits, evaluate the
base model as epoch 0, finetune while evaluating every epoch checkpoint, then detect phases,
select a checkpoint, draw the figure and write the report. Every step skips work already on disk;
each stage's wall time goes to `timings.json`.

Under `torchrun` / `accelerate launch` every process runs these same functions: all of them load
the model, train together and evaluate their share of each split; rank 0 alone creates and writes
the run folder, the others wait for it (`overmem.distributed`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .backends import choose_backend, load_for_eval
from .config import ConfigError, RunConfig, dump_config, read_yaml
from .data.code import ensure_sandbox
from .data.example import Example
from .data.splits import derive_splits, load_spec
from .distributed import evaluate_sharded, is_main, main_value, on_main, setup, world_size
from .dynamics import eval_kwargs, evaluate_checkpoint, evaluate_examples, split_summary
from .models import (
    adapter_base, is_adapter, load_model, load_tokenizer, module_ref, quiet_libraries, release_memory,
)
from .results import BASE, RunDir, atomic_write_text, epoch_name, find_checkpoints, read_json, write_json, write_jsonl
from .runlock import python_command, run_lock
from .train import TrainingDiverged

# Settings that change what a run computes; a resumed run must agree on all of them.
_RESUME_KEYS = ("model", "train", "data")
# ... except these: a run resumed on another number of processes keeps its global batch.
_RESUME_FREE = {"train": ("world_size",)}


def _check_resumable(run: RunDir, cfg: RunConfig) -> None:
    if not run.config.exists():
        return
    old = read_yaml(run.config)
    new = json.loads(cfg.model_dump_json())
    for key in _RESUME_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = ({k: v for k, v in d.items() if k not in _RESUME_FREE.get(key, ())} for d in (a, b))
        if a != b:
            raise ConfigError(
                f"{run.config}: the existing run was made with a different '{key}' section; "
                "use a new --out folder to start a new run"
            )
    _check_same_backend(run, cfg)


def _check_same_backend(run: RunDir, cfg: RunConfig) -> None:
    """The rows of one folder come from one evaluation backend (vLLM's numbers differ from Hugging
    Face's in the last digits, and config.yaml names one backend for all of them)."""
    if not run.config.is_file() or not run.read_dynamics():
        return
    old, new = (read_yaml(run.config).get("eval") or {}).get("backend", "hf"), cfg.eval.backend
    if old != new and "auto" not in (old, new):
        raise ConfigError(f"{run.config}: the results in {run.root} were evaluated with eval.backend={old!r}, not "
                          f"{new!r}; keep eval.backend={old}, or write to a new --out folder")


def _check_lost_checkpoints(run: RunDir, cfg: RunConfig) -> None:
    """A resumed run trains on from the Trainer's last saved state: an epoch checkpoint before that
    state which is gone together with its dynamics rows would never be made again, and the run would
    finish without it. (A checkpoint deleted after it was evaluated is fine: its rows stay.)"""
    def epoch_of(state: Path) -> float:
        try:
            s = read_json(state)
        except ValueError:  # cut off by a kill: the resume deletes it
            return 0.0
        return s.get("epoch") or 0.0 if isinstance(s, dict) else 0.0

    reached = max((epoch_of(p / "trainer_state.json") for p in run.trainer_state.glob("checkpoint-*")
                   if (p / "trainer_state.json").is_file()), default=0.0)
    evaluated = {r["checkpoint"] for r in run.read_dynamics()}
    lost = [e for e in range(1, cfg.train.epochs + 1) if e <= reached + 1e-6 and epoch_name(e) not in evaluated
            and not run.checkpoint(epoch_name(e)).exists()]
    if lost:
        raise ConfigError(f"{run.checkpoint(epoch_name(lost[0]))}: missing, and not in {run.dynamics}, but the "
                          f"Trainer's state in {run.trainer_state} is at epoch {reached:g}, so resuming cannot make it "
                          "again; restore the checkpoint, or start the run afresh in a new --out folder")


def _check_backend(cfg: RunConfig) -> None:
    """Several processes share evaluation out with the Hugging Face backend; a vLLM engine (one per
    process, `eval.vllm.tensor_parallel_size` GPUs) is for a command run in one process."""
    if cfg.eval.overlap and (world_size() > 1 or cfg.eval.backend != "hf"):
        raise ConfigError(f"eval.overlap: tracking in a second process is for a run in one process with "
                          f"eval.backend=hf (here {world_size()} process(es), eval.backend={cfg.eval.backend!r}); "
                          "set eval.overlap=false, or eval.backend=hf and launch one process")
    if world_size() > 1 and cfg.eval.backend != "hf":
        raise ConfigError(f"eval.backend: {cfg.eval.backend!r} with {world_size()} processes; launched on several "
                          "processes, overmem shares evaluation out with the Hugging Face backend: set "
                          "eval.backend=hf, or run the command in one process with eval.vllm.tensor_parallel_size")


def _for_eval(model: Any, saved: Path | None, cfg: RunConfig) -> Any:
    """What a run evaluates: the model in memory (Hugging Face backend), or with vLLM its saved
    checkpoint (None: the base) loaded into the engine (`overmem.backends.load_for_eval`)."""
    return model if choose_backend(cfg) == "hf" else load_for_eval(saved, cfg)


def _record_environment(run_dir: RunDir) -> None:
    from .doctor import environment

    write_json(run_dir.environment, environment())


def run(cfg: RunConfig) -> RunDir:
    """Finetune and track every checkpoint; resumes an existing run folder. The folder's lock
    (`overmem.runlock`) is held throughout, as by the command line: two runs, or a run and a scan,
    never write one folder at once."""
    if not cfg.out_dir:
        raise ConfigError("out_dir: no output folder given (use --out or set out_dir)")
    with run_lock(cfg.out_dir, python_command()):
        return _run(cfg)


def _run(cfg: RunConfig) -> RunDir:
    from .train.trainer import check_training_settings, with_world_size

    quiet_libraries(cfg.quiet)
    setup()  # several processes: join their group first (on GPUs: this rank's device becomes the default)
    _check_backend(cfg)
    run_dir = RunDir(cfg.out_dir)
    cfg = with_world_size(cfg)  # the resolved config records the processes launched
    main_value(lambda: _check_resumable(run_dir, cfg))
    main_value(lambda: _check_lost_checkpoints(run_dir, cfg))
    # Everything that can fail on bad input happens before the run folder is created.
    t0 = time.perf_counter()
    splits = derive_splits(cfg.data)
    if cfg.eval.accuracy:
        ensure_sandbox(ex for examples in splits.tracked.values() for ex in examples)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    check_training_settings(cfg, run_dir, model)

    def create() -> None:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir.config, dump_config(cfg))
        _record_environment(run_dir)
        run_dir.record_timing("load data and model", time.perf_counter() - t0)

    on_main(create)
    trained = main_value(lambda: all(run_dir.checkpoint(epoch_name(e)).exists()
                                     for e in range(1, cfg.train.epochs + 1)))
    if trained or not cfg.eval.overlap:  # else the second process evaluates the base while epoch 1 trains
        evaluate_checkpoint(_for_eval(model, None, cfg), tokenizer, splits.tracked, run_dir, checkpoint=BASE,
                            epoch=0, step=0, **eval_kwargs(cfg, splits.tracked))
    if not trained:
        _train_and_track(cfg, model, tokenizer, splits.train, splits.tracked, run_dir)
    del model
    release_memory()
    if cfg.merge:
        def merge() -> None:
            with run_dir.timed("merge"):
                merge_groups(run_dir, cfg)

        on_main(merge)
    scan_checkpoints(run_dir, cfg, splits.tracked, include_base=False)  # merges, and any a resume left
    on_main(lambda: _finish(run_dir, cfg))
    return run_dir


def _finish(run_dir: RunDir, cfg: RunConfig) -> None:
    write_run_report(run_dir, drawn=finalize(run_dir, cfg)["figures"])


def _train_and_track(
    cfg: RunConfig, model: Any, tokenizer: Any, train: Sequence[Example], tracked: Mapping[str, Sequence[Example]],
    run_dir: RunDir,
) -> None:
    """Finetune, evaluating each checkpoint while the trained model is still in memory, or with
    `eval.overlap` in a second process while training goes on (`overmem.overlap`).

    A diverged training (a non-finite training loss, or a checkpoint whose losses are not finite)
    raises `TrainingDiverged` after writing the phases, selection and report of the checkpoints
    finished before it."""
    from .train.trainer import finetune

    ev = eval_kwargs(cfg, tracked)
    eval_seconds = 0.0
    tracker = _start_tracker(cfg, tracked, run_dir) if cfg.eval.overlap else None

    def track(name: str, m: Any, state: Any) -> None:
        nonlocal eval_seconds
        if tracker is not None:
            tracker.submit(name, run_dir.checkpoint(name), round(state.epoch, 4), state.global_step)
            _stop_if_diverged(tracker.poll(), cfg)
            return
        t = time.perf_counter()
        rows = evaluate_checkpoint(_for_eval(m, run_dir.checkpoint(name), cfg), tokenizer, tracked, run_dir,
                                   checkpoint=name, epoch=round(state.epoch, 4),
                                   step=state.global_step, **ev)
        eval_seconds += time.perf_counter() - t
        _stop_if_diverged(rows, cfg)

    t0 = time.perf_counter()
    try:
        finetune(cfg, model, tokenizer, train, run_dir, on_checkpoint=track)
        seconds = time.perf_counter() - t0 - eval_seconds
        on_main(lambda: run_dir.record_timing("train", seconds,
                                              "training and checkpoint saving, without the evaluations during it"))
        if tracker is not None:
            t = time.perf_counter()
            _stop_if_diverged(tracker.close(progress=not cfg.quiet), cfg)
            waited = time.perf_counter() - t
            on_main(lambda: run_dir.record_timing(
                "track (second process)", tracker.seconds + tracker.helped,
                f"the base and every checkpoint evaluated while training went on: {tracker.seconds:.1f} s in the "
                f"second process, {tracker.helped:.1f} s in the training process once training was over; "
                f"{waited:.1f} s of wall time after training"))
    except TrainingDiverged:  # every rank stops at the same step (see OvermemTrainer.training_step)
        if tracker is not None:
            tracker.stop()
        on_main(lambda: _finish_diverged(run_dir, cfg))
        raise
    finally:
        if tracker is not None:
            tracker.stop()


def _start_tracker(cfg: RunConfig, tracked: Mapping[str, Sequence[Example]], run_dir: RunDir) -> Any:
    """The second process of `eval.overlap`, given first the base model and the checkpoints an
    interrupted run saved but did not evaluate (in order: each one's drafts are the previous one's)."""
    import torch

    from .overlap import OverlapTracker

    done = run_dir.done()
    tracker = OverlapTracker(cfg, tracked, threads=torch.get_num_threads(), quiet=cfg.quiet)
    if any((BASE, split) not in done for split in tracked):
        tracker.submit(BASE, None, 0, 0)
    try:
        saved = find_checkpoints(run_dir.root) if run_dir.checkpoints.is_dir() else []
    except FileNotFoundError:  # none saved yet
        saved = []
    for ckpt in saved:
        if any((ckpt.name, split) not in done for split in tracked):
            tracker.submit(ckpt.name, ckpt.path, ckpt.epoch, ckpt.step)
    return tracker


def _stop_if_diverged(rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> None:
    """Every checkpoint after one with non-finite losses would be as broken: stop training."""
    bad = [r for r in rows if r.get("non_finite")]
    if bad:
        where = ", ".join(f"{r['non_finite']} of {r['n']} on {r['split']}" for r in bad)
        raise TrainingDiverged(f"by step {bad[0]['step']}: {bad[0]['checkpoint']} has non-finite losses ({where})",
                               cfg.train.lr)


def _finish_diverged(run_dir: RunDir, cfg: RunConfig) -> None:
    """Phases, selection and report of the checkpoints finished before a divergence."""
    diverged = {r["checkpoint"] for r in run_dir.read_dynamics() if r.get("non_finite")}
    try:
        finalize(run_dir, cfg, leave_out=diverged)
    except ValueError as err:  # the divergence is the error to report, not a figure it spoiled
        warnings.warn(f"phases and selection not written ({err})", stacklevel=2)
    write_run_report(run_dir)  # figures drawn afresh: the report shows the diverged checkpoint finalize leaves out


def write_run_report(run_dir: RunDir, drawn: Sequence[Path] = ()) -> Path | None:
    """`RUN/report.html` (`drawn`: the figures `finalize` has just drawn, embedded as they are);
    a failure warns (the run's results are on disk) instead of raising."""
    from .report import write_report

    try:
        with run_dir.timed("report"):
            return write_report([run_dir.root], drawn={run_dir.root: drawn})
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
        paths = [run_dir.checkpoint(name) for name in group]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ConfigError(f"merge: checkpoints not found: {', '.join(missing)}")
        out = run_dir.checkpoint(merge_name(paths))
        if not out.exists():
            merge_checkpoints(cfg.model.name_or_path, paths, out=out, progress=not cfg.quiet)
        outs.append(out)
    return outs


def scan_checkpoints(
    run_dir: RunDir, cfg: RunConfig, tracked: Mapping[str, Sequence[Example]], *, include_base: bool = True,
    folder: str | Path | None = None,
) -> None:
    """Evaluate every checkpoint (and the base as epoch 0) not yet in the dynamics."""
    ev = eval_kwargs(cfg, tracked)
    done = main_value(run_dir.done)
    todo = main_value(lambda: [c for c in find_checkpoints(folder or run_dir.root)
                               if any((c.name, s) not in done for s in tracked)]
                      if (folder or run_dir.checkpoints.exists()) else [])
    tokenizer = None
    if include_base and any((BASE, s) not in done for s in tracked):
        tokenizer = load_tokenizer(cfg.model)
        base = load_for_eval(None, cfg)
        evaluate_checkpoint(base, tokenizer, tracked, run_dir, checkpoint=BASE, epoch=0, step=0, **ev)
        dropped = module_ref(base)
        del base
        release_memory(dropped)
    for ckpt in tqdm(todo, desc="checkpoints", disable=cfg.quiet or not is_main()):
        model = load_for_eval(ckpt.path, cfg)
        tokenizer = tokenizer or load_tokenizer(cfg.model)
        evaluate_checkpoint(model, tokenizer, tracked, run_dir, checkpoint=ckpt.name, epoch=ckpt.epoch, step=ckpt.step,
                            **ev)
        dropped = module_ref(model)
        del model
        release_memory(dropped)


def scan(folder: str | Path, cfg: RunConfig) -> RunDir:
    """Track checkpoints that already exist (an overmem run or a Trainer output folder), holding the
    lock of the folder written (`cfg.out_dir`, else `folder`) throughout."""
    with run_lock(cfg.out_dir or folder, python_command()):
        return _scan(folder, cfg)


def _scan(folder: str | Path, cfg: RunConfig) -> RunDir:
    quiet_libraries(cfg.quiet)
    setup()
    _check_backend(cfg)
    folder = Path(folder)
    adapters = [c for c in find_checkpoints(folder) if is_adapter(c.path)]
    if adapters and cfg.model.name_or_path == RunConfig().model.name_or_path:
        base = adapter_base(adapters[0].path)
        if base:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": base})})
    run_dir = RunDir(cfg.out_dir or folder)
    splits = derive_splits(cfg.data)
    if cfg.eval.accuracy:
        ensure_sandbox(ex for examples in splits.tracked.values() for ex in examples)

    main_value(lambda: _check_same_backend(run_dir, cfg))

    def create() -> None:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        # config.yaml describes the folder's rows: an earlier scan that wrote none (e.g. its vLLM engine
        # did not start) leaves no settings to keep.
        if not run_dir.config.exists() or not run_dir.read_dynamics():
            atomic_write_text(run_dir.config, dump_config(cfg))
        _record_environment(run_dir)

    on_main(create)
    t0 = time.perf_counter()
    scan_checkpoints(run_dir, cfg, splits.tracked, folder=folder)
    seconds = time.perf_counter() - t0
    on_main(lambda: run_dir.record_timing("evaluate checkpoints", seconds, "loading included"))
    on_main(lambda: _finish(run_dir, cfg))
    return run_dir


def evaluate_model(
    cfg: RunConfig, data: str, out: str | Path, *, adapter: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """Evaluate one model (optionally with an adapter) on one dataset spec.

    Writes `out` (the split's figures, same fields as a dynamics row) and the per-example
    rows beside it (`<out stem>.samples.jsonl`).
    """
    quiet_libraries(cfg.quiet)
    setup()
    _check_backend(cfg)
    examples = load_spec(cfg.data, data, size=cfg.data.test_size)
    if cfg.eval.accuracy:
        ensure_sandbox(examples)
    tokenizer = load_tokenizer(cfg.model)
    model = load_for_eval(adapter, cfg)
    samples = evaluate_sharded(
        lambda part: evaluate_examples(model, tokenizer, part, eval_cfg=cfg.eval, gen_cfg=cfg.generation,
                                       max_length=cfg.train.max_length, desc=data, quiet=cfg.quiet or not is_main()),
        tokenizer, examples, batch_size=cfg.eval.batch_size, max_length=cfg.train.max_length,
    )
    row = {"checkpoint": name or adapter or cfg.model.name_or_path, "epoch": None, "step": 0, "split": data}
    row.update(split_summary(samples, cfg.eval))
    out = Path(out)
    on_main(lambda: (write_jsonl(out.with_name(out.stem + ".samples.jsonl"), samples), write_json(out, row)))
    return row


def finalize(run_dir: RunDir, cfg: RunConfig, *, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """Phases, checkpoint selection and the dynamics and signals figures, from `dynamics.jsonl` alone; the one
    place `phases.json` and `selection.json` are computed (the latter when the validation split
    was tracked). The checkpoints in `leave_out` are not used (a diverged run's last one,
    whose perplexities are None)."""
    from .phases import detect_run_phases
    from .plotting import has_signals, plot_dynamics, plot_signals
    from .selection import select_run_checkpoint, selectable, write_selection

    rows = [r for r in run_dir.read_dynamics() if r["checkpoint"] not in leave_out]
    report = detect_run_phases(rows, cfg)
    write_json(run_dir.phases, report.to_dict())
    out: dict[str, Any] = {"phases": report}
    if selectable(rows, cfg.selection.valid_split):
        sel = select_run_checkpoint(rows, cfg)
        write_selection(sel, run_dir.selection)
        out["selection"] = sel
    out["figures"] = plot_dynamics(rows, run_dir.root, phase_report=report)
    if has_signals(rows):
        out["figures"] += plot_signals(rows, run_dir.root, phase_report=report)
    return out
