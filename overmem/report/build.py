"""`overmem report`: one self-contained HTML page built from run folders' results files only.

Read: `config.yaml`, `dynamics.jsonl`, `phases.json`, `selection.json`, `keep.json`, `samples/`,
`analysis/*.json`, `timings.json`, `environment.json`. Whatever a run lacks is left out of its page;
only a run without `phases.json` (e.g. one tracked by the training callback) has its phases detected
here, by the function `overmem run` writes them with. With several runs the page starts with their
curves overlaid and a comparison table, then shows each run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, config_from_dict, read_yaml
from ..files import missing_folder, read_text
from ..phases import PHASES, PhaseReport, detect_run_phases
from ..plotting import SIGNALS, has_signals, plot_dynamics, plot_runs, plot_signals
from ..results import FIGURE, RunDir, atomic_write_text, read_json
from ..selection import Keep, checkpoint_to_keep, select_run_checkpoint, selectable
from .html import (
    Section, details, esc, fmt, image_file, kv_table, note, page, pct, phase_chip, pre, render_sections, table,
)
from .tokens import token_view


@dataclass
class RunResults:
    """Everything the report reads from one run folder (None / empty where a file is absent)."""

    root: Path
    label: str
    rows: list[dict[str, Any]]
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    settings: RunConfig = field(default_factory=RunConfig)  # `config`, validated (defaults without one)
    phases: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    timings: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] | None = None
    keep: dict[str, Any] | None = None  # what OverMemorizationCallback recorded at the onset
    analyses: list[tuple[Path, dict[str, Any] | str]] = field(default_factory=list)  # data, or why unreadable
    drawn: list[Path] = field(default_factory=list)  # figures just drawn from these rows (`write_report`'s `drawn`)

    @classmethod
    def load(cls, root: str | Path, label: str | None = None) -> RunResults:
        run = RunDir(root)
        if not run.root.is_dir():
            raise missing_folder(run.root, "run folder")
        rows = run.read_dynamics(strict=True)  # a torn line, a NaN or a negative value is an error, not left out
        if not rows:
            raise FileNotFoundError(f"{run.dynamics}: no dynamics rows; run `overmem run` or `overmem scan` first")
        out = cls(run.root, label or run.root.name, rows, timings=run.read_timings())
        if run.config.exists():
            out.config_text = read_text(run.config)
            out.config = read_yaml(run.config)
            out.settings = config_from_dict(out.config, str(run.config))
        out.phases = run.read_json(run.phases)
        out.selection = run.read_json(run.selection)
        out.derive_missing()
        out.environment = run.read_json(run.environment)
        out.keep = run.read_json(run.keep)
        for path in sorted(run.analysis_dir.glob("*.json")):
            try:
                data = read_json(path)
                out.analyses.append((path, data if isinstance(data, dict) else "not a JSON object"))
            except (OSError, ValueError) as err:
                out.analyses.append((path, f"unreadable: {err}"))
        return out

    def setting(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def derive_missing(self) -> None:
        """Phases and selection where the run has no `phases.json` / `selection.json` (e.g. a run of
        the training callback), by the functions `overmem run` writes them with."""
        try:
            if self.phases is None:
                self.phases = detect_run_phases(self.rows, self.settings).to_dict()
            if self.selection is None and selectable(self.rows, self.settings.selection.valid_split):
                self.selection = select_run_checkpoint(self.rows, self.settings).to_dict()
        except ValueError:  # no training-curve rows to label or select from
            pass

    def checkpoint_to_keep(self) -> Keep | None:
        """The checkpoint to keep by the run's selection settings (`overmem.selection.checkpoint_to_keep`),
        None without phases or when the rule has no curve to read."""
        if not self.phases:
            return None
        s = self.settings.selection
        try:
            return checkpoint_to_keep(self.rows, phase_split=self.phases["split"], valid_split=s.valid_split,
                                      ppl_band=s.ppl_band)
        except ValueError:
            return None


def write_report(
    runs: Sequence[str | Path], out: str | Path | None = None, *, example: str | None = None, n_examples: int = 6,
    drawn: Mapping[str | Path, Sequence[Path]] | None = None,
) -> Path:
    """Write the report of one or more runs; default `<first run>/report.html`. Returns its path.

    `drawn`: per run folder, the figures (`plot_dynamics`, `plot_signals`) its caller has just drawn
    from the same `dynamics.jsonl` (`overmem run` at its end); the page embeds those instead of
    drawing them again. Without it, each run's figures are drawn afresh: files already in a run
    folder may be older than its rows."""
    if not runs:
        raise ValueError("report: give at least one run folder")
    labels = _labels([Path(r) for r in runs])
    results = [RunResults.load(r, label) for r, label in zip(runs, labels)]
    given = {Path(root).resolve(): [Path(f) for f in files] for root, files in (drawn or {}).items()}
    for res in results:
        res.drawn = given.get(res.root.resolve(), [])
    path = Path(out) if out else RunDir(results[0].root).report
    atomic_write_text(path, build_report(results, example=example, n_examples=n_examples))
    return path


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, or longer paths where names repeat."""
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def build_report(results: Sequence[RunResults], *, example: str | None = None, n_examples: int = 6) -> str:
    """The HTML text of the report."""
    many = len(results) > 1
    nav, body = [], []
    if many:
        comparison = Section("comparison", "Comparison of runs", comparison_body(results))
        nav.append(comparison)
        body.append(render_sections([comparison]))
    for i, res in enumerate(results):
        sections = run_sections(res, f"r{i}", example=example, n_examples=n_examples, nested=many)
        if many:
            head = Section(f"r{i}", f"Run {res.label}", f'<p class="run-title">{esc(res.root)}</p>')
            nav.append(head)
            body.append(render_sections([head, *sections]))
        else:
            nav += sections
            body.append(render_sections(sections))
    title = "overmem report: " + (f"{len(results)} runs" if many else results[0].label)
    subtitle = f"generated {time.strftime('%Y-%m-%d %H:%M')} from " + ", ".join(str(r.root) for r in results)
    return page(title, subtitle, nav, "".join(body))


