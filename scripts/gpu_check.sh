#!/usr/bin/env bash
# make gpu-check: the whole GPU verification of fastmargin in one command, time-boxed.
#
#   scripts/gpu_check.sh [OUT_DIR]          run every stage (OUT_DIR: default $OUT, else
#                                            ./gpu-check-out)
#   scripts/gpu_check.sh --build-only       only build fastmargin._C in place, and its stamp
#                                            fastmargin/_C<suffix>.so.stamp (sources, torch)
#
# Stages, in order of value, each under its own `timeout` and all within GPU_CHECK_BUDGET_S
# seconds of wall time (default 460: the whole run stays under 8 minutes); a stage that fails
# or times out does not stop the later ones:
#   build       reuse fastmargin/_C*.so when its stamp matches the sources and the running torch
#               (a build carried in), else build with every core
#   check       python -m fastmargin check --device cuda --big
#   pytest      the CUDA-marked tests, a per-test timeout
#   memcheck, racecheck
#               compute-sanitizer over python -m fastmargin check --device cuda --quick
#   bench       python -m fastmargin bench --set gpu-check (fastmargin vs eager vs compile)
#   train-maxup, train-amo
#               bench/bench_train_step.py
#   synccheck   compute-sanitizer, as above (last: the least likely to find a wrong answer)
# Without a GPU (or with GPU_CHECK_DEVICE=cpu) it is a dry run: the same stages on the CPU,
# GPU-only stages reported "skipped: no GPU".
#
# Writes under OUT_DIR: summary.md, summary.json, stages.tsv, check.json, bench.json,
# train-*.json, pytest-cuda.xml, env.txt and logs/<stage>.log; prints a one-screen summary last.
# Environment: PYTHON (default python3; the system interpreter, no virtualenv is made),
# GPU_CHECK_BUDGET_S, GPU_CHECK_DEVICE (auto | cuda | cpu), MAX_JOBS (default: every core).
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
START=$(date +%s)
SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SO=fastmargin/_C$SUFFIX
STAMP=$SO.stamp  # what SO was built from and against (one per interpreter, like SO)

sources_hash() {
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

# What the stamp of a build of these sources against this interpreter and torch says.
wanted_stamp() {
  local torch_version
  torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)') || return 1
  echo "sources=$(sources_hash) torch=$torch_version python=$SUFFIX"
}

build() {
  local jobs=${MAX_JOBS:-$(nproc)}
  local tag
  tag=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
  local stamp
  stamp=$(wanted_stamp) || return 1  # of the sources as they are when the build starts
  rm -f "$STAMP"
  # a build/ folder per interpreter, so builds for two Pythons never share object files
  MAX_JOBS=$jobs "$PYTHON" setup.py build_ext --inplace -t "build/temp-$tag" || return 1
  echo "$stamp" > "$STAMP"
  echo "built $SO ($(du -h "$SO" | cut -f1)); stamp $STAMP: $stamp"
}

if [[ "${1:-}" == "--build-only" ]]; then
  build
  exit $?
fi

OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES="$OUT_DIR/stages.tsv"
: > "$STAGES"

record() {  # name status rc seconds note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
  printf '[gpu-check %4ss] %-12s %-8s %s\n' "$(( $(date +%s) - START ))" "$1" "$2" "$5"
}

# run_stage NAME LIMIT_S CMD...: CMD under `timeout` (LIMIT_S, capped by the budget left),
# its output in logs/NAME.log.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 20 )); then
    record "$name" skipped "" 0 "skipped: time budget spent"
    return 0
  fi
  (( limit > left )) && limit=$left
  local log="$OUT_DIR/logs/$name.log" t0
  t0=$(date +%s)
  echo "\$ $* (timeout ${limit}s)" > "$log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$? status=pass note=""
  if (( rc == 124 || rc == 137 )); then
    status=timeout
    note="stopped at ${limit}s"
  elif (( rc != 0 )); then
    status=fail
    note="exit $rc"
  fi
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$note"
  return 0
}

# --- environment ------------------------------------------------------------------------------
GPU=0
case "${GPU_CHECK_DEVICE:-auto}" in
  cuda) GPU=1 ;;
  cpu) GPU=0 ;;
  *) "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
       2>/dev/null && GPU=1 ;;
esac
DEV=cpu
(( GPU )) && DEV=cuda
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "python: $("$PYTHON" --version 2>&1)"
  "$PYTHON" -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)'
  echo "device: $DEV"
  (( GPU )) && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo "cores: $(nproc)"
  "$PYTHON" -c 'import importlib.util as u
