#!/usr/bin/env bash
# The GPU paths, end to end, in a few minutes: a demo-sized run in bf16 on CUDA with every epoch
# tracked, a `scan` of its checkpoints, an `evaluate`, a `merge` of two checkpoints, and the same run
# under a 1-GPU `torchrun` (NCCL). Prints a table of what passed, with timings; exits 1 if a step failed.
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--work DIR] [--epochs N]
#
# Made for a GPU machine with no network whose Python already holds torch, transformers, peft,
# accelerate, datasets and sentence-transformers: `--wheels DIR` (made beforehand by
# scripts/gpu_wheels.sh) installs overmem and the rest of what it needs from DIR into a virtual
# environment that sees those packages (--system-site-packages), offline. Without a GPU the same
# steps run on the CPU, smaller and in float32, and the table says what was skipped for lack of a
# GPU (bf16 on CUDA, NCCL under torchrun): that is how CI runs it (tests/test_gpu_check.py).
# PYTHON chooses the interpreter (default: ./.venv's if there is one, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

wheels="" work="" epochs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
  echo "gpu_check: --wheels $wheels: not a folder (make it with scripts/gpu_wheels.sh)" >&2; exit 2
fi
case "$epochs" in ''|*[!0-9]*) [ -z "$epochs" ] || { echo "gpu_check: --epochs $epochs: not a whole number" >&2; exit 2; } ;; esac
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
work="${work:-$(mktemp -d "${TMPDIR:-/tmp}/overmem-gpu-check.XXXXXX")}"
mkdir -p "$work"
log="$work/log.txt"
: >"$log"
export OVERMEM_CACHE="$work/cache" PYTHONUNBUFFERED=1

rows=()     # "step|status|seconds|note"
failed=0
step() {    # step NAME NOTE COMMAND...: run COMMAND, timed, its output in the log
  local name="$1" note="$2"; shift 2
  local t0 t1 rc
  echo "== $name: $*" >>"$log"
  t0=$(date +%s.%N)
  "$@" >>"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -eq 0 ]; then rows+=("$name|pass|$secs|$note"); else rows+=("$name|FAIL (exit $rc)|$secs|$note; see $log"); failed=1; fi
  return $rc
}
skip() { rows+=("$1|skipped|-|$2"); }

if [ -n "$wheels" ]; then
  # Into PYTHON's own environment when it is a virtual one, else into a new one that sees its packages.
  if [ "$("$py" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" = 1 ]; then
    step "install from wheels" "$wheels into $("$py" -c 'import sys; print(sys.prefix)'), offline" \
      "$py" -m pip install -q --no-index --find-links "$wheels" overmem
  else
    step "install from wheels" "$wheels into $work/venv (--system-site-packages), offline" \
      bash -c "'$py' -m venv --system-site-packages '$work/venv' && '$work/venv/bin/python' -m pip install -q \
        --no-index --find-links '$wheels' overmem" && py="$work/venv/bin/python"
  fi
  [ $? -eq 0 ] || { echo "gpu_check: the install from $wheels failed (see $log)" >&2; exit 1; }
fi

gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$log" || echo err)
if [ "$gpu" = err ]; then
  echo "gpu_check: $py cannot import torch (see $log)" >&2; exit 2
fi
om=("$py" -m overmem)
if [ "$gpu" = 1 ]; then
  dtype=bfloat16
  demo_sets=()  # the demo's own data sizes
  epochs="${epochs:-8}"
  eval_n=100
else
  dtype=float32
  # Small enough for CI: 24 training problems, 6 per tracked split, short generations.
  demo_sets=(--set "data.train=synthetic:train@24,seed=0" --set data.validation_size=6 --set data.monitor_size=6
             --set data.test_size=6 --set generation.max_new_tokens=40 --set train.batch_size=8
             --set train.micro_batch_size=8)
  epochs="${epochs:-2}"
  eval_n=6
fi

step "doctor" "versions, device, dtypes" "${om[@]}" doctor

