#!/usr/bin/env bash
# Regenerate lens_core/site/SCHEMA.md from the site data models (lens_core/site/schema.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "from lens_core.site.schema import schema_markdown; print(schema_markdown(), end='')" > lens_core/site/SCHEMA.md
