"""Text towers written back into single-file SD checkpoints (``.safetensors``): the other direction of
:mod:`.sd`, with its layout facts (which encoders a file holds, under which prefix, in which key layout).

Only the text-encoder tensors change, each in the file's own key layout and dtype. The file's header is
copied byte for byte: a tower must have exactly the shapes of the encoder it replaces and is written in
that tensor's dtype, so every tensor keeps its byte size, and with it its ``data_offsets``, the key order
and ``__metadata__``. The output is therefore the input with the encoders' byte ranges substituted: the
rest is copied from the input in chunks and never loaded as tensors, so rewriting a 7 GB SDXL file needs
the memory of the new towers and a copy buffer, not of the file. It is written atomically
(``core.files.atomic_write``: a temporary name beside the output, fsync, rename), and the input is only
ever opened for reading.

Pickled checkpoints (``.ckpt``) are refused: a pickle cannot be rewritten piecewise without reading it
whole; convert one to ``.safetensors`` first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import torch

from ..core.files import atomic_write, safetensors_dtype, temp_name
from ..models.text import TextTransformer
from .errors import CheckpointError
from .hf import openclip_to_hf_state_dict, with_text_model_prefix
from .sd import (HF, OPENCLIP, FoundEncoder, _describe, _describe_keys, _label, _openclip_name, encoder_shapes,
                 find_text_encoders)

__all__ = ["SDWriteResult", "check_write_paths", "write_text_encoders"]

logger = logging.getLogger(__name__)

_COPY_CHUNK = 8 << 20  # bytes per read while copying the untouched tensors


@dataclass(frozen=True)
class _Entry:
    """One tensor of a ``.safetensors`` file: its dtype name, shape and byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SDWriteResult:
    """What :func:`write_text_encoders` wrote: the tensors replaced per encoder and those copied as they were."""

    out: Path
    family: str
    replaced: dict[str, int]
    copied: int


TowerState = Mapping[str, torch.Tensor] | torch.nn.Module


def write_text_encoders(into: str | os.PathLike, out: str | os.PathLike,
                        towers: Mapping[str, TowerState]) -> SDWriteResult:
    """Write ``into`` to ``out`` with the text encoders named in ``towers`` replaced.

    ``towers`` maps an encoder of the file (``text_encoder``, ``text_encoder_2``: the names of
    :func:`.sd.find_text_encoders`) to a text tower: an ldmclip ``TextTransformer`` (or a whole ``CLIP``)
    or its state dict under OpenCLIP's key names. Encoders not named stay as they are. Every check
    (paths, layout, each tower's keys and shapes) is done before anything is written."""
    into, out = Path(into), Path(out)
    check_write_paths(into, out)
    found = {f.encoder: f for f in _find_encoders(into)}
    header_end, entries = _read_header(into)
    replacements: list[tuple[_Entry, Callable[[], torch.Tensor]]] = []
    replaced: dict[str, int] = {}
    for encoder, tower in towers.items():
        if encoder not in found:
            raise CheckpointError(f"{into} has no text encoder {encoder!r}; it has: {', '.join(found)}")
        plan = _plan(into, found[encoder], entries, _tower_weights(tower, encoder))
        replacements += plan
        replaced[encoder] = len(plan)
    atomic_write(out, lambda temp: _stream(into, temp, replacements))
    family = next(iter(found.values())).family
    return SDWriteResult(out, family, replaced, len(entries) - len(replacements))


def check_write_paths(into: Path, out: Path) -> None:
    """The input exists and is a .safetensors file; the output is another .safetensors path (never the input,
    through a symlink, a relative path or a hard link)."""
    if not into.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {into}")
    # the rename would replace the input (and the temporary beside the output would truncate it)
    if out.resolve() == into.resolve() or temp_name(out).resolve() == into.resolve() or (
            out.exists() and os.path.samefile(out, into)):
        raise CheckpointError(f"the output {out} is the input checkpoint {into}: write to a new file")
    if into.suffix != ".safetensors":
        raise CheckpointError(f"{into} is a pickled checkpoint ({into.suffix}): text encoders are written back "
                              f"into .safetensors files only (a pickle cannot be rewritten piece by piece); convert "
                              f"it to .safetensors first")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"the output {out} must be a .safetensors file (the input's format)")
    if out.is_dir():
        raise CheckpointError(f"the output {out} is a folder; name the .safetensors file to write")


def _find_encoders(into: Path) -> list[FoundEncoder]:
    """The file's encoders (reading it through safetensors first: a cut or damaged file fails here)."""
    found = find_text_encoders(into)
    if not found:
        from safetensors import safe_open

        with safe_open(str(into), framework="pt", device="cpu") as f:
            keys = list(f.keys())
        raise CheckpointError(f"{into} holds no CLIP text encoder to replace (none of the keys of an SD "
                              f"1.x/2.x/SDXL/SD 3 checkpoint's text encoders, nor a text encoder alone); it has "
                              f"{_describe_keys(keys)}")
    return found


