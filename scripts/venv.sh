#!/usr/bin/env bash
# Create or reuse .venv with exactly requirements.lock. Sourced by run.sh and test.sh.
# Installs every package at its locked version and hash, then the project itself without resolving
# anything; reinstalls only when pyproject.toml or requirements.lock changed since the last install.
# The lock is refreshed deliberately, with scripts/lock.sh (docs/deploy.md, "The lock").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements.lock"
STAMP="$VENV/.lens-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$LOCK" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || ! grep -qx "$WANT" "$STAMP"; then
    echo "[lens] installing requirements.lock into $VENV (first run takes a few minutes)" >&2
    # --require-hashes: every file pip takes must match a hash in the lock; --no-deps: pip takes the
    # lock as the whole set and resolves nothing (pip 23.2 would resolve an extra's requirement, e.g.
    # alembic's SQLAlchemy>=2.0, past the pin); `pip check` below proves the set complete.
    # torch comes from this machine's disk (/etc/xdg/pip); the local mirror's "Location ... is
    # ignored" notices are filtered, real errors still show.
    "$VENV/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$LOCK" 2> >(grep -v "is ignored" >&2)
    # what the lock no longer names (a dependency a refresh dropped) goes, so the venv is the lock
    EXTRA="$("$VENV/bin/python" - "$LOCK" <<'PY'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[.*?\])?==", open(sys.argv[1]).read(), re.M)}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - locked - {"pip", "lens-atlas"})))
PY
)"
    if [ -n "$EXTRA" ]; then
        echo "[lens] removing what requirements.lock does not name: $EXTRA" >&2
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip uninstall --quiet --yes $EXTRA
    fi
    # the project itself, editable, built with the locked setuptools: no resolver runs here
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" 2> >(grep -v "is ignored\|editable\|precedence\|\*\*\*\|!!\|^ *$" >&2)
    "$VENV/bin/python" -m pip check >&2
    echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
