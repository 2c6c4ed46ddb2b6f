#!/usr/bin/env bash
# The text-tower and train-step benchmarks on one accelerator, in bfloat16 and float32.
#
#   benchmarks/accelerator.sh                  # on a GPU (or TPU) host, in the repo's venv
#   benchmarks/accelerator.sh --budget 300     # a shorter wall-clock budget, in seconds
#
# Prints the benchmarks' JSON lines on stdout (progress on stderr) and writes no file. Each
# piece runs under `timeout` with what is left of the budget (450 s by default, so the whole
# script stays under 8 minutes with start-up); a piece cut short prints
# {"benchmark": ..., "timed_out": true} instead of its numbers, and the script goes on. Pieces,
# per dtype (bfloat16 first, then float32):
#   1. text_tower.py --only prefix: CoOp's 16-token context at 1000 classes, forward+backward
#      of the prompted text tower, prefix-shared vs plain (prefix_speedup).
#   2. train_step.py: CoOp, CoCoOp and PromptSRC train steps at 1000 classes, batch 4, both
#      text paths (step time, FLOPs, XLA temporaries, MFU against the measured matmul peak), and
#      PromptSRC's 60-template teacher for 100 and 1000 classes on both paths.
#   3. text_tower.py --only memory: XLA's temporaries of a CoCoOp and a Bayesian-prompt step at
#      1000 classes, batch 4, both paths (compile only).
# Exits 2 without running anything when jax sees no accelerator (--allow-cpu runs anyway: the
# tests run it on CPU with --preset tiny to check its flow).
set -uo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --budget S  --preset vit-b/16|tiny  --classes N  --teacher-classes N...  --allow-cpu"
}

budget=450
preset=vit-b/16
classes=1000
teacher=(100 1000)
allow_cpu=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --classes) classes=$2; shift 2 ;;
    --teacher-classes)
      teacher=()
      shift
      while [ $# -gt 0 ] && [[ $1 != --* ]]; do teacher+=("$1"); shift; done
      ;;
    --allow-cpu) allow_cpu=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "accelerator.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $budget =~ ^[0-9]+$ && $classes =~ ^[0-9]+$ ]]; then
  echo "accelerator.sh: --budget and --classes take whole numbers" >&2
  exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
export TF_CPP_MIN_LOG_LEVEL=3
# Measure what is run, not what a previous process cached.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

backend=$("$py" -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)' 2>/dev/null)
if [ -z "$backend" ]; then
  echo "accelerator.sh: '$py' cannot import jax; activate the repo's venv or set PYTHON=" >&2
  exit 2
fi
if [[ $backend == cpu* ]] && [ "$allow_cpu" = 0 ]; then
  echo "accelerator.sh: jax sees only the CPU; install jax with its accelerator plugin" \
    "(pip install 'jax[cuda12]') or pass --allow-cpu" >&2
  exit 2
fi
echo "accelerator.sh: $backend, budget ${budget}s" >&2

start=$SECONDS
run() {  # run NAME ARGS...: one benchmark under the time left
  local name=$1 left rc
  shift
  left=$((budget - (SECONDS - start)))
  if [ "$left" -le 5 ]; then
    printf '{"benchmark": "%s", "args": "%s", "timed_out": true, "skipped": true}\n' "$name" "$*"
    return
  fi
  echo "accelerator.sh: $name $* (${left}s left)" >&2
  timeout --signal=INT --kill-after=10 "$left" "$py" "$here/$name.py" "$@"
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 130 ]; then
    printf '{"benchmark": "%s", "args": "%s", "timed_out": true, "limit_s": %d}\n' \
      "$name" "$*" "$left"
  elif [ "$rc" != 0 ]; then
    printf '{"benchmark": "%s", "args": "%s", "failed": true, "exit": %d}\n' "$name" "$*" "$rc"
  fi
}

for dtype in bfloat16 float32; do
  run text_tower --dtype "$dtype" --preset "$preset" --only prefix --vocab word \
    --classes "$classes" --repeats 5
  run train_step --dtype "$dtype" --preset "$preset" --methods coop cocoop promptsrc \
    --classes "$classes" --steps 3 --teacher-classes "${teacher[@]}"
  run text_tower --dtype "$dtype" --preset "$preset" --only memory --vocab word \
    --classes "$classes"
done
echo "accelerator.sh: done in $((SECONDS - start))s" >&2
