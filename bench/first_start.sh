#!/usr/bin/env bash
# The README's first-start figure: `make serve` from a fresh clone of this repository's HEAD, with
# pip's cache off, timed until the README's two-task detect request is first answered (posted
# every 2 s). Prints the seconds and the demo's logged steps; the clone is left for inspection.
#
# Usage: bash bench/first_start.sh [CLONE_DIR]   (default: a new temporary folder)
# Port 8000 must be free. Takes 7 to 9 minutes on 2 cores.
set -u
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
clone=${1:-$(mktemp -d)/sidecar}
git clone -q "$repo" "$clone" && cd "$clone" || exit 1
start=$(date +%s.%N)
setsid env PIP_NO_CACHE_DIR=1 make serve > first-start.log 2>&1 &
pid=$!
trap 'kill -- -$pid 2>/dev/null; sleep 2; kill -9 -- -$pid 2>/dev/null' EXIT
answered=0
while kill -0 $pid 2>/dev/null; do
  image=$(ls .venv/lib/python3*/site-packages/skimage/data/astronaut.png 2>/dev/null | head -1)
  if [ -n "$image" ] && curl -s -f -F "image=@$image" -F tasks=digits,faces localhost:8000/v1/detect \
      > first-answer.json 2>/dev/null; then
    answered=1
    break
  fi
  sleep 2
done
end=$(date +%s.%N)
grep -E "demo task|epoch 1:" first-start.log | cut -c1-120
if [ $answered = 1 ]; then
  awk -v a="$start" -v b="$end" 'BEGIN { printf "first answer after %.0f s (clone: %s)\n", b - a, ENVIRON["PWD"] }'
else
  echo "make serve exited before answering; see $clone/first-start.log" >&2
  exit 1
fi
