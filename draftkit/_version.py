"""The package version (a leaf module, so anything may import it without importing draftkit's API)."""

__version__ = "0.4.1"
