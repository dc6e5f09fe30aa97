"""Learning-dynamics figures in the style of the paper's Figure 1 (left).

One panel per split: perplexity of the reference solutions on the left axis, accuracy (with its
bootstrap confidence band) on the right axis, both against epoch. The background is coloured by
the phases of `overmem.phases` (read from one split, the first test split by default, and drawn on
every panel so the other splits can be read at the same training stage) and the over-
memorization onset is a dashed vertical line. Off-curve checkpoints (epoch None, e.g. merges)
are not drawn.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot), so plotting
never needs a display and never changes the process-wide backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .phases import PhaseReport, detect_phases, split_curve, split_names, test_split_names
from .results import FIGURE, atomic_path

PHASE_COLORS: dict[str, str] = {
    "low_accuracy": "#262626",  # the paper's black region
    "healthy": "#f2c80f",  # yellow
    "over_memorized": "#7b3fbf",  # purple
    "overfitting": "#d62728",  # red
    "high_ppl": "#c6b3e6",  # light purple: ppl elevated, accuracy not measured
    "low_ppl": "#d9d9d9",  # light grey: ppl not elevated, accuracy not measured
}
PHASE_ALPHA = 0.28
PPL_COLOR = "#1f4e9c"
ACC_COLOR = "#e06c00"
ONSET_COLOR = "#4b1d80"
PANEL_SIZE = (4.8, 3.6)  # inches per split panel
LEGEND_HEIGHT = 0.8  # inches below the panels for the shared legend
MAX_COLUMNS = 3
DPI = 120
FORMATS = ("png", "svg")  # each figure's files
SIGNALS = "signals"  # signals.png and signals.svg


def figure_size(n_panels: int) -> tuple[float, float]:
    """Figure size in inches for `n_panels` panels (the PNG is this times `DPI` pixels)."""
    rows, cols = _grid_shape(n_panels)
    return PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + LEGEND_HEIGHT


def _grid_shape(n_panels: int) -> tuple[int, int]:
    """As few rows as MAX_COLUMNS allows, then as few columns as fit (4 panels -> 2 x 2)."""
    rows = math.ceil(n_panels / MAX_COLUMNS)
    return rows, math.ceil(n_panels / rows)


def plot_dynamics(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    phase_report: PhaseReport | None = None,
    title: str | None = None,
    log_ppl: bool = False,
    name: str = FIGURE,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Draw one run's dynamics; save `<name>.png` and `<name>.svg` (`formats`) in `out_dir` and return
    their paths.

    Without `phase_report` the phases are detected on the first test split with the default
    rule; with no test split the background stays white.
    """
    splits = _plotted_splits([rows])
    if phase_report is None and test_split_names(rows):
        phase_report = detect_phases(rows)
    fig, axes = _grid(len(splits))
    for ax, split in zip(axes, splits):
        acc_ax = ax.twinx()
        _draw_split(ax, acc_ax, split_curve(rows, split), PPL_COLOR, ACC_COLOR, log_ppl=log_ppl)
        if phase_report is not None:
            _shade_phases(ax, phase_report)
        _label_panel(ax, acc_ax, split + (" (phases)" if phase_report and split == phase_report.split else ""))
    handles = [
        Line2D([], [], color=PPL_COLOR, marker="o", label="perplexity (mean per example)"),
        Line2D([], [], color=ACC_COLOR, marker="s", label="accuracy"),
        Patch(color=ACC_COLOR, alpha=0.2, label="accuracy 95% CI"),
    ]
    if phase_report is not None:
        present = dict.fromkeys(c.label for c in phase_report.checkpoints)
        handles += [Patch(color=PHASE_COLORS[p], alpha=PHASE_ALPHA, label=p.replace("_", " ")) for p in present]
        if phase_report.onset:
            handles.append(Line2D([], [], color=ONSET_COLOR, ls="--", label=f"onset ({phase_report.onset})"))
    default = "Learning dynamics" + (f": phases from {phase_report.split}" if phase_report else "")
    fig.suptitle(title or default)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False, fontsize=8)
    return _save(fig, Path(out_dir), name, formats)


