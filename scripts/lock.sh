#!/usr/bin/env bash
# Refresh requirements.lock, the complete pinned and hashed set that scripts/venv.sh installs.
# Run it after editing pyproject.toml's dependencies, then run the tests and commit both files.
#   scripts/lock.sh                        # add/remove what pyproject.toml changed; keep every other pin
#   scripts/lock.sh -P sqlalchemy==2.0.59  # move one package (and only what it needs)
#   scripts/lock.sh --upgrade              # re-resolve everything to the newest that fits pyproject.toml
# pip-compile (pip-tools) resolves with this machine's pip settings, so torch comes from local disk
# (/etc/xdg/pip) and its hashes are those of the files pip would install. About 1-5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${LENS_LOCK_TOOLS:-${TMPDIR:-/tmp}/lens-lock-tools}"
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
    python3.11 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet "pip-tools==7.6.2" 2> >(grep -v "is ignored" >&2)
fi
# --all-build-deps --allow-unsafe: setuptools (the build backend) is locked too, for `pip install -e .`
# --no-strip-extras: keep e.g. sqlalchemy[asyncio]==, or pip 23.2 resolves the extra to another version
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$TOOLS/bin/pip-compile" --quiet --generate-hashes \
    --allow-unsafe --all-build-deps --extra test --no-strip-extras --no-emit-index-url --no-emit-find-links \
    --output-file requirements.lock "$@" pyproject.toml \
    2> >(grep -v "is ignored\|license\|SPDX\|corresp\|Feb-18\|or your builds\|packaging.python.org\|\*\*\*\|!!\|^ *$" >&2)
echo "[lens] requirements.lock: $(grep -c '^[A-Za-z0-9]' requirements.lock) packages" >&2
