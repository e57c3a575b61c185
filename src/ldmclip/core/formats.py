"""What an input path is, and whether a model name carries its own weights: written once, so that
``train``, ``eval``, ``cache-text``, ``index`` and ``pack`` read the same path the same way."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

__all__ = ["IMAGE_SUFFIXES", "TABLE_DELIMITERS", "PARQUET_SUFFIXES", "TABLE_SUFFIXES", "HF_HUB_PREFIX",
           "LOCAL_DIR_PREFIX", "OPENCLIP_CONFIG_NAME", "OPENCLIP_WEIGHT_NAMES", "is_image_file", "is_table", "is_shards",
           "input_kind", "carries_weights", "name_bytes", "name_to_text", "text_to_name",
           "BenchmarkShards", "benchmark_shards", "BENCHMARK_NSHARDS", "BENCHMARK_TYPE", "BENCHMARK_CLASSNAMES",
           "BENCHMARK_TEMPLATES"]

# Image files PIL reads, by suffix (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Caption / label tables: comma- or tab-separated text (by suffix, its delimiter), or parquet.
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = (*TABLE_DELIMITERS, *PARQUET_SUFFIXES)

# Model names that are a checkpoint themselves (config and weights in one place).
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

# OpenCLIP's hub layout: a folder with this config and one of these weight files (the first is written).
OPENCLIP_CONFIG_NAME = "open_clip_config.json"
OPENCLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                         "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")

_TAR = re.compile(r"\.tar(\.gz)?($|[\s}'\"])")


def is_image_file(name: str | os.PathLike) -> bool:
    return os.fspath(name).lower().endswith(IMAGE_SUFFIXES)


# File names are bytes. Python hands a name that is not valid UTF-8 over as a str with "surrogate
# escapes" (byte 0xE9 -> U+DCE9), which no UTF-8 encoder (JSON writers, hashes of .encode()) accepts.
# Hash ``name_bytes(name)``; write ``name_to_text(name)`` to JSON and read it back with ``text_to_name``.
_ESCAPED_BYTE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
# A backslash is doubled only where the reader would otherwise take it for an escape, so a name
# without undecodable bytes (every valid UTF-8 name but those with such backslashes) is unchanged.
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=\\|x[89a-fA-F][0-9a-fA-F]|[\udc80-\udcff])")


def name_bytes(name: str | os.PathLike) -> bytes:
    """The bytes of a file name, as the file system holds them (what a name's hash is taken of)."""
    return os.fsencode(name)


def name_to_text(name: str | os.PathLike) -> str:
    """A file name as valid Unicode text, for JSON and for display: each byte that is not valid UTF-8
    becomes ``\\xNN`` (``caf\\xe9.jpg``), and a backslash that would read as such an escape (before
    ``\\``, ``xNN`` with NN >= 80, or such a byte) is doubled. Reversible with :func:`text_to_name`; any
    other valid UTF-8 name is returned unchanged."""
    text = os.fsdecode(name_bytes(name))
    text = _AMBIGUOUS_BACKSLASH.sub(r"\\\\", text)
    return _UNDECODABLE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


def text_to_name(text: str) -> str:
    """The file name (a ``str`` for ``open``, surrogate-escaped where needed) of :func:`name_to_text`'s text."""
    return _ESCAPED_BYTE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)),
                             text)


def is_table(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(TABLE_SUFFIXES)


def is_shards(spec: str | os.PathLike) -> bool:
    """webdataset shards: a ``.tar`` path, a brace pattern (``{00000..00009}``), a URL, ``pipe:`` or a
    ``::``-joined list."""
    text = os.fspath(spec)
    return (text.startswith("pipe:") or "::" in text or "://" in text or "{" in text
            or _TAR.search(text.lower()) is not None)


def input_kind(spec: str | os.PathLike) -> str:
    """``"folder"``, ``"table"``, ``"shards"`` or ``"text"`` (one caption per line), from the path alone."""
    text = os.fspath(spec)
    if is_shards(text):
        return "shards"
    if is_table(text):
        return "table"
    if Path(text).is_dir():
        return "folder"
    return "text"


def carries_weights(name: str) -> bool:
    """Whether a ``--model`` name is a checkpoint itself, so no ``--pretrained`` is needed."""
    return name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))


