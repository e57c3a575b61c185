"""The one kind of error the command line shows as a single line: a mistake the user can fix.

Everything else (a shape bug, CUDA out of memory, an NCCL failure) keeps its traceback, because only a
traceback lets someone find where it came from."""

from __future__ import annotations

__all__ = ["UserError", "DiskFullError"]


class UserError(ValueError):
    """A bad path, a bad option, a mismatched cache: the message says what to do instead.

    A ``ValueError`` so that library callers who caught ``ValueError`` before keep working."""


class DiskFullError(UserError):
    """No space left on the device (or over quota) while writing ``path``: one line saying so, where,
    and how much is free, instead of ``OSError: [Errno 28]`` or torch's ``unexpected pos``.
    ``core.files`` raises it; the file being written is removed first, so nothing half-written stays."""

    def __init__(self, path: object, free_bytes: int | None) -> None:
        self.path = path
        self.free_bytes = free_bytes
        free = "free space unknown" if free_bytes is None else f"{free_bytes / 2**20:.0f} MB free"
        super().__init__(f"disk full writing {path} ({free})")
