#!/usr/bin/env bash
# Gather the wheels scripts/gpu_check.sh needs on a GPU machine without network whose Python already
# holds torch, transformers, peft, accelerate, datasets and sentence-transformers: overmem itself and
# every package it needs beyond those (and beyond what they need), at the tested versions
# (constraints.txt), for the target's Python and platform.
#
#   bash scripts/gpu_wheels.sh [--out DIR] [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--list]
#
# --list prints the packages it would fetch, and fetches nothing.
#
# Then copy DIR to that machine and run `bash scripts/gpu_check.sh --wheels DIR` there.
# Run it here with network, from the environment scripts/setup.sh made (./.venv, or PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."

out="gpu-wheels"
list_only=0
pyver=""
platforms=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --python-version) pyver="$2"; shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    --list) list_only=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || { echo "gpu_wheels: $py not found; run scripts/setup.sh first or set PYTHON" >&2; exit 2; }
pyver="${pyver:-$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
if [ ${#platforms[@]} -eq 0 ]; then
  platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
fi
# What overmem requires beyond the preinstalled packages and their own direct requirements (which any
# version of them brings), closed over its requirements (as installed here) less those same packages;
# each at its version in constraints.txt (else the installed one). Direct requirements only, since
# deeper ones differ between versions (transformers here pulls pydantic in; another may not).
mapfile -t needed < <("$py" - <<'EOF'
import importlib.metadata as md
import re
from packaging.requirements import Requirement

PREINSTALLED = ["torch", "transformers", "peft", "accelerate", "datasets", "sentence-transformers"]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()

def closure(names):
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen

def direct(name):
    return {norm(Requirement(r).name) for r in md.requires(name) or []
            if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})}

there = {norm(n) for n in PREINSTALLED}
for name in PREINSTALLED:
    there |= direct(name)
own = {norm(Requirement(r).name) for r in md.requires("overmem") or []
       if Requirement(r).marker is None}
pins = {}
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
    if m:
        pins[norm(m.group(1))] = m.group(2)
for name in sorted(closure(own - there) - there):
    try:
        version = pins.get(name) or md.version(name)
    except md.PackageNotFoundError:
        raise SystemExit(f"gpu_wheels: {name} is needed but not installed here; run scripts/setup.sh first")
    print(f"{name}=={version}")
EOF
)
if [ "$list_only" = 1 ]; then printf '%s\n' "${needed[@]}"; exit 0; fi
echo "overmem needs beyond the preinstalled packages: ${needed[*]}"
mkdir -p "$out"
plat_args=()
for p in "${platforms[@]}"; do plat_args+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${plat_args[@]}" -d "$out" "${needed[@]}"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
echo "wrote $(ls "$out" | wc -l) wheels to $out ($(du -sh "$out" | cut -f1)); on the GPU machine:"
echo "  bash scripts/gpu_check.sh --wheels $out"
