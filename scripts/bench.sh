#!/usr/bin/env bash
# Run one benchmark with the project's venv; the reference tools (Horama, overcomplete) are
# installed without dependencies into .bench-extras/, never into the venv itself.
# Usage: scripts/bench.sh bench_maco.py [args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
EXTRAS="$PWD/.bench-extras"
if [ ! -f "$EXTRAS/.ok" ]; then
    python -m pip install --quiet --no-deps --target "$EXTRAS" horama==0.3.0 overcomplete==0.3.0 einops==0.8.2
    touch "$EXTRAS/.ok"
fi
export HORAMA_PATH="$EXTRAS" OVERCOMPLETE_PATH="$EXTRAS"
exec python "bench/$1" "${@:2}"
