"""The errors of building, loading and splitting a model, apart so that each part raises them
without importing the others."""

from __future__ import annotations


class ModelError(ValueError):
    """The model cannot be built or split as configured; the message says why."""


class CheckpointError(ModelError):
    """A checkpoint is unreadable, unsafe, or does not match the architecture."""
