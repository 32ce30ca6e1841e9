"""Single source of the package version (read by the store and the report)."""

__version__ = "0.1.0"