def run_sections(
    res: RunResults, prefix: str, *, example: str | None, n_examples: int, nested: bool = False,
) -> list[Section]:
    """The sections of one run, in reading order; absent parts are left out."""
    level = 3 if nested else 2
    sections = [
        Section(f"{prefix}-summary", "Summary", summary_body(res)),
        Section(f"{prefix}-dynamics", "Learning dynamics", dynamics_body(res)),
    ]
    if res.selection:
        sections.append(Section(f"{prefix}-selection", "Checkpoint selection (paper Table 4)", selection_body(res)))
    tokens = token_view(res.root, res.phases, res.checkpoint_to_keep(), f"{prefix}-tokens", n=n_examples,
                        first=example)
    if tokens:
        sections.append(Section(f"{prefix}-tokens", "Token-level losses (paper Figure 1, right)", tokens))
    merges = merges_body(res)
    if merges:
        sections.append(Section(f"{prefix}-merges", "Mitigation: merged checkpoints", merges))
    for k, (path, data) in enumerate(res.analyses):
        name = data.get("analysis", path.stem) if isinstance(data, dict) else path.stem
        body = analysis_body(res.root, data) if isinstance(data, dict) else note(f"{path.name}: {data}")
        sections.append(Section(f"{prefix}-analysis-{k}", f"Analysis: {name}", body))
    sections.append(Section(f"{prefix}-timings", "Wall times", timings_body(res)))
    sections.append(Section(f"{prefix}-setup", "Config, versions and hardware", setup_body(res)))
    for s in sections:
        s.level = level
    return sections


# ---- one run -----------------------------------------------------------------------------------


def summary_body(res: RunResults) -> str:
    """The phase rule's paragraph and the run's landmarks."""
    splits = list(dict.fromkeys(r["split"] for r in res.rows))
    ckpts = list(dict.fromkeys(r["checkpoint"] for r in res.rows))
    facts: dict[str, Any] = {"checkpoints evaluated": len(ckpts), "splits": ", ".join(splits)}
    text = ""
    if res.phases:
        p = res.phases
        facts["phases read from"] = p["split"]
        facts["over-memorization onset"] = p.get("onset") or "none"
        if p.get("acc_best") is not None:
            facts[f"best {p['split']} accuracy"] = f"{p['acc_best']:.3f} ({p['acc_best_checkpoint']})"
        facts[f"lowest {p['split']} perplexity"] = f"{p['ppl_min']:.4g} ({p['ppl_min_checkpoint']})"
        text = f'<p class="summary">{esc(p.get("summary", ""))}</p>'
    if res.keep:
        facts["callback: onset seen during training"] = res.keep.get("onset")
        facts["callback: checkpoint to keep"] = res.keep.get("keep") or "none healthy"
    if res.selection:
        rec = res.selection["choices"]["recommended"]
        facts["recommended checkpoint"] = rec["checkpoint"]
        facts["its mean test accuracy"] = fmt(rec.get("mean_test_accuracy"), 3)
    return text + kv_table(facts)


