"""Dynamics figures: files exist, are valid PNG/SVG, and have the size the layout promises."""

import struct

import pytest

from overmem.phases import detect_phases
from overmem.plotting import DPI, figure_size, plot_dynamics, plot_runs


def curve(split, ppls, accs):
    return [
        {
            "checkpoint": f"epoch-{i}", "epoch": float(i), "step": 10 * i, "split": split, "n": 500,
            "ppl": p, "ppl_token": p, "accuracy": a,
            "accuracy_ci_low": None if a is None else a - 0.02, "accuracy_ci_high": None if a is None else a + 0.02,
        }
        for i, (p, a) in enumerate(zip(ppls, accs))
    ]


def run_rows(scale=1.0):
    return (
        curve("train", [2.5, 1.5, 1.3, 1.2, 1.1, 1.05], [None] * 6)  # accuracy not measured on train
        + curve("validation", [3.0, 1.7, 1.65, 1.70, 1.9, 2.2], [0.42, 0.58, 0.61, 0.63, 0.64, 0.66])
        + curve("test", [x * scale for x in [10, 3, 2.5, 2.8, 4.0, 6.0]], [0.1, 0.6, 0.7, 0.72, 0.71, 0.70])
    )


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def expected_pixels(n_panels):
    w, h = figure_size(n_panels)
    return round(w * DPI), round(h * DPI)


def check_files(paths, n_panels, stem):
    png, svg = paths
    assert (png.name, svg.name) == (f"{stem}.png", f"{stem}.svg")
    assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
    assert png_size(png) == expected_pixels(n_panels)
    assert "<svg" in svg.read_text()[:1000]


def test_plot_dynamics(tmp_path):
    paths = plot_dynamics(run_rows(), tmp_path / "run", title="toy run")
    check_files(paths, 3, "dynamics")
    assert expected_pixels(3) == (1728, 528)  # one row of 3 panels of 4.8 x 3.6 in + 0.8 in legend, 120 dpi


def test_plot_with_given_report_and_log_scale(tmp_path):
    rows = run_rows()
    report = detect_phases(rows, split="validation")
    check_files(plot_dynamics(rows, tmp_path, phase_report=report, log_ppl=True, name="valid"), 3, "valid")


def test_grid_shapes():
    assert figure_size(1) == pytest.approx((4.8, 4.4))
    assert figure_size(4) == pytest.approx((9.6, 8.0))  # 2 x 2, not 3 + 1
    assert figure_size(5) == pytest.approx((14.4, 8.0))


def test_single_checkpoint_and_no_test_split(tmp_path):
    rows = [r for r in run_rows() if r["checkpoint"] == "epoch-0"]
    check_files(plot_dynamics(rows, tmp_path / "one"), 3, "dynamics")
    no_test = [r for r in run_rows() if r["split"] != "test"]  # no phases: white background
    check_files(plot_dynamics(no_test, tmp_path / "two"), 2, "dynamics")


def test_plot_runs(tmp_path):
    runs = {"lr=2e-4": run_rows(), "lr=2e-5": run_rows(scale=0.6)}
    check_files(plot_runs(runs, tmp_path), 3, "runs")


def test_nothing_to_plot(tmp_path):
    merge_only = [dict(r, epoch=None) for r in run_rows()]
    with pytest.raises(ValueError, match="no training-curve rows"):
        plot_dynamics(merge_only, tmp_path, phase_report=None)
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs({}, tmp_path)
