#!/usr/bin/env bash
# Main job: set up .venv (first time only) and build the atlas for the embedded toy default.
# Extra arguments go to `lens run` (e.g. --config my.toml --classes a,b).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
exec lens run "$@"
