#!/usr/bin/env bash
# The GPU check: tools/gpu_check.sh OUTDIR
#
# Runs what can run on this machine's GPU within one short GPU lease (8 minutes in all,
# each step under its own time limit, never stopping at the first failure), and writes
# OUTDIR/summary.tsv (step, status pass/fail/skip, seconds, detail with the figures) and
# each step's log and outputs beside it. Python: $PYTHON, else the project's .venv, else
# python3; the repository goes on PYTHONPATH, so nothing needs installing. This works on
# the GPU check machines (python3 with torch, cupy, numpy, safetensors and pytest, but no
# TensorFlow): there the torch and cupy half runs and every TensorFlow step is a skip with
# its reason; where TensorFlow imports and sees the GPU (`uv sync --extra gpu`), its half
# runs too. Without a GPU every step is a skip and the script ends in seconds, exit 0.
# Exit 1 if a step failed.
set -u
if [ $# -ne 1 ]; then
  echo "usage: tools/gpu_check.sh OUTDIR (where summary.tsv and the logs go)" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# TensorFlow JIT-compiles its PTX for Hopper GPUs at first use: keep the compiled kernels.
export CUDA_CACHE_MAXSIZE=4294967296
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
SUMMARY="$OUT/summary.tsv"
printf 'step\tstatus\tseconds\tdetail\n' >"$SUMMARY"
FAILED=0

row() {  # row STEP STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$SUMMARY"
  printf '%-24s %-5s %4ss  %s\n' "$1" "$2" "$3" "$4"
  [ "$2" != fail ] || FAILED=1
}

step() {  # step NAME LIMIT FIGURES COMMAND...: FIGURES is a tools.gpu_figures call, or -
  local name=$1 limit=$2 figures=$3 left=$((DEADLINE - SECONDS)) start=$SECONDS rc detail
  shift 3
  if [ "$left" -lt 10 ]; then
    row "$name" fail 0 "not started: the check's time was used up"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    row "$name" fail $((SECONDS - start)) "timed out after ${limit} s; log $name.log"
  elif [ $rc -ne 0 ]; then
    row "$name" fail $((SECONDS - start)) "exit $rc: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)"
  elif [ "$figures" = - ]; then
    row "$name" pass $((SECONDS - start)) "$(tail -n 1 "$OUT/$name.log")"
  elif detail=$($PY -m tools.gpu_figures $figures 2>&1); then
    row "$name" pass $((SECONDS - start)) "$detail"
  else
    row "$name" fail $((SECONDS - start)) "$detail"
  fi
}

skip() {  # skip REASON STEP...
  local reason=$1
  shift
  for name in "$@"; do row "$name" skip 0 "$reason"; done
}

TORCH_STEPS=(torch_device_parity torch_run_cnn_plain torch_run_cnn_fast torch_run_nn_plain
             torch_run_nn_fast torch_deterministic bench_ops bench_training_cnn torch_tests
             bench_training_mlp)
TF_STEPS=(tf_tests tf2_run_cnn tf2_run_cnn_keras tf1_run_cnn)

# -- the GPU ----------------------------------------------------------------------------
start=$SECONDS
gpu=$(timeout 60 $PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>"$OUT/gpu.log")
if [ -z "$gpu" ]; then
  why="no CUDA GPU visible to torch ($PY); nothing here can run on a GPU"
  row gpu skip $((SECONDS - start)) "$why"
  skip "$why" "${TORCH_STEPS[@]}" "${TF_STEPS[@]}"
  exit 0
fi
row gpu pass $((SECONDS - start)) "$gpu; $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed 's/^/driver /'); $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"

# -- torch and cupy ---------------------------------------------------------------------
run() {  # run NAME MODULE FLAGS...: an entry point on the GPU, its figures from metrics.json
  local name=$1 module=$2
  shift 2
  step "$name" 60 "run $OUT/$name" $PY -m "$module" --device cuda --out "$OUT/$name" "$@"
}
step torch_device_parity 90 "parity $OUT/device_parity.json" \
  $PY -m tools.device_parity --device cuda --json "$OUT/device_parity.json"
run torch_run_cnn_plain torch_impl.run_cnn --dataset synthetic --epochs 5
run torch_run_cnn_fast torch_impl.run_cnn --dataset synthetic --epochs 5 --fast
run torch_run_nn_plain torch_impl.run_nn --dataset friedman --epochs 5
run torch_run_nn_fast torch_impl.run_nn --dataset friedman --epochs 5 --fast
step torch_deterministic 90 "same $OUT/torch_deterministic/a $OUT/torch_deterministic/b" \
  bash -c 'for run in a b; do "$0" -m torch_impl.run_cnn --device cuda --dataset synthetic \
             --epochs 3 --deterministic --out "$1/$run" || exit; done' "$PY" "$OUT/torch_deterministic"
step bench_ops 90 "ops $OUT/bench_ops/ops.json" \
  $PY -m benchmarks.ops --device cuda --budget 1 --out "$OUT/bench_ops"
step bench_training_cnn 100 "training $OUT/bench_training_cnn/training.json" \
  $PY -m benchmarks.training --task cnn --device cuda --epochs 2 --items 5000 --out "$OUT/bench_training_cnn"
step torch_tests 150 "pytest $OUT/torch_tests.log" \
  $PY -m pytest parity_tests/test_device_parity.py parity_tests/test_fast_torch.py \
  parity_tests/test_torch_impl.py --device cuda -p no:cacheprovider -q -rs -n 8 --dist load
step bench_training_mlp 60 "training $OUT/bench_training_mlp/training.json" \
  $PY -m benchmarks.training --task mlp --device cuda --epochs 2 --items 20000 --out "$OUT/bench_training_mlp"

# -- TensorFlow -------------------------------------------------------------------------
tf_gpus=$(timeout 120 $PY -c "import common, tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>"$OUT/tf_probe.log")
if [ -z "$tf_gpus" ]; then
  skip "tensorflow does not import with $PY: $(grep -v '^\s*$' "$OUT/tf_probe.log" | tail -n 1)" "${TF_STEPS[@]}"
elif [ "$tf_gpus" = 0 ]; then
  skip "tensorflow sees no GPU: it needs CUDA 12 libraries (uv sync --extra gpu)" "${TF_STEPS[@]}"
else
  step tf_tests 150 "pytest $OUT/tf_tests.log" \
    $PY -m pytest parity_tests/test_parity.py parity_tests/test_device_parity.py \
    parity_tests/test_cross_framework.py --device cuda -p no:cacheprovider -q -rs -n 4
  run tf2_run_cnn tf2_impl.run_cnn --dataset synthetic --epochs 3
  run tf2_run_cnn_keras tf2_impl.run_cnn_keras --dataset synthetic --epochs 3
  run tf1_run_cnn tf1_compat.run_cnn --dataset synthetic --epochs 3
fi
exit $FAILED
