"""Files that matter (checkpoints, caches, indexes) are written atomically, and weights are identified
by a hash of their bytes. One implementation, used by every writer in the package."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["temp_name", "atomic_write", "write_json_atomic", "fsync_dir", "default_file_mode", "tensors_sha256"]


def temp_name(path: Path) -> Path:
    # A fixed name (not a random one), so a killed run's leftover is found and removed by the next run.
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temp)``, fsync, rename onto ``path``, fsync the folder: a reader (or a resumed run) sees
    the old file or the new one, never half of one, even after a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any], *, sort_keys: bool = False) -> None:
    text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=sort_keys) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def default_file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (safetensors makes owner-only files, and caches
    and indexes are often shared)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over tensors (names, dtypes, shapes and bytes) in key order: the same weights give the same
    hash on any machine."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
