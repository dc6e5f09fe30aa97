"""`overmem` command line: each subcommand parses into a config and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, RunConfig, load_config

_EPILOG = "Docs and examples: see the README. Configs are YAML; --set a.b=value overrides any field."


def _add_config_args(p: argparse.ArgumentParser, config_positional: bool = False) -> None:
    if config_positional:
        p.add_argument("config", help="YAML config file (see examples/)")
    else:
        p.add_argument("--config", help="YAML config file (model, data, eval settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--data-dir", help="local data folder laid out like the datasets' own (env: OVERMEM_DATA_DIR)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, path: str | None) -> RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "quiet", False):
        overrides.append("quiet=true")
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    return load_config(path, overrides)


def _run_config(run: Path, args: argparse.Namespace) -> RunConfig:
    """The config saved in a run folder, with command-line overrides applied."""
    saved = run / "config.yaml"
    return load_config(saved if saved.exists() else None, list(args.overrides))


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    cfg = _config(args, args.config)
    out = run(cfg)
    _print_outcome(out.root)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from .pipeline import scan

    cfg = _config(args, args.config)
    out = scan(args.folder, cfg)
    _print_outcome(out.root)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_model

    args.overrides.append(f"model.name_or_path={args.model}")
    if args.max_examples:
        args.overrides.append(f"data.test_size={args.max_examples}")
    cfg = _config(args, args.config)
    row = evaluate_model(cfg, args.data, args.out, adapter=args.adapter)
    acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f} [{row['accuracy_ci_low']:.4f}, {row['accuracy_ci_high']:.4f}]"
    print(f"{args.data}: n={row['n']}  ppl={row['ppl']:.4f}  ppl_token={row['ppl_token']:.4f}  accuracy={acc}")
    print(f"wrote {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from .results import RunDir
    from .selection import format_selection, select_checkpoint, write_selection

    cfg = _run_config(Path(args.run), args)
    run = RunDir(args.run)
    rows = run.read_dynamics()
    if not rows:
        raise ConfigError(f"{run.dynamics}: no dynamics rows; run `overmem run` or `overmem scan` first")
    tests = [s for s in dict.fromkeys(r["split"] for r in rows) if s not in ("train", cfg.selection.valid_split)]
    sel = select_checkpoint(rows, valid_split=args.valid_split or cfg.selection.valid_split,
                            test_splits=tests, ppl_band=cfg.selection.ppl_band if args.band is None else args.band)
    write_selection(sel, run.root / "selection.json")
    print(format_selection(sel))
    print(f"wrote {run.root / 'selection.json'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .pipeline import finalize
    from .results import RunDir

    cfg = _run_config(Path(args.run), args)
    run = RunDir(args.run)
    if not run.read_dynamics():
        raise ConfigError(f"{run.dynamics}: no dynamics rows; run `overmem run` or `overmem scan` first")
    out = finalize(run, cfg)
    for f in out["figures"]:
        print(f"wrote {f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_checkpoints, merge_name

    out = merge_checkpoints(
        args.base, args.checkpoints, args.weights, out=args.out, exact_adapter=args.exact_adapter,
        initial_adapter=args.initial_adapter, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"wrote {merge_name(args.checkpoints, args.weights)} to {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.suite import analyze, format_table, json_path, resolve_checkpoints

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run folder (no config.yaml); make one with `overmem run` or `overmem scan`")
    if args.data_dir:
        args.overrides.append(f"data.data_dir={args.data_dir}")
    if args.quiet:
        args.overrides.append("quiet=true")
    cfg = _run_config(run, args)
    suite = [s.strip() for s in args.suite.split(",") if s.strip()]
    docs = analyze(run, args.checkpoints, suite, cfg)
    names = [t.name for t in resolve_checkpoints(run, args.checkpoints)]
    for name, doc in docs.items():
        print(format_table(doc, names))
        print(f"wrote {json_path(run, name)}\n")
    return 0


def _print_outcome(root: Path) -> None:
    import json

    phases = root / "phases.json"
    if phases.exists():
        p = json.loads(phases.read_text())
        print(p.get("summary", ""))
    sel = root / "selection.json"
    if sel.exists():
        from .selection import format_selection_json

        print(format_selection_json(json.loads(sel.read_text())))
    print(f"results in {root}")
    if (root / "report.html").exists():
        print(f"report: {root / 'report.html'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overmem",
        description="Finetune LLMs on reasoning data while tracking learning dynamics; detect "
        "over-memorization and choose the checkpoint to keep.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"overmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="finetune and evaluate every checkpoint", epilog=_EPILOG,
                       description="Finetune a model as the config says, evaluating the base model and every "
                       "epoch checkpoint on the tracked splits; then detect phases, select a checkpoint and plot. "
                       "Re-running on the same --out resumes.")
    _add_config_args(p, config_positional=True)
    p.add_argument("--out", help="run folder (default: the config's out_dir)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("scan", help="track checkpoints you already have", epilog=_EPILOG,
                       description="Evaluate every checkpoint in an overmem run or a Hugging Face Trainer output "
                       "folder (checkpoint-STEP), as `run` does, without training.")
    p.add_argument("folder", help="folder with checkpoint-STEP / epoch-N subfolders")
    _add_config_args(p)
    p.add_argument("--out", help="where to write results (default: FOLDER itself)")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("evaluate", help="perplexity and accuracy of one model on one dataset", epilog=_EPILOG,
                       description="Score reference solutions and check greedy answers for one model.")
    p.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    p.add_argument("--adapter", help="PEFT adapter folder to apply on top of --model")
    p.add_argument("--data", required=True, help="dataset spec, e.g. gsm8k:test[:200] or path/to/file.jsonl")
    p.add_argument("--out", required=True, help="result JSON file (samples go beside it)")
    p.add_argument("--max-examples", type=int, help="seeded subsample of the dataset")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate, out_dir=None)

    p = sub.add_parser("select", help="which checkpoint to keep, and why", epilog=_EPILOG,
                       description="Compare selection rules (paper sec. 6.1, Table 4) on a run's dynamics.")
    p.add_argument("run", help="run folder")
    p.add_argument("--band", type=float, help="relative validation-perplexity band (default 0.05)")
    p.add_argument("--valid-split", help="validation split name (default: validation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("plot", help="draw the dynamics figure (PNG and SVG)", epilog=_EPILOG,
                       description="Perplexity and accuracy against epoch per split, phases as background.")
    p.add_argument("run", help="run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("merge", help="merge checkpoints: base + sum_i w_i (theta_i - base)", epilog=_EPILOG,
                       description="Merge two or more checkpoints (full models or LoRA adapters) into a dense "
                       "model folder, exactly theta_base + sum_i w_i (theta_i - theta_base), streaming tensor by "
                       "tensor (paper eq. 1). Put the output under RUN/checkpoints/ to have `overmem scan` track it.")
    p.add_argument("--base", required=True, help="base model folder the checkpoints were trained from")
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders (two or more)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: the mean)")
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--exact-adapter", action="store_true",
                   help="also write an exact LoRA adapter by rank concatenation (all inputs LoRA over one base)")
    p.add_argument("--initial-adapter", help="initial adapter of unconverted PiSSA/MiLoRA checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("analyze", help="behavioural analyses of chosen checkpoints", epilog=_EPILOG,
                       description="OOD accuracy, robustness to prompt preambles, diversity, calibration, membership "
                       "inference and pre-memorization accuracy (paper sec. 5, app. D) of checkpoints side by side; "
                       "writes RUN/analysis/NAME.json and per-sample JSONL, and resumes. Settings: --set analysis.*")
    p.add_argument("run", help="run folder (its config.yaml gives model and data)")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="names under RUN/checkpoints (epoch-0 = base model) or model/adapter folders")
    p.add_argument("--suite", default="ood,robustness,diversity,calibration,mia,premem",
                   help="comma-separated analyses (default: all six)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set analysis.mia.size=200 (repeatable)")
    p.add_argument("--data-dir", help="local data folder laid out like the datasets' own (env: OVERMEM_DATA_DIR)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="offline quickstart on the built-in synthetic task", epilog=_EPILOG,
                       description="Pretrain (cached) and finetune a tiny model on the synthetic task on the CPU, "
                       "tracking every epoch; shows over-memorization in minutes.")
    p.add_argument("--out", default="demo-run", help="run folder (default: ./demo-run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=50, help="finetuning epochs (default: 50)")
    # --epochs and --pretrain-steps are kept equal to demo.DEMO_EPOCHS and demo.DEMO_PRETRAIN.steps
    # (the demo module, which imports torch, loads lazily; tests/test_demo.py checks).
    p.add_argument("--pretrain-steps", type=int, default=1500, metavar="N",
                   help="optimizer steps of the tiny base's pretraining, done once per N and cached (default: 1500, "
                   "8-11 min once on 2 cores; 600 take about 5 min and give a weaker base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo's run config, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", help="one self-contained HTML report of one or more runs", epilog=_EPILOG,
                       description="Dynamics with phases, checkpoint selection, token-level losses of a healthy and "
                       "an over-memorized checkpoint, analyses, merges, timings, config and versions, in one HTML file "
                       "that opens offline. Several runs (e.g. a learning-rate sweep) are overlaid and compared.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    p.add_argument("--out", help="HTML file (default: RUN/report.html of the first run)")
    p.add_argument("--example", metavar="ID", help="test example shown first in the token view")
    p.add_argument("--examples", type=int, default=6, metavar="N", help="test examples in the token view (default 6)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="versions, device, dtype support and optional extras", epilog=_EPILOG,
                       description="What this machine can run: package versions, CUDA/MPS/CPU devices and memory, "
                       "bf16/fp16 support (tested with a tiny op), CPU threads, and which optional extras are "
                       "installed, with the command that installs the missing ones.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_pretrain, run_demo

    run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs, quiet=args.quiet, overrides=args.overrides,
             pretrain=demo_pretrain(args.pretrain_steps))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.runs, args.out, example=args.example, n_examples=args.examples, quiet=args.quiet)
    print(f"wrote {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from .doctor import diagnose, format_report

    found = diagnose()
    print(json.dumps(found, indent=2) if args.json else format_report(found))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if os.environ.get("OVERMEM_DEBUG"):
            raise
        print(f"overmem {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"overmem {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
