#!/usr/bin/env bash
# Tests: set up .venv (first time only), Debian chromium for the site tests, ruff (lint and
# format), then pytest.
# Extra arguments go to pytest (e.g. ./test.sh tests/test_data.py -k s3).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
bash scripts/ensure-chromium.sh
ruff check .
ruff format --check .
exec python -m pytest -q -p no:cacheprovider "$@"