def dynamics_body(res: RunResults) -> str:
    """The dynamics figure (the one just drawn from `dynamics.jsonl`, `RunResults.drawn`, or drawn
    afresh from it) and each checkpoint's phase."""
    report = PhaseReport.model_validate(res.phases) if res.phases else None
    drawn = {p.name: p for p in res.drawn}

    def png(plot: Any, name: str, tmp: str) -> Path:
        return drawn.get(f"{name}.png") or plot(res.rows, tmp, phase_report=report, formats=("png",))[0]

    try:
        with tempfile.TemporaryDirectory() as tmp:
            fig = image_file(png(plot_dynamics, FIGURE, tmp),
                             "learning dynamics: perplexity and accuracy against epoch, per split")
            if has_signals(res.rows):
                fig += image_file(png(plot_signals, SIGNALS, tmp),
                                  "reference tokens: greedy agreement, entropy and rank against epoch, per split")
    except ValueError as err:
        fig = note(f"No figure: {err}")
    if not res.phases:
        return fig + note("No phases: the phase split has no training-curve rows to label.")
    cps = res.phases["checkpoints"]
    rows = [
        [esc(c["checkpoint"]), fmt(c["epoch"]), fmt(c["ppl"]), f"{c['ppl_ratio']:.2f}", fmt(c["accuracy"], 3),
         fmt(c["acc_drop"], 3), phase_chip(c["label"])]
        for c in cps
    ]
    legend = " ".join(phase_chip(p) for p in PHASES if any(c["label"] == p for c in cps))
    cols = ["checkpoint", "epoch", "ppl", "ppl / min so far", "accuracy", "drop from best so far", "phase"]
    return (fig + f"<p>Phases on <b>{esc(res.phases['split'])}</b> (rule: {esc(_rule_text(res.phases))}): {legend}</p>"
            + table(cols, rows, raw=True))


def _rule_text(phases: Mapping[str, Any]) -> str:
    r = phases.get("rule", {})
    return (f"over-memorized when ppl ≥ (1 + {r.get('eps')}) × its minimum so far while accuracy stays within "
            f"{r.get('delta')} of its best so far; learned at {r.get('learn_frac')} × best accuracy")


def selection_body(res: RunResults) -> str:
    """`selection.json` as the paper's Table 4, the recommended row highlighted."""
    sel = res.selection
    assert sel is not None
    valid, tests = sel["valid_split"], sel["test_splits"]
    cols = ["criterion", "checkpoint", "epoch", f"{valid} ppl", f"{valid} acc %"]
    for s in tests:
        cols += [f"{s} acc % [95% CI]", f"{s} ppl"]
    cols += ["mean test acc %", "why"]
    rows, classes = [], []
    for c in [*sel["choices"].values(), *sel.get("others", [])]:
        cells = [esc(c["criterion"]), esc(c["checkpoint"]), fmt(c.get("epoch")), fmt(c["valid"].get("ppl")),
                 pct(c["valid"].get("accuracy"))]
        for s in tests:
            f = c["tests"].get(s, {})
            ci = (f" [{pct(f['accuracy_ci_low'])}, {pct(f['accuracy_ci_high'])}]"
                  if f.get("accuracy_ci_low") is not None else "")
            cells += [pct(f.get("accuracy")) + ci, fmt(f.get("ppl"))]
        cells += [pct(c.get("mean_test_accuracy")), f'<span class="reason">{esc(c["reason"])}</span>']
        rows.append(cells)
        classes.append("recommended" if c["criterion"] == "recommended" else "")
    band = sel.get("ppl_band")
    intro = (f"<p>The recommended rule (paper sec. 6.1): the highest {esc(valid)} accuracy among checkpoints whose "
             f"{esc(valid)} perplexity is within {fmt(band)} (relative) of its minimum; highlighted. The other rows "
             "are what the usual rules would pick, with their test figures.</p>")
    if sel.get("rule", "ppl_band") != "ppl_band":  # no validation accuracy (open-ended answers)
        intro = (f"<p>{esc(valid)} has no accuracy (open-ended answers have no automatic check, or generation was "
                 f"skipped), so the recommended checkpoint (highlighted) falls back to the lowest {esc(valid)} "
                 "perplexity. The other rows are what the usual rules would pick, with their test figures.</p>")
    return intro + table(cols, rows, raw=True, row_classes=classes)


