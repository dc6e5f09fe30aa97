"""`overmem` command line: each subcommand parses into a config and makes one library call.

The subcommands are the table `COMMANDS`: name, handler, help, description and arguments, in
the order `overmem --help` lists them.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .cli_inputs import (
    band,
    check_adapter_folder,
    check_checkpoint_bases,
    check_merge_groups,
    check_merge_out,
    check_output_file,
    check_output_folder,
    check_outputs_spare_inputs,
    check_report_out,
    check_same_results,
    check_tracked_splits,
    count,
    data_file,
    quoted,
    stored_result,
)
from .config import ConfigError, RunConfig, load_config
from .distributed import RankFailed, is_main
from .overlap import TrackerFailed
from .results import CHECKPOINTS_DIR, RunDir, find_checkpoints, resolve_checkpoints
from .runlock import run_lock
from .sandbox import SandboxUnavailable
from .train import TrainingDiverged
from .vllm_backend import VllmError

# `grade --timeout`: an hour a program is already far beyond any test suite; a huge value overflows
# the sandbox's timers and turns every program into an error.
MAX_PROGRAM_SECONDS = 3600
_EPILOG = "Docs and examples: see the README. Configs are YAML; --set a.b=value overrides any field."


# ---- the commands ------------------------------------------------------------------------------


def _config(args: argparse.Namespace, path: str | None) -> RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.data_dir={quoted(args.data_dir)}")
    if getattr(args, "quiet", False):
        overrides.append("quiet=true")
    if getattr(args, "out", None):
        overrides.append(f"out_dir={quoted(args.out)}")
    return load_config(path, overrides)


def _run_config(run: RunDir, args: argparse.Namespace) -> RunConfig:
    """The config saved in a run folder, with command-line overrides applied."""
    return load_config(run.config if run.config.exists() else None, list(args.overrides))


def _writing(args: argparse.Namespace, root: str | Path | None) -> AbstractContextManager:
    """The lock of run folder `root` while this command writes there (`overmem.runlock`); none
    without a folder (the command says so itself)."""
    return run_lock(root, args.command_line) if root else nullcontext()


def _dynamics(run: RunDir) -> list[dict[str, Any]]:
    rows = run.read_dynamics(strict=True)  # a torn or foreign row is an error here, not a row less
    if not rows:
        raise ConfigError(f"{run.dynamics}: no dynamics rows; run `overmem run` or `overmem scan` first")
    return rows


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    cfg = _config(args, args.config)
    check_output_folder(cfg.out_dir)
    check_tracked_splits(cfg)
    check_merge_groups(cfg)
    with _writing(args, cfg.out_dir):
        _print_outcome(run(cfg))
    return 0


def _scan_config(args: argparse.Namespace) -> RunConfig:
    """`scan`'s config: --config, else the output folder's own config.yaml (an earlier run or
    scan); results go to --out, else FOLDER."""
    args.out = args.out or args.folder
    check_output_folder(args.out)
    run = RunDir(args.out)
    saved = run.config if run.config.is_file() else None
    cfg = _config(args, args.config or saved)
    if saved is not None and run.dynamics.exists():
        check_same_results(saved, cfg)
    return cfg


def cmd_scan(args: argparse.Namespace) -> int:
    from .pipeline import scan

    cfg = _scan_config(args)
    check_tracked_splits(cfg)
    check_checkpoint_bases(find_checkpoints(args.folder), cfg.model.name_or_path)
    with _writing(args, args.out):
        _print_outcome(scan(args.folder, cfg))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_model

    args.overrides.append(f"model.name_or_path={quoted(args.model)}")
    if args.max_examples is not None:
        args.overrides.append(f"data.test_size={args.max_examples}")
    cfg = _config(args, args.config)
    check_output_file(args.out, "result.json")
    check_adapter_folder(args.adapter)
    check_outputs_spare_inputs(args.out, [("--data", data_file(args.data)), ("--model", args.model),
                                          ("--adapter", args.adapter), ("--config", args.config)])
    row = evaluate_model(cfg, args.data, args.out, adapter=args.adapter)
    if not is_main():  # several processes: rank 0 speaks for them
        return 0
    acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f} [{row['accuracy_ci_low']:.4f}, {row['accuracy_ci_high']:.4f}]"
    ppl, ppl_token = ("-" if row[k] is None else f"{row[k]:.4f}" for k in ("ppl", "ppl_token"))
    cut = "".join(f"  {k}={row[k]}" for k in ("n_truncated", "n_skipped") if k in row)
    print(f"{args.data}: n={row['n']}{cut}  ppl={ppl}  ppl_token={ppl_token}  accuracy={acc}")
    print(f"wrote {args.out}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from .grading import grade
    from .sandbox import Limits

    cfg = _config(args, args.config)
    check_output_file(args.out, "grades.json")
    check_outputs_spare_inputs(args.out, [("--generations", args.generations), ("--data", data_file(args.data)),
                                          ("--config", args.config)])
    result = grade(cfg, args.data, args.generations, args.out, limits=Limits(timeout_s=args.timeout),
                   workers=args.workers)
    acc = f"{result['accuracy']:.4f} [{result['accuracy_ci_low']:.4f}, {result['accuracy_ci_high']:.4f}]"
    sandbox = f"  sandbox: {result['sandbox']['isolation']}" if "sandbox" in result else ""
    print(f"{args.data}: n={result['n']}  correct={result['n_correct']}  accuracy={acc}{sandbox}")
    print(f"wrote {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """`selection.json` as `overmem run` wrote it; selected afresh (and re-written) only when it is
    missing, older than the dynamics, or made with other settings than the options ask for."""
    from .selection import (
        SelectionResult, format_selection, select_run_checkpoint, selection_is_current, write_selection,
    )

    run = RunDir(args.run)
    if args.band is not None:
        args.overrides.append(f"selection.ppl_band={args.band}")
    if args.valid_split is not None:
        args.overrides.append(f"selection.valid_split={quoted(args.valid_split)}")
    cfg = _run_config(run, args)
    rows = _dynamics(run)
    stored = stored_result(run.selection, SelectionResult)
    if stored is not None and run.up_to_date(run.selection) and selection_is_current(stored, rows, cfg):
        print(format_selection(SelectionResult.model_validate(stored)))
        print(f"read {run.selection}")
        return 0
    sel = select_run_checkpoint(rows, cfg)
    with _writing(args, run.root):
        write_selection(sel, run.selection)
    print(format_selection(sel))
    print(f"wrote {run.selection}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """The figure from `phases.json`; phases (and selection) are computed afresh by `finalize` only
    when the file is missing, older than the dynamics, or made with other phase settings."""
    from .phases import PhaseReport, phases_are_current

    run = RunDir(args.run)
    cfg = _run_config(run, args)
    rows = _dynamics(run)
    stored = stored_result(run.phases, PhaseReport)
    with _writing(args, run.root):
        if stored is not None and run.up_to_date(run.phases) and phases_are_current(stored, rows, cfg):
            from .plotting import plot_dynamics

            figures = plot_dynamics(rows, run.root, phase_report=PhaseReport.model_validate(stored))
        else:
            from .pipeline import finalize

            figures = finalize(run, cfg)["figures"]
    for f in figures:
        print(f"wrote {f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_checkpoints, merge_name

    check_merge_out(args.out, [("--base", args.base), *(("--checkpoints", c) for c in args.checkpoints),
                               ("--initial-adapter", args.initial_adapter)])
    parent = Path(args.out).parent  # RUN/checkpoints/NAME: a checkpoint of that run
    in_run = parent.parent if parent.name == CHECKPOINTS_DIR and RunDir(parent.parent).config.is_file() else None
    with _writing(args, in_run):
        out = merge_checkpoints(
            args.base, args.checkpoints, args.weights, out=args.out, exact_adapter=args.exact_adapter,
            initial_adapter=args.initial_adapter, overwrite=args.overwrite, force=args.force, progress=not args.quiet,
        )
    print(f"wrote {merge_name(args.checkpoints, args.weights)} to {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.base import default_suite
    from .analysis.suite import analyze, format_table

    run = RunDir(args.run)
    if not run.config.is_file():
        raise ConfigError(f"{run.root}: not a run folder (no config.yaml); "
                          "make one with `overmem run` or `overmem scan`")
    if args.data_dir:
        args.overrides.append(f"data.data_dir={args.data_dir}")
    if args.quiet:
        args.overrides.append("quiet=true")
    cfg = _run_config(run, args)
    suite = default_suite() if args.suite is None else [s.strip() for s in args.suite.split(",") if s.strip()]
    check_checkpoint_bases(resolve_checkpoints(run.root, args.checkpoints), cfg.model.name_or_path)
    with _writing(args, run.root):
        docs = analyze(run.root, args.checkpoints, suite, cfg)
    names = [c.name for c in resolve_checkpoints(run.root, args.checkpoints)]
    for name, doc in docs.items():
        print(format_table(doc, names))
        print(f"wrote {run.analysis_json(name)}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_config, demo_pretrain, run_demo

    check_output_folder(args.out)
    # A bad --set fails now, not after the pretraining of the base (minutes, the first time).
    check_tracked_splits(demo_config(Path(args.out), args.out, epochs=args.epochs, overrides=list(args.overrides)))
    with _writing(args, args.out):
        run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs, quiet=args.quiet, overrides=args.overrides,
                 pretrain=demo_pretrain(args.pretrain_steps))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.out is not None:
        check_output_file(args.out, "report.html")
        check_report_out(args.out, args.runs)
    page = Path(args.out) if args.out is not None else RunDir(args.runs[0]).report
    in_run = next((r for r in args.runs if Path(r).is_dir() and page.parent.resolve() == Path(r).resolve()), None)
    with _writing(args, in_run):
        path = write_report(args.runs, args.out, example=args.example, n_examples=args.examples)
    print(f"wrote {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_report

    found = diagnose()
    print(json.dumps(found, indent=2) if args.json else format_report(found))
    return 0


def _print_outcome(run: RunDir) -> None:
    if not is_main():  # several processes: rank 0 speaks for them
        return
    phases = run.read_json(run.phases)
    if phases is not None:
        print(phases.get("summary", ""))
    selection = run.read_json(run.selection)
    if selection is not None:
        from .selection import format_selection_json

        print(format_selection_json(selection))
    print(f"results in {run.root}")
    if run.report.exists():
        print(f"report: {run.report}")


# ---- the parser --------------------------------------------------------------------------------

Arg = tuple[tuple[str, ...], dict[str, Any]]


def _arg(*flags: str, **kwargs: Any) -> Arg:
    return flags, kwargs


def _set(help: str | None = None) -> Arg:
    return _arg("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


_DATA_DIR = _arg("--data-dir", help="local data folder laid out like the datasets' own (env: OVERMEM_DATA_DIR)")
_QUIET = _arg("-q", "--quiet", action="store_true", help="no progress bars")
_QUIET_BARE = _arg("-q", "--quiet", action="store_true")
_RUN_FOLDER = _arg("run", help="run folder")


def _config_args(positional: bool = False) -> list[Arg]:
    """A config file, `--set` overrides, the data folder and -q: what `run`, `scan` and `evaluate` share."""
    config = (_arg("config", help="YAML config file (see examples/)") if positional
              else _arg("--config", help="YAML config file (model, data, eval settings)"))
    return [config, _set("override a config field, e.g. --set train.lr=1e-4 (repeatable)"), _DATA_DIR, _QUIET]


@dataclass(frozen=True)
class Command:
    """One subcommand: its handler, one-line help, description and arguments (in help order)."""

    name: str
    func: Callable[[argparse.Namespace], int]
    help: str
    description: str
    args: list[Arg]
    # Under torchrun / accelerate launch: every rank takes part (run, scan, evaluate); otherwise
    # rank 0 alone runs the command and the other ranks exit at once.
    sharded: bool = False


COMMANDS: tuple[Command, ...] = (
    Command("run", cmd_run, "finetune and evaluate every checkpoint",
            "Finetune a model as the config says, evaluating the base model and every epoch checkpoint on the "
            "tracked splits; then detect phases, select a checkpoint and plot. Re-running on the same --out resumes.",
            [*_config_args(positional=True), _arg("--out", help="run folder (default: the config's out_dir)")],
            sharded=True),
    Command("scan", cmd_scan, "track checkpoints you already have",
            "Evaluate every checkpoint in an overmem run or a Hugging Face Trainer output folder (checkpoint-STEP), "
            "as `run` does, without training.",
            [_arg("folder", help="folder with checkpoint-STEP / epoch-N subfolders"), *_config_args(),
             _arg("--out", help="where to write results (default: FOLDER itself)")], sharded=True),
    Command("evaluate", cmd_evaluate, "perplexity and accuracy of one model on one dataset",
            "Score reference solutions and check greedy answers for one model.",
            [_arg("--model", required=True, help="hub id, local folder or .gguf file"),
             _arg("--adapter", help="PEFT adapter folder to apply on top of --model"),
             _arg("--data", required=True, help="dataset spec, e.g. gsm8k:test[:200] or path/to/file.jsonl"),
             _arg("--out", required=True, help="result JSON file (samples go beside it)"),
             _arg("--max-examples", type=count(1), help="seeded subsample of the dataset"), *_config_args()],
            sharded=True),
    Command("grade", cmd_grade, "check generations made anywhere (answers, or code run in a sandbox)",
            "Grade a JSONL file of generations ({\"id\": ..., \"generation\": ...} per line; matched by id, else "
            "by order) against a dataset with overmem's answer checking; code runs against its tests in a sandbox.",
            [_arg("--data", required=True, help="dataset spec, e.g. humaneval or gsm8k:test[:200]"),
             _arg("--generations", required=True, help="JSONL file: one object per example with 'generation'"),
             _arg("--out", required=True, help="result JSON file (per-example rows go beside it)"),
             _arg("--timeout", type=count(1, MAX_PROGRAM_SECONDS), default=10, metavar="SECONDS",
                  help=f"wall-clock limit of each program, at most {MAX_PROGRAM_SECONDS} (default: 10)"),
             _arg("--workers", type=count(1), help="programs run at a time (default: the CPU count, at most 8)"),
             *_config_args()]),
    Command("select", cmd_select, "which checkpoint to keep, and why",
            "Compare selection rules (paper sec. 6.1, Table 4) on a run's dynamics.",
            [_RUN_FOLDER, _arg("--band", type=band, help="relative validation-perplexity band (default 0.05)"),
             _arg("--valid-split", help="validation split name (default: validation)"), _set()]),
    Command("plot", cmd_plot, "draw the dynamics figure (PNG and SVG)",
            "Perplexity and accuracy against epoch per split, phases as background.",
            [_RUN_FOLDER, _set()]),
    Command("merge", cmd_merge, "merge checkpoints: base + sum_i w_i (theta_i - base)",
            "Merge two or more checkpoints (full models or LoRA adapters) into a dense model folder, exactly "
            "theta_base + sum_i w_i (theta_i - theta_base), streaming tensor by tensor (paper eq. 1). Put the output "
            "under RUN/checkpoints/ to have `overmem scan` track it.",
            [_arg("--base", required=True, help="base model folder the checkpoints were trained from"),
             _arg("--checkpoints", nargs="+", required=True, help="checkpoint folders (two or more)"),
             _arg("--weights", nargs="+", type=float, help="one weight per checkpoint (default: the mean)"),
             _arg("--out", required=True, help="output model folder (written atomically)"),
             _arg("--exact-adapter", action="store_true",
                  help="also write an exact LoRA adapter by rank concatenation (all inputs LoRA over one base)"),
             _arg("--initial-adapter", help="initial adapter of unconverted PiSSA/MiLoRA checkpoints"),
             _arg("--overwrite", action="store_true", help="replace an existing output folder (an earlier merge)"),
             _arg("--force", action="store_true",
                  help="merge adapters whose recorded base (adapter_config.json) is not --base and cannot be proven "
                  "to be the same weights"), _QUIET_BARE]),
    Command("analyze", cmd_analyze, "behavioural analyses of chosen checkpoints",
            "OOD accuracy, robustness to prompt preambles, diversity, calibration, membership inference and "
            "pre-memorization accuracy (paper sec. 5, app. D) of checkpoints side by side; writes "
            "RUN/analysis/NAME.json and per-sample JSONL, and resumes. Settings: --set analysis.*",
            [_arg("run", help="run folder (its config.yaml gives model and data)"),
             _arg("--checkpoints", nargs="+", required=True, metavar="CKPT",
                  help="names under RUN/checkpoints (epoch-0 = base model) or model/adapter folders"),
             _arg("--suite", help="comma-separated analyses, e.g. ood,mia (default: all but judge)"),
             _set("override a config field, e.g. --set analysis.mia.size=200 (repeatable)"), _DATA_DIR, _QUIET]),
    # --epochs and --pretrain-steps defaults are kept equal to demo.DEMO_EPOCHS and demo.DEMO_PRETRAIN.steps
    # (the demo module, which imports torch, loads lazily; tests/test_demo.py checks).
    Command("demo", cmd_demo, "offline quickstart on the built-in synthetic task",
            "Finetune a tiny model (its pretrained base ships with overmem) on the synthetic task on the CPU, "
            "tracking every epoch; shows over-memorization in minutes.",
            [_arg("--out", default="demo-run", help="run folder (default: ./demo-run)"),
             _arg("--seed", type=int, default=0),
             _arg("--epochs", type=count(1), default=50, help="finetuning epochs (default: 50)"),
             _arg("--pretrain-steps", type=count(1), default=1500, metavar="N",
                  help="optimizer steps of the tiny base's pretraining (default: 1500, the base that ships; "
                  "any other N pretrains once and is cached; fewer give a weaker base)"),
             _set("override a field of the demo's run config, e.g. --set train.lr=1e-3 (repeatable)"), _QUIET_BARE]),
    Command("report", cmd_report, "one self-contained HTML report of one or more runs",
            "Dynamics with phases, checkpoint selection, token-level losses of a healthy and an over-memorized "
            "checkpoint, analyses, merges, timings, config and versions, in one HTML file that opens offline. "
            "Several runs (e.g. a learning-rate sweep) are overlaid and compared.",
            [_arg("runs", nargs="+", metavar="RUN", help="run folder(s)"),
             _arg("--out", help="HTML file (default: RUN/report.html of the first run)"),
             _arg("--example", metavar="ID", help="test example shown first in the token view"),
             _arg("--examples", type=count(0), default=6, metavar="N",
                  help="test examples in the token view (default 6)"),
             _QUIET]),
    Command("doctor", cmd_doctor, "versions, device, dtype support and optional extras",
            "What this machine can run: package versions, CUDA/MPS/CPU devices and memory, bf16/fp16 support (tested "
            "with a tiny op), CPU threads, and which optional extras are installed, with the command that installs "
            "the missing ones.",
            [_arg("--json", action="store_true", help="machine-readable output")]),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overmem",
        description="Finetune LLMs on reasoning data while tracking learning dynamics; detect "
        "over-memorization and choose the checkpoint to keep.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"overmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=_EPILOG)
        for flags, kwargs in command.args:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=command.func, sharded=command.sharded)
    return parser


# A path that cannot be used as given (exit 2); other file-system errors (a full disk, I/O) are failures (exit 1).
_USAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY,
                 errno.ENAMETOOLONG}


def _os_error(err: OSError, args: argparse.Namespace) -> str:
    """One line: the path (the file the error names, else the command's output) and what to do."""
    path = err.filename or getattr(args, "out", None) or getattr(args, "run", None) or getattr(args, "folder", None)
    what = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space there (or write elsewhere with --out) and re-run the same command"
    elif err.errno in (errno.EACCES, errno.EPERM) and _unreadable(path):
        advice = "it is unreadable: make it readable (chmod +r) or give another path"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make it writable or choose another output folder"
    elif err.errno in _USAGE_ERRNOS:
        advice = "check the path you gave"
    else:
        advice = "re-run the same command; set OVERMEM_DEBUG=1 to see the traceback"
    return f"{path}: {what}; {advice}" if path else f"{what}; {advice}"


def _unreadable(path: object) -> bool:
    """Whether `path` is an existing file or folder that this process may not read (a refused read is
    not fixed by making anything writable)."""
    return bool(path) and os.path.exists(str(path)) and not os.access(str(path), os.R_OK)


def _one_line(message: object) -> str:
    """A message on one line (a library's own may span several)."""
    return " ".join(str(message).split())


def _judge_error() -> type[Exception]:
    """The judge's endpoint error (a ConnectionError: caught before OSError, which would blame a path)."""
    from .analysis.judge import JudgeError

    return JudgeError


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill` and `timeout` send), handled as Ctrl-C is: every clean-up runs (programs
    in the sandbox killed, partial files removed), and a re-run resumes."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _catch_sigterm() -> Any:
    """Turn SIGTERM into `Terminated` while a command runs (main thread only); the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "overrides"):  # commands append to it: not to argparse's default list, shared by every call
        args.overrides = list(args.overrides)
    args.command_line = shlex.join(["overmem", *map(str, sys.argv[1:] if argv is None else argv)])  # in locks
    if not args.sharded and not is_main():
        return 0  # launched on several processes: rank 0 alone runs a command that is not shared
    previous = _catch_sigterm()
    try:
        return args.func(args)
    except RankFailed:  # another rank failed and reports the error itself
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if os.environ.get("OVERMEM_DEBUG"):
            raise
        print(f"overmem {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, TrackerFailed, SandboxUnavailable, VllmError, _judge_error()) as err:  # failures
        if os.environ.get("OVERMEM_DEBUG"):
            raise
        print(f"overmem {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused: a path the user gave, or a full disk
        if os.environ.get("OVERMEM_DEBUG"):
            raise
        print(f"overmem {args.command}: error: {_one_line(_os_error(err, args))}", file=sys.stderr)
        return 2 if err.errno in _USAGE_ERRNOS else 1
    except KeyboardInterrupt as err:
        print(f"overmem {args.command}: {'terminated' if isinstance(err, Terminated) else 'interrupted'}; re-run the "
              "same command to resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
