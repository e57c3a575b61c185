"""Files that matter (checkpoints, caches, indexes) are written atomically, and weights are identified
by a hash of their bytes. One implementation, used by every writer in the package."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import DiskFullError

__all__ = ["temp_name", "atomic_write", "write_json_atomic", "save_torch", "fsync_dir", "write_safetensors",
           "safetensors_dtype", "tensors_sha256", "is_disk_full", "DiskFullError", "human_bytes", "write_npy",
           "write_parquet_atomic"]

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from (``__cause__``/``__context__``: torch wraps the
    ``OSError`` of a full disk in a ``RuntimeError: ... unexpected pos``) is ENOSPC or EDQUOT."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        stack += [current.__cause__, current.__context__]
    return False


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temp)``, fsync, rename onto ``path``, fsync the folder: a reader (or a resumed run) sees
    the old file or the new one, never half of one, even after a power cut. A full disk (at any of
    these steps) removes the temporary and raises :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    temp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise DiskFullError(path, _free_bytes(path.parent)) from error
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any], *, sort_keys: bool = False) -> None:
    text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=sort_keys) + "\n"

    def write(temp: Path) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_parquet_atomic(path: str | os.PathLike, table: Any) -> None:
    """Write a ``pyarrow.Table`` as a parquet file, atomically. pyarrow is imported here, not at the top:
    it is an optional dependency (the ``parquet`` extra). The same table gives the same bytes on rerun.
    Written through a Python file object (as ``save_torch``), so that a full disk is a :class:`DiskFullError`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # an optional dependency (the ``parquet`` extra)
        from .errors import UserError

        raise UserError("writing parquet files needs pyarrow: pip install pyarrow") from None

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            pq.write_table(table, f)

    atomic_write(path, write)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically. Through a Python file object, not a path: then a full
    disk's ``OSError`` stays attached to torch's ``RuntimeError`` (a path is written by C++ code, which
    keeps no errno) and becomes a :class:`DiskFullError`."""
    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


# dtype names of the safetensors format (https://github.com/huggingface/safetensors, "Format" section).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}



def safetensors_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"F16"`` -> ``torch.float16``); ``None`` if unknown."""
    return _SAFETENSORS_DTYPE_NAMES.get(name)


_SAFETENSORS_DTYPE_NAMES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a .safetensors file, atomically, one tensor at a time.

    Written here rather than with ``safetensors.torch.save_file`` because that one (0.8) writes through
    a randomly named temporary file of its own (``.tmpXXXXXX``) that a killed run leaves behind where no
    cleanup can recognise it, makes owner-only files, and ``safetensors.torch.save`` would hold a second
    copy of everything in memory. The bytes follow the published format: an 8-byte little-endian header
    length, a JSON header padded with spaces to 8 bytes, then each tensor's little-endian bytes."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in sorted(cpu):
        tensor = cpu[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot write {name!r}: safetensors has no dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in sorted(cpu):
                if cpu[name].numel():
                    f.write(cpu[name].reshape(-1).view(torch.uint8).numpy().data)

    atomic_write(path, write)


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over tensors (names, dtypes, shapes and bytes) in key order: the same weights give the same
    hash on any machine."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    """A byte count as a person reads it, in powers of 1000: ``"812 B"``, ``"3.4 MB"``, ``"1.2 TB"``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_npy(path: str | os.PathLike, array: Any) -> None:
    """``numpy.save`` of ``array`` to ``path`` atomically (the ``.npy`` format: its header depends only on
    dtype, shape and order, so the same array gives the same bytes)."""
    import numpy as np

    data = np.ascontiguousarray(array)

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            np.save(f, data, allow_pickle=False)

    atomic_write(path, write)