SIGNAL_STYLES = {  # dynamics.jsonl key -> (label, colour); see overmem.backend_api for the definitions
    "top1_token": ("reference tokens that are the greedy choice", "#2a9d8f"),
    "entropy_token": ("predictive entropy at reference tokens (nats)", "#9c2a6b"),
    "rank_token": ("mean rank of reference tokens (log)", "#6b6b6b"),
}


def has_signals(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some training-curve row holds the cheap signals (both backends' scoring gives the
    greedy agreement and rank; the entropy comes from the Hugging Face one alone)."""
    return any(r.get("top1_token") is not None and r.get("epoch") is not None for r in rows)


def plot_signals(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    phase_report: PhaseReport | None = None,
    name: str = SIGNALS,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """The cheap signals of the scoring pass against epoch, one panel per split: the share of
    reference tokens that are the greedy choice (left axis), the predictive entropy at them and
    their mean rank (two right axes), over the phases of `phase_report` as in `plot_dynamics`.
    Saves `<name>.png` and `<name>.svg` (`formats`) in `out_dir`; returns their paths."""
    splits = [s for s in _plotted_splits([rows]) if has_signals(split_curve(rows, s))]
    if not splits:
        raise ValueError("no row holds the token signals (top1_token ...): scored by an overmem older than "
                         "these signals")
    if phase_report is None and test_split_names(rows):
        phase_report = detect_phases(rows)
    shown = [k for k in SIGNAL_STYLES if any(r.get(k) is not None for r in rows)]  # no entropy from vLLM
    fig, axes = _grid(len(splits))
    for ax, split in zip(axes, splits):
        curve = [r for r in split_curve(rows, split) if r.get("top1_token") is not None]
        epochs = [r["epoch"] for r in curve]
        right = ax.twinx()
        rank_ax = ax.twinx()
        rank_ax.spines["right"].set_position(("axes", 1.16))
        for axis, key in ((ax, "top1_token"), (right, "entropy_token"), (rank_ax, "rank_token")):
            if key not in shown:
                axis.set_visible(False)
                continue
            label, color = SIGNAL_STYLES[key]
            axis.plot(epochs, [math.nan if r.get(key) is None else r[key] for r in curve], color=color, marker="o",
                      ms=3, lw=1.5, zorder=3, ls="-" if axis is not rank_ax else ":")
            axis.tick_params(axis="y", which="both", colors=color, labelsize=7)
        rank_ax.set_yscale("log")
        ax.set_ylim(0, 1)
        ax.set_ylabel("greedy agreement", color=SIGNAL_STYLES["top1_token"][1])
        right.set_ylabel("entropy (nats)", color=SIGNAL_STYLES["entropy_token"][1])
        if phase_report is not None:
            _shade_phases(ax, phase_report)
        ax.set_title(split + (" (phases)" if phase_report and split == phase_report.split else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.25, lw=0.5)
    handles = [Line2D([], [], color=c, marker="o", ls=":" if k == "rank_token" else "-", label=label)
               for k, (label, c) in SIGNAL_STYLES.items() if k in shown]
    if phase_report is not None and phase_report.onset:
        handles.append(Line2D([], [], color=ONSET_COLOR, ls="--", label=f"onset ({phase_report.onset})"))
    fig.suptitle("Reference tokens under the model: greedy agreement, entropy, rank")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    return _save(fig, Path(out_dir), name, formats)


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    title: str | None = None,
    log_ppl: bool = False,
    name: str = "runs",
) -> list[Path]:
    """Overlay several runs (label -> dynamics rows): perplexity solid, accuracy dashed, one
    colour per run, each run's over-memorization onset (default rule, first test split) dotted.
    Saves `<name>.png` and `<name>.svg` in `out_dir`; returns both paths."""
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    splits = _plotted_splits(list(runs.values()))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    fig, axes = _grid(len(splits))
    for ax, split in zip(axes, splits):
        acc_ax = ax.twinx()
        for color, rows in zip(colors, runs.values()):
            if split in split_names(rows):
                _draw_split(ax, acc_ax, split_curve(rows, split), color, color, log_ppl=log_ppl, acc_style="--")
            onset = _onset_epoch(rows)
            if onset is not None:
                ax.axvline(onset, color=color, ls=":", lw=1.5)
        _label_panel(ax, acc_ax, split, "0.2", "0.2")
    handles = [Line2D([], [], color=c, lw=2, label=label) for c, label in zip(colors, runs)]
    handles += [
        Line2D([], [], color="0.3", ls="-", label="perplexity"),
        Line2D([], [], color="0.3", ls="--", label="accuracy"),
        Line2D([], [], color="0.3", ls=":", label="over-memorization onset"),
    ]
    fig.suptitle(title or "Learning dynamics of several runs")
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False, fontsize=8)
    return _save(fig, Path(out_dir), name)


def _plotted_splits(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Splits with at least one training-curve row in some run, in order of first appearance."""
    names = dict.fromkeys(s for rows in runs for s in split_names(rows) if split_curve(rows, s))
    if not names:
        raise ValueError("no training-curve rows to plot (every row has epoch None, or there are no rows)")
    return list(names)


def _grid(n_panels: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=figure_size(n_panels), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(*_grid_shape(n_panels), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _draw_split(
    ax: Axes, acc_ax: Axes, curve: Sequence[Mapping[str, Any]], ppl_color: str, acc_color: str, *,
    log_ppl: bool, acc_style: str = "-",
) -> None:
    """Perplexity on `ax`, accuracy and its CI band on `acc_ax`, against epoch."""
    epochs = [r["epoch"] for r in curve]
    ax.plot(epochs, [r["ppl"] for r in curve], color=ppl_color, marker="o", ms=3.5, lw=1.6, zorder=3)
    if log_ppl:
        ax.set_yscale("log")
    scored = [r for r in curve if r.get("accuracy") is not None]
    if not scored:
        acc_ax.text(
            0.97, 0.95, "accuracy not measured", transform=acc_ax.transAxes, ha="right", va="top", fontsize=8,
            color="0.3", bbox={"facecolor": "white", "alpha": 0.7, "lw": 0},
        )
        return
    x = [r["epoch"] for r in scored]
    acc_ax.plot(x, [r["accuracy"] for r in scored], color=acc_color, ls=acc_style, marker="s", ms=3.5, lw=1.6, zorder=3)
    band = [r for r in scored if r.get("accuracy_ci_low") is not None and r.get("accuracy_ci_high") is not None]
    if band:
        acc_ax.fill_between(
            [r["epoch"] for r in band], [r["accuracy_ci_low"] for r in band], [r["accuracy_ci_high"] for r in band],
            color=acc_color, alpha=0.2, lw=0,
        )


def _shade_phases(ax: Axes, report: PhaseReport) -> None:
    """Colour the span around each checkpoint of `report` (edges halfway between checkpoints)."""
    epochs = [c.epoch for c in report.checkpoints]
    pad = 0.03 * (epochs[-1] - epochs[0]) or 0.5
    edges = [epochs[0] - pad] + [(a + b) / 2 for a, b in zip(epochs, epochs[1:])] + [epochs[-1] + pad]
    for c, lo, hi in zip(report.checkpoints, edges, edges[1:]):
        ax.axvspan(lo, hi, color=PHASE_COLORS[c.label], alpha=PHASE_ALPHA, lw=0, zorder=0)
    ax.set_xlim(edges[0], edges[-1])
    if report.onset:
        ax.axvline(report.get(report.onset).epoch, color=ONSET_COLOR, ls="--", lw=1.5, zorder=2)


def _label_panel(ax: Axes, acc_ax: Axes, title: str, ppl_color: str = PPL_COLOR, acc_color: str = ACC_COLOR) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity", color=ppl_color)
    acc_ax.set_ylabel("accuracy", color=acc_color)
    acc_ax.set_ylim(0, 1)
    ax.grid(alpha=0.25, lw=0.5)


def _onset_epoch(rows: Sequence[Mapping[str, Any]]) -> float | None:
    if not test_split_names(rows):
        return None
    report = detect_phases(rows)
    return None if report.onset is None else report.get(report.onset).epoch


def _save(fig: Figure, out_dir: Path, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """`<name>.<format>` for each format (PNG and SVG), each written whole or not at all (temp file +
    rename)."""
    paths = [out_dir / f"{name}.{fmt}" for fmt in formats]
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format=path.suffix[1:])
        fig.set_layout_engine("none")  # the first save placed the axes: the second keeps them
    return paths