names = ["setuptools", "ninja", "numpy", "pytest_timeout", "hypothesis", "triton", "liger_kernel"]
print("modules:", " ".join(n + ("=yes" if u.find_spec(n) else "=no") for n in names))'
} > "$OUT_DIR/env.txt" 2>&1
echo "[gpu-check] $(tr '\n' ' ' < "$OUT_DIR/env.txt")"

# --- build --------------------------------------------------------------------------------------
WANT=$(wanted_stamp)
HAVE=$(cat "$STAMP" 2>/dev/null || true)
if [[ -f "$SO" && "$HAVE" == "$WANT" ]] &&
   "$PYTHON" -c 'import fastmargin' > "$OUT_DIR/logs/build.log" 2>&1; then
  record build pass 0 0 "reused $SO ($WANT)"
else
  [[ -n "$HAVE" ]] && echo "stamp $HAVE != $WANT: rebuilding" > "$OUT_DIR/logs/build-reason.log"
  run_stage build 420 bash "$ROOT/scripts/gpu_check.sh" --build-only
fi
if (( GPU )) && ! "$PYTHON" -c 'import sys, torch, fastmargin
sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastmargin::worst_of_k_ce_fwd", "CUDA") else 1)' >> "$OUT_DIR/logs/build.log" 2>&1; then
  echo "[gpu-check] the build has no CUDA kernels: see logs/build.log" | tee -a "$OUT_DIR/logs/build.log"
fi

# --- self-check ---------------------------------------------------------------------------------
if (( GPU )); then
  run_stage check 150 "$PYTHON" -m fastmargin check --device cuda --big --json "$OUT_DIR/check.json"
else
  run_stage check 150 "$PYTHON" -m fastmargin check --device cpu --json "$OUT_DIR/check.json"
fi

# --- CUDA tests ---------------------------------------------------------------------------------
if (( GPU )); then
  per_test=()  # a hung test must not take the stage's whole limit (needs pytest-timeout)
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout=90)
  # -v: one line per test as it ends, so a stage stopped by its limit still says which ran
  run_stage pytest 200 "$PYTHON" -m pytest -v -m cuda ${per_test[@]+"${per_test[@]}"} -rfE \
    --junitxml="$OUT_DIR/pytest-cuda.xml" tests
else
  record pytest skipped "" 0 "skipped: no GPU"
fi

# --- compute-sanitizer --------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
sanitize() {  # sanitize TOOL...: compute-sanitizer TOOL over the quick self-check
  for tool in "$@"; do
    if (( ! GPU )); then
      record "$tool" skipped "" 0 "skipped: no GPU"
    elif [[ ! -x "$SAN" ]]; then
      record "$tool" skipped "" 0 "skipped: compute-sanitizer not found"
    else
      # only fastmargin's kernels are instrumented (much faster; torch's are not ours to check)
      filter=()
      # (the help text read whole: `--help | grep -q` fails under pipefail when grep stops early)
      san_help=$("$SAN" --help 2>&1 || true)
      [[ $san_help == *--kernel-name* ]] && filter=(--kernel-name kns=fastmargin)
      env=()
      # memcheck sees out-of-bounds accesses only outside the caching allocator's big blocks
      [[ $tool == memcheck ]] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
      run_stage "$tool" 80 env ${env[@]+"${env[@]}"} "$SAN" --tool "$tool" --error-exitcode 3 \
        ${filter[@]+"${filter[@]}"} "$PYTHON" -m fastmargin check --device cuda --quick
    fi
  done
}
# memcheck and racecheck before the benchmarks (wrong answers first); synccheck after them
sanitize memcheck racecheck

# --- benchmarks ---------------------------------------------------------------------------------
if (( GPU )); then
  run_stage bench 170 "$PYTHON" -m fastmargin bench --device cuda --set gpu-check \
    --json "$OUT_DIR/bench.json"
  for method in maxup amo; do
    run_stage "train-$method" 60 "$PYTHON" bench/bench_train_step.py --method "$method" \
      --device cuda --json "$OUT_DIR/train-$method.json"
  done
else
  run_stage bench 170 "$PYTHON" -m fastmargin bench --device cpu --set gpu-check --quick \
    --reps 3 --json "$OUT_DIR/bench.json"
  for method in maxup amo; do
    run_stage "train-$method" 60 "$PYTHON" bench/bench_train_step.py --method "$method" \
      --small --device cpu --json "$OUT_DIR/train-$method.json"
  done
fi

sanitize synccheck

# --- summary ------------------------------------------------------------------------------------
"$PYTHON" scripts/gpu_check_summary.py "$OUT_DIR" "$(( $(date +%s) - START ))"
