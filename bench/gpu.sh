#!/usr/bin/env bash
# The engine's GPU figures in one run (`make bench-gpu`): the CUDA variants of the tests, then
# `bench.gpu` (precision, backbone throughput, time in kernels, fan-out through the executor,
# invariant 3 per precision), then `bench.gpu_serve` (a `--device cuda` server over HTTP, fp32 and
# fp16, and ONNX Runtime's backbone when it has its CUDA provider). Each step has its own time limit,
# so one that hangs leaves the others their time; the limits add up to 7 min 50 s. Exits non-zero if
# any step failed. The output also goes to $OUT/bench-gpu.log when OUT is set (the device tool's
# folder), else to /tmp/bench-gpu.log.
#
# Usage: PY=.venv/bin/python bash bench/gpu.sh             (a machine set up with `make install`)
#        bash bench/gpu.sh --wheels .whl [--ort-parts .whl-ort]
#                                                           (a lent GPU machine with no registry: its
#                                                           python3, plus bench/gpu_wheels.sh's wheels;
#                                                           and onnxruntime-gpu, carried in parts)
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
install() {  # install TARGET WHEEL...: beside the machine's own packages, ahead of them on PYTHONPATH
  local target=$1
  shift
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" || return 1
  export PYTHONPATH=$target:${PYTHONPATH:-}
}
ort_parts() {  # ort_parts DIR: joins bench/gpu_wheels.sh --ort-gpu's parts, checks the wheel's sha256, installs it
  local dir=$1 name
  name=$(awk '{print $2}' "$dir/0/SHA256SUMS" 2>/dev/null) || name=
  if [ -z "$name" ]; then
    echo "onnxruntime-gpu: no $dir/0/SHA256SUMS here; ONNX Runtime's CUDA provider is not measured"
    return 0
  fi
  mkdir -p /tmp/ort-wheel && cat "$dir"/*/part > "/tmp/ort-wheel/$name"
  if ! (cd /tmp/ort-wheel && sha256sum -c --quiet "$OLDPWD/$dir/0/SHA256SUMS"); then
    echo "onnxruntime-gpu: the parts in $dir ($(ls "$dir" | tr '\n' ' ')) do not make the wheel; a part is missing"
    return 0
  fi
  install /tmp/site-ort "/tmp/ort-wheel/$name" && echo "onnxruntime-gpu: installed $name"
}
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) install /tmp/site "$2"/*.whl || exit 1; shift 2 ;;
    --ort-parts) ort_parts "$2"; shift 2 ;;  # after --wheels: ahead of the machine's CPU-only onnxruntime
    *) echo "usage: bash bench/gpu.sh [--wheels DIR] [--ort-parts DIR]"; exit 2 ;;
  esac
done
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/bench-gpu.log
failed=()
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2 start=$SECONDS
  shift 2
  echo "== $name: $* (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" || failed+=("$name (exit $?)")
  echo "== $name took $((SECONDS - start)) s"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step 100 "CUDA tests" $PY -m pytest -q -p no:cacheprovider -k "cuda or onnx_matches_torch" \
    tests/models/test_runtime_cuda.py tests/models/test_runtime.py tests/server/test_services.py \
    tests/server/test_caches_and_store.py tests/tuners/test_trainer.py tests/tuners/test_read_plan.py
  step 160 bench.gpu $PY -m bench.gpu
  step 210 bench.gpu_serve $PY -m bench.gpu_serve
  if [ ${#failed[@]} -gt 0 ]; then
    echo "bench-gpu: failed: ${failed[*]}"
    exit 1
  fi
  echo "bench-gpu: every step passed"
} 2>&1 | tee "$log"
