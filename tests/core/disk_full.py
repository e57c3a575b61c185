"""A mocked full disk for tests: files that ``ldmclip.core.files`` opens for writing accept ``after`` bytes,
then raise ``OSError(ENOSPC)`` as a full file system does (a test helper, not a test module)."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any, Callable

import ldmclip.core.files


class _FullFile:
    def __init__(self, file: Any, budget: list[int]) -> None:
        self._file, self._budget = file, budget

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if size > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= size
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> "_FullFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def fill_disk(monkeypatch: Any, after: int = 0, where: Callable[[Path], bool] = lambda path: True) -> None:
    """From now on, writes through ``core.files`` to paths that ``where`` accepts run out of space after
    ``after`` bytes in all (the temporary file's name is what ``where`` sees)."""
    budget = [after]
    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and where(Path(file)):
            return _FullFile(handle, budget)
        return handle

    monkeypatch.setattr(ldmclip.core.files, "open", fake_open, raising=False)
