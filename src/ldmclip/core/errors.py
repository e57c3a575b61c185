"""The one kind of error the command line shows as a single line: a mistake the user can fix.

Everything else (a shape bug, CUDA out of memory, an NCCL failure) keeps its traceback, because only a
traceback lets someone find where it came from."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A bad path, a bad option, a mismatched cache: the message says what to do instead.

    A ``ValueError`` so that library callers who caught ``ValueError`` before keep working."""
