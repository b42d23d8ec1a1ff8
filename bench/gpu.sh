#!/usr/bin/env bash
# The engine's GPU figures in one run (`make bench-gpu`): the CUDA variants of the tests, then
# `bench.gpu` (precision, backbone throughput, time in kernels, fan-out through the executor,
# invariant 3 per precision), then `bench.gpu_serve` (a `--device cuda` server over HTTP, fp32 and
# fp16). Each step has its own time limit, so one that hangs leaves the others their time; the limits
# add up to 9 min 20 s. Exits non-zero if any step failed. The output also goes to
# $OUT/bench-gpu.log when OUT is set (the device tool's folder), else to /tmp/bench-gpu.log.
#
# Usage: PY=.venv/bin/python bash bench/gpu.sh             (a machine set up with `make install`)
#        bash bench/gpu.sh --wheels .whl                    (a lent GPU machine with no registry: its
#                                                           python3, plus bench/gpu_wheels.sh's wheels)
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
if [ "${1:-}" = "--wheels" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
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
  step 120 "CUDA tests" $PY -m pytest -q -p no:cacheprovider -k cuda tests/models/test_runtime_cuda.py \
    tests/models/test_runtime.py tests/server/test_services.py tests/server/test_caches_and_store.py \
    tests/tuners/test_trainer.py
  step 200 bench.gpu $PY -m bench.gpu
  step 240 bench.gpu_serve $PY -m bench.gpu_serve
  if [ ${#failed[@]} -gt 0 ]; then
    echo "bench-gpu: failed: ${failed[*]}"
    exit 1
  fi
  echo "bench-gpu: every step passed"
} 2>&1 | tee "$log"
