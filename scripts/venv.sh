#!/usr/bin/env bash
# Create or reuse .venv with the pinned dependencies. Sourced by run.sh and test.sh.
# Reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.lens-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || ! grep -qx "$WANT" "$STAMP"; then
    echo "[lens] installing pinned dependencies into $VENV (first run takes a few minutes)" >&2
    # torch first, by exact pin, so no resolver can pull another build.
    # (the local mirror's "Location ... is ignored" notices are filtered; real errors still show)
    "$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" 2> >(grep -v "is ignored" >&2)
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" 2> >(grep -v "is ignored\|editable\|precedence\|\*\*\*\|!!\|^ *$" >&2)
    echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
