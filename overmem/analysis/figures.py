"""Figures of the analyses that have one: ROC curves (MIA), metric-against-k curves (diversity,
pre-memorization). The reliability diagram lives in `calibration.py`. Each function saves PNG and
SVG beside each other and returns both paths, PNG first. Matplotlib loads on the first figure
(`new_figure`), not with the package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..results import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure of `figsize` inches, drawn off-screen (Agg canvas, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Save `fig` as PATH.png and PATH.svg (folders created), each written whole or not at all
    (an interrupted save leaves no half-written figure that a resume would take as drawn);
    returns both paths."""
    fig.tight_layout()
    base = Path(path)
    # Suffixes are appended: a checkpoint name such as merge(epoch-1:0.25,...) holds dots.
    paths = [base.with_name(f"{base.name}.png"), base.with_name(f"{base.name}.svg")]
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=DPI, format=p.suffix[1:])
    return paths


def figure_exists(png: Path) -> bool:
    """Whether a saved figure is there: its PNG (the path recorded) and the SVG beside it."""
    return png.is_file() and png.with_suffix(".svg").is_file()


def plot_roc(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], float]]], path: str | Path
) -> list[Path]:
    """One panel per attack, one ROC curve per checkpoint: curves[attack][checkpoint] = (fpr, tpr, auroc).

    Log-scaled FPR axis would hide the 5% point on small sets, so both axes are linear.
    """
    attacks = list(curves)
    fig = new_figure((3.6 * len(attacks), 3.6))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(1, len(attacks), i + 1)
        for ckpt, (fpr, tpr, auroc) in curves[attack].items():
            ax.plot(fpr, tpr, label=f"{ckpt} (AUROC {auroc:.3f})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="#7f7f7f", linewidth=0.8)
        ax.axvline(0.05, linestyle=":", color="#7f7f7f", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(attack)
        ax.set_xlabel("false positive rate")
        if i == 0:
            ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str = "",
) -> list[Path]:
    """One panel per metric, one line per checkpoint: panels[metric][checkpoint] = (x, y)."""
    names = list(panels)
    fig = new_figure((4.0 * len(names), 3.6))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for label, (x, y) in panels[name].items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        if ylabel and i == 0:
            ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return save_figure(fig, path)
