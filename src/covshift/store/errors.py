"""The error the store raises for anything a user can fix: a file that is not a usable
store, a run that is not there, a value the database cannot hold."""

from __future__ import annotations

__all__ = ["StoreError"]


class StoreError(Exception):
    """The database cannot be used (newer schema, not a covshift store, unknown run)."""
