"""The error of this package: a checkpoint that cannot be read, or does not fit its model."""

from __future__ import annotations

from ..core.errors import UserError

__all__ = ["CheckpointError"]


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""
