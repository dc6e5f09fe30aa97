"""`overmem analyze`: run the registered analyses over a run's checkpoints, resumably.

    analyze(run_dir, ["epoch-3", "epoch-10", "path/to/merged"], ["ood", "mia"], cfg)

Checkpoints are names under RUN/checkpoints/, `epoch-0` (the base model, unless such a folder
exists), or model / adapter folders anywhere (named by their folder name). The analyses are
`ANALYSES` (`overmem.analysis.base`): ood, robustness, diversity, calibration, mia, premem, judge; their
settings are the `analysis` section of the run config, one entry per analysis.

Files, per analysis NAME:

    RUN/analysis/NAME.json                aggregates, written atomically after each checkpoint
    RUN/analysis/NAME/<checkpoint>.jsonl  one row per sample (query, example, generation)
    RUN/analysis/<figures>                PNG (+ SVG beside it) where the analysis has a figure

NAME.json:

    {"analysis": NAME,
     "description": "...",
     "settings": {...},                      every setting used, data specs resolved
     "checkpoints": {ckpt: {metric: value}}, in training order; "epoch" and "step" included
     "table": {"columns": ["checkpoint", ...], "rows": [[ckpt, value, ...], ...]},
     "figures": ["analysis/mia_roc.png", ...],   paths relative to RUN (PNG; an SVG lies beside each)
     "figures_of": [ckpt, ...],             the checkpoints the figures show (analyses with figures)
     "samples": {ckpt: "analysis/NAME/ckpt.jsonl"}}

plus what an analysis's `finish` adds (premem: "r2", PM against test accuracy across runs or null
with the reason, and "ranking", the path of the exported ranking of training examples). Values
are numbers, strings, lists or null; undefined numbers (NaN) are written as null.

Resuming: a checkpoint listed in NAME.json whose samples file exists is done and is skipped.
The samples file is written (atomically) before NAME.json lists the checkpoint, so an
interruption leaves at most a samples file that the next run overwrites. Figures are drawn once
per invocation, after the last checkpoint, and redrawn by the next invocation if one was cut short. NAME.json records the
settings; analysing more checkpoints with different settings is refused with the setting named.
Everything that can fail on bad input (analysis names, checkpoints, data, settings) is checked
before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..backends import load_for_eval
from ..config import ConfigError, RunConfig
from ..models import load_tokenizer, quiet_libraries, release_memory
from ..results import ANALYSIS_DIR, Checkpoint, RunDir, resolve_checkpoints, write_json, write_jsonl
from .base import ANALYSES, Analysis, AnalysisResult, Context
from .figures import figure_exists


def analyze(
    run_dir: str | Path, checkpoints: Sequence[str], suite: Sequence[str], cfg: RunConfig
) -> dict[str, dict[str, Any]]:
    """Run each analysis of `suite` on each checkpoint not yet done; returns NAME -> NAME.json content."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"run folder {run.root} not found")
    unknown = [n for n in suite if n not in ANALYSES]
    if unknown or not suite:
        raise ConfigError(f"unknown analysis {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(ANALYSES)}")
    suite = list(dict.fromkeys(suite))
    targets = resolve_checkpoints(run.root, checkpoints)
    ctx = Context(run, cfg)
    quiet_libraries(cfg.quiet)

    # Everything that can fail on bad input, before anything is written.
    analyses = {name: ANALYSES[name](ctx) for name in suite}
    prepared, docs = {}, {}
    for name, analysis in analyses.items():
        prepared[name] = analysis.prepare()
        docs[name] = _open_doc(run, analysis, _clean(prepared[name].settings))

    todo = [(t, name) for t in targets for name in suite if not _done(run, docs[name], t.name)]
    tokenizer, fresh = None, {}
    with tqdm(total=len(todo), desc="analyses", disable=cfg.quiet) as bar:
        for target in targets:
            names = [n for t, n in todo if t is target]
            if not names:
                continue
            tokenizer = tokenizer or load_tokenizer(cfg.model)
            model = load_for_eval(target.path, cfg)  # the backend `eval.backend` names
            for name in names:
                bar.set_postfix_str(f"{target.name} {name}")
                p = prepared[name]
                with tqdm(total=p.total, desc=f"{name} {target.name}", disable=cfg.quiet or not p.total,
                          leave=False) as inner:
                    result = analyses[name].run(p.data, model, tokenizer, inner.update)
                _record(ctx, analyses[name], docs[name], target, result)
                fresh.setdefault(name, set()).add(target.name)
                bar.update()
            del model
            release_memory()
    for name, analysis in analyses.items():
        _draw_figures(ctx, analysis, docs[name], fresh.get(name, set()))
    return docs