def _read_header(path: Path) -> tuple[int, dict[str, _Entry]]:
    """The end of the header and every tensor's entry, with absolute byte ranges (the published format:
    an 8-byte little-endian header length, the JSON header, then the tensors' bytes)."""
    size = path.stat().st_size

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: not a complete .safetensors file ({what})")

    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise bad(f"a header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise bad(f"its header is not JSON: {error}") from None
    start = 8 + length
    entries = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        begin, end = value["data_offsets"]
        entries[key] = _Entry(value["dtype"], tuple(value["shape"]), start + begin, start + end)
    if max((e.end for e in entries.values()), default=start) != size:
        raise bad(f"its tensors end at byte {max(e.end for e in entries.values())}, the file at {size}")
    return start, entries


def _tower_weights(tower: TowerState, encoder: str) -> dict[str, torch.Tensor]:
    """A tower's text weights under OpenCLIP's names (a CLIP's image tower and buffers left out)."""
    state = tower.text_state_dict() if isinstance(tower, TextTransformer) else (
        tower.state_dict() if isinstance(tower, torch.nn.Module) else tower)
    weights = {name: value for name, value in state.items() if _openclip_name(name) is not None}
    if not weights:
        raise CheckpointError(f"the tower given for {encoder} has no text-tower tensors (OpenCLIP names such as "
                              f"token_embedding.weight); it has {_describe_keys(list(state))}")
    return weights


def _file_tensor(found: FoundEncoder, key: str, name: str, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tower's tensor for one key of the file, in the file's layout (not yet in its dtype)."""
    if found.layout == OPENCLIP:
        return weights[name]
    assert found.layout == HF
    # transformers splits a block's in_proj into q, k and v and stores the projection transposed
    return openclip_to_hf_state_dict({name: weights[name]})[with_text_model_prefix(key[len(found.prefix):])]


def _plan(path: Path, found: FoundEncoder, entries: Mapping[str, _Entry],
          weights: dict[str, torch.Tensor]) -> list[tuple[_Entry, Callable[[], torch.Tensor]]]:
    """Each of the encoder's tensors with how to make its new value, checked (names and shapes) now."""
    names = {name for _, name in found.keys}
    extra = set(weights) - names
    if extra == {"text_projection"}:  # a CLIPTextModel slot (SD 1.x) has no projection to write into
        projection = weights.pop("text_projection")
        if projection.shape[0] != projection.shape[-1] or not torch.equal(
                projection.cpu(), torch.eye(projection.shape[0], dtype=projection.dtype)):
            logger.warning("the tower's text_projection is not written: %s has none", _label(path, found))
    file_shapes = encoder_shapes(found, lambda key: entries[key].shape, _label(path, found))
    if set(weights) != names:
        _mismatch(path, found, file_shapes, weights, sorted(set(weights) ^ names)[0])
    plan = []
    for key, name in found.keys:
        entry = entries[key]
        dtype = safetensors_dtype(entry.dtype)
        if dtype is None:
            raise CheckpointError(f"{path}: {key} has dtype {entry.dtype}, which ldmclip cannot write")
        if tuple(_file_tensor(found, key, name, weights).shape) != entry.shape:
            _mismatch(path, found, file_shapes, weights, name)

        def make(found=found, key=key, name=name, dtype=dtype) -> torch.Tensor:
            return _file_tensor(found, key, name, weights).detach().to("cpu", dtype).contiguous()

        plan.append((entry, make))
    return plan


def _mismatch(path: Path, found: FoundEncoder, file_shapes: Mapping[str, int | None],
              weights: Mapping[str, torch.Tensor], name: str) -> None:
    tower = FoundEncoder(found.family, found.encoder, OPENCLIP, "", tuple((n, n) for n in weights))
    try:
        described = _describe(encoder_shapes(tower, lambda n: tuple(weights[n].shape), "the tower"))
    except CheckpointError as error:
        described = str(error)
    first = f"{name}: {'missing' if name not in weights else tuple(weights[name].shape)} in the tower"
    raise CheckpointError(f"the tower given for {found.encoder} ({described}) does not fit {_label(path, found)} "
                          f"({_describe(file_shapes)}; first difference {first}); nothing was written")


def _stream(src: Path, temp: Path, replacements: list[tuple[_Entry, Callable[[], torch.Tensor]]]) -> None:
    """``src`` copied to ``temp`` with the replaced tensors' byte ranges substituted."""
    size = src.stat().st_size
    buffer = bytearray(_COPY_CHUNK)
    with open(src, "rb") as fin, open(temp, "wb") as fout:
        position = 0
        for entry, make in sorted(replacements, key=lambda r: r[0].start):
            _copy(fin, fout, position, entry.start, buffer)
            tensor = make()
            data = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""
            if len(data) != entry.end - entry.start:  # the shapes and dtypes were checked: a bug, not input
                raise RuntimeError(f"{len(data)} bytes for a tensor of {entry.end - entry.start}")
            fout.write(data)
            position = entry.end
        _copy(fin, fout, position, size, buffer)
        if fout.tell() != size:
            raise RuntimeError(f"wrote {fout.tell()} bytes of {size}")


def _copy(fin: BinaryIO, fout: BinaryIO, start: int, end: int, buffer: bytearray) -> None:
    """Bytes ``[start, end)`` of ``fin`` appended to ``fout`` through one reused buffer."""
    fin.seek(start)
    view = memoryview(buffer)
    left = end - start
    while left > 0:
        n = fin.readinto(view[:min(left, len(buffer))])
        if not n:
            raise CheckpointError(f"{fin.name} ended {left} bytes early while it was being copied")
        fout.write(view[:n])
        left -= n
