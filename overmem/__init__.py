"""overmem: track learning dynamics while finetuning LLMs on reasoning data, detect
over-memorization (Ruan et al. 2025) and choose the checkpoint to keep."""

__version__ = "0.1.0"

# The library entry points, importable as `overmem.run(cfg)` etc. without importing torch at
# package import time (the CLI's --help stays fast).
_LAZY = {
    "run": "overmem.pipeline", "scan": "overmem.pipeline", "evaluate_model": "overmem.pipeline",
    "finalize": "overmem.pipeline", "load_config": "overmem.config", "RunConfig": "overmem.config",
    "select_checkpoint": "overmem.selection", "detect_phases": "overmem.phases",
    "plot_dynamics": "overmem.plotting", "merge_checkpoints": "overmem.merge",
    "OverMemorizationCallback": "overmem.callback", "run_demo": "overmem.demo",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'overmem' has no attribute {name!r}")