def merges_body(res: RunResults) -> str | None:
    """Each merged checkpoint beside the checkpoints it merges (paper sec. 6.2, eq. 1)."""
    merges = list(dict.fromkeys(r["checkpoint"] for r in res.rows if r["checkpoint"].startswith("merge(")))
    if not merges:
        return None
    splits = list(dict.fromkeys(r["split"] for r in res.rows))
    by = {(r["checkpoint"], r["split"]): r for r in res.rows}
    cols = ["checkpoint"] + [f"{s} {k}" for s in splits for k in ("ppl", "acc %")]
    parts = []
    for m in merges:
        members = [part.split(":")[0] for part in m[len("merge("):-1].split(",")]
        rows, classes = [], []
        for ck in [m, *members]:
            cells = [ck]
            for s in splits:
                r = by.get((ck, s), {})
                cells += [fmt(r.get("ppl")), pct(r.get("accuracy"))]
            rows.append(cells)
            classes.append("recommended" if ck == m else "")
        parts.append(table(cols, rows, row_classes=classes, caption=m))
    return ("<p>Merged models, theta_base + mean_i (theta_i − theta_base), next to the checkpoints they average.</p>"
            + "".join(parts))


def analysis_body(root: Path, data: Mapping[str, Any]) -> str:
    """Any analysis result: {"analysis", "description", "settings", "checkpoints": {ckpt: {metric:
    value}}, "table": {"columns", "rows"}, "figures": [paths relative to the run]}; absent parts are
    skipped. The summary table comes first; every per-checkpoint metric (one row per metric, one
    column per checkpoint) follows, folded away when there is a summary table."""
    parts = []
    if isinstance(data.get("description"), str):
        parts.append(f"<p>{esc(data['description'])}</p>")
    tab = data.get("table")
    summary = isinstance(tab, Mapping) and bool(tab.get("rows"))
    if summary:
        parts.append(table(tab.get("columns") or [], tab["rows"]))
    per_ckpt = data.get("checkpoints")
    if isinstance(per_ckpt, Mapping) and per_ckpt:
        metrics = list(dict.fromkeys(m for v in per_ckpt.values() if isinstance(v, Mapping) for m in v))
        rows = [[m, *[(v.get(m) if isinstance(v, Mapping) else None) for v in per_ckpt.values()]] for m in metrics]
        detail = table(["metric", *per_ckpt], rows)
        parts.append(details("every metric per checkpoint", detail) if summary else "<h4>Per checkpoint</h4>" + detail)
    if data.get("settings"):
        parts.append(details("settings", kv_table(data["settings"])))
    figures = []
    for rel in data.get("figures") or []:
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()):
            parts.append(note(f"{rel}: outside the run folder; not embedded"))
        elif not path.is_file():
            parts.append(note(f"{rel}: figure file not found"))
        else:
            try:
                figures.append(image_file(path, f"{data.get('analysis', '')}: {rel}"))
            except ValueError as err:
                parts.append(note(str(err)))
    if figures:
        parts.append(f'<div class="figures">{"".join(figures)}</div>')
    return "".join(parts) or note("This analysis file has no settings, table or figures.")


