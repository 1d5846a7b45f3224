"""The store's errors: unreachable, refused, and a lease taken over."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store cannot be reached or written; the message names the URL, never credentials."""


class StoreAccessError(StoreError, PermissionError):
    """The store refuses these credentials; the message names the URL, never the credentials."""


class LeaseLostError(RuntimeError):
    """Another process took over our lease (we stalled past its TTL): our work is not marked
    complete."""
