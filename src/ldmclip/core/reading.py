"""Reading a file a user named as data (an image of a table, a folder or a search index): the one
checked open of the package.

Two things a plain ``open(path).read()`` gets wrong on real data:

* ``open()`` on a FIFO (or some devices) blocks until something writes to it: a FIFO named ``x.jpg``
  hangs the whole command. The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the
  opened descriptor (no race between a check and the open), so only regular files are read.
* a file is read whole before anything looks at it: a 2 GB sparse ``x.jpg`` costs 2 GB of memory.
  The size is checked before reading, and the read stops one byte past the limit (a file that grows
  while it is read cannot get past it either).

The limit for images is ``MAX_IMAGE_BYTES`` (64 MiB by default; the ``LDMCLIP_MAX_IMAGE_MB``
environment variable sets it in MiB for a whole run, DataLoader workers included; ``none`` there, or
``None`` here, = no limit). It is
read at each call, so setting ``ldmclip.core.reading.MAX_IMAGE_BYTES`` works too.
"""

from __future__ import annotations

import os
import stat

from .errors import UserError

__all__ = ["MAX_IMAGE_BYTES", "NotARegularFile", "FileTooLarge", "read_regular_file", "image_byte_limit"]


def _limit_from_env() -> int | None:
    value = os.environ.get("LDMCLIP_MAX_IMAGE_MB", "").strip()
    if not value:
        return 64 * 2**20
    if value.lower() in ("none", "0", "off"):
        return None
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise UserError(f"LDMCLIP_MAX_IMAGE_MB must be a number of MiB (or 'none'), got {value!r}") from None


MAX_IMAGE_BYTES: int | None = _limit_from_env()

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)


class NotARegularFile(OSError):
    """The path is a FIFO, a socket, a device or a directory: nothing to read as data."""


class FileTooLarge(OSError):
    """The file holds more bytes than the limit (it was not read)."""


def image_byte_limit() -> int | None:
    """The current size limit of an image file, in bytes (``None``: no limit)."""
    return MAX_IMAGE_BYTES


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_regular_file(path: str | os.PathLike, max_bytes: int | None) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Raises ``NotARegularFile`` (FIFO, socket, device, directory: never blocks), ``FileTooLarge`` (more
    than ``max_bytes``; not read), and the ``OSError``\\s of ``os.open`` (``FileNotFoundError``,
    ``PermissionError``, ...). A symlink is followed to what it names.
    """
    fd = os.open(path, _FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{os.fsdecode(path)} is {_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(f"{os.fsdecode(path)} holds {info.st_size} bytes, over the limit of {max_bytes}")
        want = info.st_size if max_bytes is None else max_bytes
        # Read one byte more than expected: a file that grew since fstat is read to its end (or caught).
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, max(want + 1 - total, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise FileTooLarge(f"{os.fsdecode(path)} holds more than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