# CLIP_benchmark's webdataset layout (clip_benchmark 1.6.2: webdataset_builder.py writes it,
# datasets/builder.py's build_wds_dataset reads it):
#   ROOT/SPLIT/{0..N-1}.tar  ROOT/SPLIT/nshards.txt (N; mandatory)
#   ROOT/dataset_type.txt    ("retrieval", "multilabel"; absent: classification)
#   ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt (classification, one per line)
# Classification samples hold an image and an integer ``cls``; retrieval samples an image and one
# ``txt`` with all the image's captions, one per line.
BENCHMARK_NSHARDS = "nshards.txt"
BENCHMARK_TYPE = "dataset_type.txt"
BENCHMARK_CLASSNAMES = "classnames.txt"
BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"
BENCHMARK_KINDS = ("classification", "retrieval", "multilabel")
BENCHMARK_DEFAULT_SPLIT = "test"  # CLIP_benchmark's default --split


@dataclass(frozen=True)
class BenchmarkShards:
    """A split of a CLIP_benchmark webdataset: ``shards`` (a brace pattern or the path given) and the
    dataset ``root`` its class names, templates and type sit in."""

    root: Path
    split: str
    shards: str
    kind: str  # one of BENCHMARK_KINDS

    @property
    def classnames_file(self) -> Path:
        return self.root / BENCHMARK_CLASSNAMES

    @property
    def templates_file(self) -> Path:
        return self.root / BENCHMARK_TEMPLATES


def _split_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and (Path(entry.path) / BENCHMARK_NSHARDS).is_file())


def _nshards(split_dir: Path) -> int:
    path = split_dir / BENCHMARK_NSHARDS
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{path}: expected the number of shards (a positive integer), found {text[:40]!r}")
    return int(text)


def _benchmark_kind(root: Path) -> str:
    path = root / BENCHMARK_TYPE
    if not path.is_file():
        return "classification"  # as build_wds_dataset assumes
    kind = path.read_text(encoding="utf-8", errors="replace").strip().lower()
    if kind not in BENCHMARK_KINDS:
        raise UserError(f"{path}: unknown dataset type {kind[:40]!r} (CLIP_benchmark writes "
                        f"{', '.join(BENCHMARK_KINDS[1:])}, or no such file for classification)")
    return kind


def _whole_split(root: Path, split: str) -> BenchmarkShards:
    split_dir = root / split
    count = _nshards(split_dir)
    missing = [f"{i}.tar" for i in range(count) if not (split_dir / f"{i}.tar").is_file()]
    if missing:
        raise UserError(f"{split_dir}: {BENCHMARK_NSHARDS} says {count} shard(s) but {len(missing)} are missing "
                        f"(e.g. {missing[0]})")
    return BenchmarkShards(root, split, os.path.join(split_dir, f"{{0..{count - 1}}}.tar"), _benchmark_kind(root))


def benchmark_shards(spec: str | os.PathLike) -> BenchmarkShards | None:
    """The CLIP_benchmark webdataset ``spec`` names, or ``None`` when it is not one: the dataset folder
    (its ``test`` split, or its only split), a split folder (holding ``nshards.txt``), or shards inside a
    split folder (those shards only)."""
    text = os.fspath(spec)
    if "://" in text or text.startswith("pipe:") or "::" in text:
        return None
    path = Path(text)
    if path.is_dir():
        if (path / BENCHMARK_NSHARDS).is_file():
            return _whole_split(path.parent, path.name)
        splits = _split_folders(path)
        if not splits:
            return None
        if BENCHMARK_DEFAULT_SPLIT in splits or len(splits) == 1:
            return _whole_split(path, BENCHMARK_DEFAULT_SPLIT if BENCHMARK_DEFAULT_SPLIT in splits else splits[0])
        raise UserError(f"{path}: a CLIP_benchmark dataset with splits {', '.join(splits)} and no "
                        f"'{BENCHMARK_DEFAULT_SPLIT}': name the split folder (e.g. {path / splits[0]})")
    if is_shards(text) and "{" not in os.path.dirname(text) and (path.parent / BENCHMARK_NSHARDS).is_file():
        return BenchmarkShards(path.parent.parent, path.parent.name, text, _benchmark_kind(path.parent.parent))
    return None