def timings_body(res: RunResults) -> str:
    """Stage wall times (`timings.json`) and evaluation time per checkpoint and split."""
    parts = []
    if res.timings:
        totals: dict[str, list[Any]] = {}
        for t in res.timings:
            entry = totals.setdefault(t["stage"], [0.0, 0, t.get("note", "")])
            entry[0] += t["seconds"]
            entry[1] += 1
        parts.append(table(["stage", "wall time", "times run", "note"],
                           [[s, _duration(v[0]), v[1], v[2]] for s, v in totals.items()],
                           caption="Stages (timings.json; a resumed run adds to them)"))
    timed = [r for r in res.rows if r.get("seconds") is not None]
    if timed:
        splits = list(dict.fromkeys(r["split"] for r in timed))
        by: dict[str, dict[str, float]] = {}
        for r in timed:
            by.setdefault(r["checkpoint"], {})[r["split"]] = r["seconds"]
        rows = [[ck, *[_duration(v.get(s)) for s in splits], _duration(sum(v.values()))] for ck, v in by.items()]
        total = sum(r["seconds"] for r in timed)
        parts.append(table(["checkpoint", *splits, "total"], rows,
                           caption=f"Evaluation per checkpoint (scoring + generation): {_duration(total)} in all"))
    return "".join(parts) or note("No wall times recorded.")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def setup_body(res: RunResults) -> str:
    """Main settings, the resolved config, and the versions and hardware of `environment.json`."""
    parts = []
    if res.config:
        t = res.config.get("train", {})
        facts = {"model": res.setting("model.name_or_path"), "method": t.get("method"), "loss": t.get("loss"),
                 "learning rate": t.get("lr"), "epochs": t.get("epochs"), "batch size": t.get("batch_size"),
                 "training data": res.setting("data.train")}
        parts.append(kv_table(facts) + details("the resolved config (config.yaml)", pre(res.config_text or "")))
    else:
        parts.append(note("No config.yaml in the run folder."))
    env = res.environment
    if env:
        hw = env.get("hardware", {})
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in hw.get("gpus", [])) or "none"
        versions = {k: v or "not installed" for k, v in env.get("versions", {}).items()}
        parts.append("<h4>Versions</h4>" + kv_table(versions))
        parts.append("<h4>Hardware</h4>" + kv_table({
            "device": hw.get("device"), "GPUs": gpus, "CPU": hw.get("cpu"), "logical cores": hw.get("cpu_count"),
            "torch threads": hw.get("torch_threads"), "memory (GiB)": hw.get("memory_gib"),
            "platform": hw.get("platform"), "command": " ".join(env.get("argv", [])),
        }))
    else:
        parts.append(note("Versions and hardware were not recorded (environment.json is written by `overmem run` "
                          "and `overmem scan`)."))
    return "".join(parts)


# ---- several runs ------------------------------------------------------------------------------


def comparison_body(results: Sequence[RunResults]) -> str:
    """Curves overlaid, and one table row per run."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_runs({r.label: r.rows for r in results}, tmp)[0]
            fig = image_file(png, "learning dynamics of several runs overlaid")
    except ValueError as err:
        fig = note(f"No figure: {err}")
    cols = ["run", "method", "loss", "lr", "best test acc", "onset", "selected checkpoint", "its mean test acc",
            "last ppl / min ppl"]
    rows = []
    for r in results:
        p, sel = r.phases or {}, r.selection or {}
        rec = sel.get("choices", {}).get("recommended", {})
        best = f"{p['acc_best']:.3f} ({p['acc_best_checkpoint']})" if p.get("acc_best") is not None else None
        last_ratio = p["checkpoints"][-1]["ppl_ratio"] if p.get("checkpoints") else None
        rows.append([r.label, r.setting("train.method"), r.setting("train.loss"), r.setting("train.lr"), best,
                     p.get("onset") or ("none" if p else None), rec.get("checkpoint"),
                     fmt(rec.get("mean_test_accuracy"), 3),
                     None if last_ratio is None else f"{last_ratio:.2f}"])
    differs = [k for k in ("method", "loss") if len({str(r.setting(f"train.{k}")) for r in results}) > 1]
    text = (f"<p>The runs differ in training {' and '.join(differs)}: the table compares these mitigations.</p>"
            if differs else "")
    phase_split = ", ".join(sorted({(r.phases or {}).get("split", "–") for r in results}))
    return (fig + text + table(cols, rows)
            + note(f"Best accuracy, onset and perplexity ratio are read on each run's phase split ({phase_split})."))
