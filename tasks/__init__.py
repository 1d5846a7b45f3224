"""Prefect tasks: thin wrappers over lens_core stages (naming, tags, retries)."""