demo="$work/demo"
if [ "$gpu" = 1 ]; then note="bf16 on CUDA, $epochs epochs, every epoch tracked"
else note="float32 on the CPU, $epochs epochs, every epoch tracked (bf16 on CUDA skipped: no GPU)"; fi
step "demo-sized run" "$note" "${om[@]}" demo --out "$demo" --epochs "$epochs" -q --set "model.dtype=$dtype" \
  ${demo_sets[@]+"${demo_sets[@]}"}
demo_ok=$?
if [ $demo_ok -eq 0 ]; then
  step "run: tracked rows + dtype" "a row per epoch and split; the checkpoints saved in $dtype" "$py" - "$demo" \
    "$epochs" "$dtype" <<'EOF'
import json, sys
from pathlib import Path
run, epochs, dtype = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [json.loads(line) for line in (run / "dynamics.jsonl").read_text().splitlines() if line.strip()]
want = {(f"epoch-{e}", s) for e in range(epochs + 1) for s in ("train", "validation", "test")}
got = {(r["checkpoint"], r["split"]) for r in rows}
assert got == want, f"dynamics rows {sorted(got)} != {sorted(want)}"
cfg = json.loads((run / "checkpoints" / f"epoch-{epochs}" / "config.json").read_text())
saved = cfg.get("dtype") or cfg.get("torch_dtype")
assert saved == dtype, f"checkpoint dtype {saved}, expected {dtype}"
print("rows", len(rows), "dtype", saved)
EOF
  step "scan" "the run's checkpoints evaluated again into another folder" \
    "${om[@]}" scan "$demo" --config "$demo/config.yaml" --out "$work/scan" -q
  step "evaluate" "the last checkpoint on $eval_n synthetic test problems" \
    "${om[@]}" evaluate --model "$demo/checkpoints/epoch-$epochs" --data synthetic:test --max-examples "$eval_n" \
    --out "$work/evaluate.json" --set "model.dtype=$dtype" -q
  base=$("$py" -c "from overmem.demo import DEMO_PRETRAIN; from overmem.tiny import get_tiny_base; print(get_tiny_base(DEMO_PRETRAIN))")
  step "merge" "the mean of epochs 1 and $epochs over the shipped base, then loaded" bash -c \
    "$(printf '%q ' "${om[@]}") merge --base '$base' --checkpoints '$demo/checkpoints/epoch-1' \
      '$demo/checkpoints/epoch-$epochs' --out '$work/merged' -q && '$py' -c \
      \"import transformers, sys; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\" '$work/merged'"
  if [ "$gpu" = 1 ]; then
    torchrun_bin="$(dirname "$py")/torchrun"
    [ -x "$torchrun_bin" ] || torchrun_bin=torchrun
    step "torchrun, 1 GPU (NCCL)" "the demo's config, 2 epochs, under torchrun --nproc_per_node 1" \
      "$torchrun_bin" --standalone --nproc_per_node 1 -m overmem run "$demo/config.yaml" --out "$work/torchrun" \
      --set train.epochs=2 -q
  else
    skip "torchrun, 1 GPU (NCCL)" "no GPU (tests/test_distributed.py runs torchrun with gloo on the CPU)"
  fi
else
  for s in "run: tracked rows + dtype" scan evaluate merge "torchrun, 1 GPU (NCCL)"; do
    skip "$s" "the demo-sized run failed"
  done
fi

echo
echo "overmem GPU check on $("$py" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'the CPU (no CUDA GPU)')" 2>/dev/null) (work folder $work)"
printf '%-28s %-14s %9s  %s\n' step status seconds note
for r in "${rows[@]}"; do
  IFS='|' read -r name status secs note <<<"$r"
  printf '%-28s %-14s %9s  %s\n' "$name" "$status" "$secs" "$note"
done
if [ "$gpu" != 1 ]; then
  echo "skipped for lack of a GPU: bf16 on CUDA (ran float32 on the CPU) and torchrun with NCCL"
fi
exit $failed
