"""The package version: written here once (pyproject.toml reads it), so caches, indexes and run folders can
record which ldmclip made them without importing the whole package."""

__version__ = "0.1.0"