def _open_doc(run: RunDir, analysis: Analysis, settings: dict[str, Any]) -> dict[str, Any]:
    """NAME.json's content so far, or a new one; refused if computed with other settings."""
    path = run.analysis_json(analysis.name)
    doc = run.read_json(path)
    fields = {"checkpoints": dict, "settings": dict, "samples": dict, "figures": list}
    if doc is not None and not (isinstance(doc, dict) and all(isinstance(doc.get(k), t) for k, t in fields.items())):
        raise ConfigError(f"{path}: not an analysis file as overmem writes it (edited?); delete it and "
                          f"{ANALYSIS_DIR}/{analysis.name}/ to recompute")
    if doc is not None and doc["checkpoints"]:
        diff = _settings_diff(doc["settings"], settings)
        if diff:
            raise ConfigError(f"{path} was computed with other settings ({diff}); "
                              f"restore them, or delete the file and {ANALYSIS_DIR}/{analysis.name}/ to recompute")
        return doc
    return {"analysis": analysis.name, "description": analysis.description, "settings": settings,
            "checkpoints": {}, "table": {}, "figures": [], "samples": {}}


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    for key in [*new, *[k for k in old if k not in new]]:
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
    return None


def _done(run: RunDir, doc: Mapping[str, Any], checkpoint: str) -> bool:
    return checkpoint in doc["checkpoints"] and run.analysis_samples(doc["analysis"], checkpoint).exists()


def _record(ctx: Context, analysis: Analysis, doc: dict[str, Any], target: Checkpoint, result: AnalysisResult) -> None:
    """Samples first (atomic), then NAME.json with the checkpoint in it (atomic)."""
    write_jsonl(ctx.run.analysis_samples(analysis.name, target.name), _clean(result.rows))
    entries = dict(doc["checkpoints"])
    entries[target.name] = _clean({**result.metrics, "epoch": target.epoch, "step": target.step})
    doc["checkpoints"] = dict(sorted(entries.items(), key=lambda kv: _order_key(kv[1], kv[0])))
    doc["samples"] = {c: ctx.relative(ctx.run.analysis_samples(analysis.name, c)) for c in doc["checkpoints"]}
    analysis.finish(doc)
    doc["table"] = _table(analysis, doc)
    write_json(ctx.run.analysis_json(analysis.name), _clean(doc))


def _order_key(entry: Mapping[str, Any], name: str) -> tuple:
    """Training order: checkpoints with a known step first, by (step, epoch); then the rest by name."""
    step = entry.get("step")
    return (step is None, step or 0, entry.get("epoch") or 0.0, name)


def _table(analysis: Analysis, doc: dict[str, Any]) -> dict[str, Any]:
    cols = analysis.columns(doc["settings"])
    return {"columns": ["checkpoint", *[label for label, _ in cols]],
            "rows": [[ckpt, *[m.get(key) for _, key in cols]] for ckpt, m in doc["checkpoints"].items()]}


def _draw_figures(ctx: Context, analysis: Analysis, doc: dict[str, Any], fresh: set[str]) -> None:
    """Figures once per invocation, after all its checkpoints; also when an interrupted invocation
    left them behind the results (`figures_of` lists the checkpoints the figures show) or a PNG or
    SVG of them is missing."""
    if not doc["checkpoints"]:
        return
    drawn = all(figure_exists(ctx.run.root / f) for f in doc.get("figures", []))
    if not fresh and doc.get("figures_of") == list(doc["checkpoints"]) and drawn:
        return
    figures = analysis.figures(doc, fresh)
    if figures is None:
        return
    doc["figures"] = figures
    doc["figures_of"] = list(doc["checkpoints"])
    write_json(ctx.run.analysis_json(analysis.name), _clean(doc))


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> null, numpy scalars and arrays -> Python values."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_table(doc: Mapping[str, Any], checkpoints: Sequence[str] | None = None) -> str:
    """The analysis table as text, checkpoints side by side (one row each, as in the paper's tables)."""
    table = doc["table"]
    rows = [r for r in table["rows"] if checkpoints is None or r[0] in checkpoints]
    cells = [table["columns"], *[[_cell(v) for v in r] for r in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table["columns"]))]
    lines = [f"{doc['analysis']}: {doc['description']}"]
    for j, row in enumerate(cells):
        lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
