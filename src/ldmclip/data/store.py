"""The resumable store: one folder of a manifest and finished chunks, written so that a run killed at
any moment can be restarted and continues where it stopped.

Layout::

    manifest.json                   what made the store (fields chosen by its user, ``"format"`` among them)
    CHUNK_DIR/NAME.safetensors      one finished chunk: tensors + one JSON metadata entry (``"ldmclip"``)

The text-embedding cache (``conditioning.cache``), the search index (``search.index``) and the dataset
pass all keep their results this way; :class:`ChunkStore` is the one implementation of the rules they
share:

* every file is written atomically (``core.files``: a hidden ``.NAME.tmp``, fsync, rename), so a chunk
  file that exists is finished and a killed run leaves only temporaries, which the next run removes;
* a folder without a manifest is used only when it holds nothing but what an interrupted first run
  leaves (hidden files, an empty chunk folder): an unrelated folder is refused, never written into;
* adding to a store made with another setup is refused with a message naming the fields that differ.

``canonical=True`` writes JSON with sorted keys (and compact, ASCII chunk metadata) so that a rerun gives
byte-identical files; ``canonical=False`` keeps insertion order and non-ASCII text as it is (the search
index's format). Either way, the bytes on disk depend only on what is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..core.errors import UserError
from ..core.files import write_json_atomic, write_safetensors

__all__ = ["MANIFEST_NAME", "META_KEY", "StoreError", "StoreMismatchError", "ChunkStore", "as_json_value",
           "differing_fields"]

MANIFEST_NAME = "manifest.json"
META_KEY = "ldmclip"  # one metadata entry only: safetensors readers may list several in any order
_TEMP_GLOB = ".*.tmp"  # core.files.temp_name's pattern


class StoreError(UserError):
    """A store folder that cannot be used: damaged, of another kind, or an unrelated folder."""


class StoreMismatchError(StoreError):
    """The store was made with another setup than this run's."""


def as_json_value(value: Any) -> Any:
    """``value`` as it reads back from a manifest (tuples become lists, unknown types strings), so that
    this run's setup compares equal to the one a store was made with."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differing_fields(existing: Mapping[str, Any], wanted: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    """The names among ``fields`` whose values differ once written as JSON (a missing field is ``None``)."""
    return [name for name in fields if as_json_value(existing.get(name)) != as_json_value(wanted.get(name))]


def _visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


class ChunkStore:
    """One store folder (see the module docs).

    Args:
        path: the folder.
        format_name: the manifest's ``"format"``; a manifest with another one is refused.
        chunk_dir: the subfolder of the chunk files.
        suffix: the chunk files' suffix; chunk names are file names without it.
        kind: what the store is, for messages ("text-embedding cache"); its last word is the short noun
            ("cache").
        canonical: sorted, compact JSON (byte-identical reruns) or insertion-ordered JSON; see above.
        error, mismatch: the exception classes raised for an unusable folder and a mismatched setup (the
            users' own subclasses of :class:`StoreError` / :class:`StoreMismatchError` or any ``UserError``).
        data_dirs: subfolders of files the user writes itself (atomically, through ``core.files``) before a
            chunk marks them finished (``ldmclip embed``'s ``img_emb``, ...): their temporaries are removed
            with the store's, and empty ones do not make the folder look unrelated.
    """

    def __init__(self, path: str | os.PathLike, format_name: str, chunk_dir: str, suffix: str = ".safetensors", *,
                 kind: str = "store", canonical: bool = True, error: type[Exception] = StoreError,
                 mismatch: type[Exception] = StoreMismatchError, data_dirs: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.format_name = format_name
        self.chunks = self.path / chunk_dir
        self.suffix = suffix
        self.kind = kind
        self.noun = kind.split()[-1]
        self.canonical = canonical
        self.error = error
        self.mismatch = mismatch
        self.data_dirs = [self.path / name for name in data_dirs]

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    # -- chunks -------------------------------------------------------------------------------------------
    def chunk_path(self, name: str) -> Path:
        return self.chunks / f"{name}{self.suffix}"

    def chunk_name(self, path: Path) -> str:
        return path.name[: -len(self.suffix)]

    def chunk_files(self) -> list[Path]:
        """The finished chunk files, sorted by name (temporaries are hidden files, never listed)."""
        if not self.chunks.is_dir():
            return []
        return sorted(p for p in self.chunks.iterdir()
                      if p.name.endswith(self.suffix) and not p.name.startswith(".") and p.is_file())

    def chunk_names(self) -> list[str]:
        return [self.chunk_name(p) for p in self.chunk_files()]

    def write_chunk(self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write chunk ``name`` atomically: ``tensors`` and ``meta`` (JSON) appear together or not at all."""
        path = self.chunk_path(name)
        self.write_tensors(path, tensors, meta)
        return path

    def write_tensors(self, path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Any safetensors file of the store (a chunk, or e.g. the cache's empty prompt), atomically."""
        if self.canonical:
            text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        else:
            text = json.dumps(meta, ensure_ascii=False)
        write_safetensors(path, tensors, {META_KEY: text})

    def read_chunk_meta(self, name_or_path: str | Path) -> dict[str, Any]:
        """The metadata of a finished chunk (a name, or a file of the store); ``error`` when the file is
        missing, damaged or not one of this store's chunks."""
        return self._open_chunk(name_or_path, tensors=False)[0]

    def read_chunk(self, name_or_path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(metadata, tensors)`` of a finished chunk, read in one open."""
        return self._open_chunk(name_or_path, tensors=True)

    def _open_chunk(self, name_or_path: str | Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import safe_open

        path = name_or_path if isinstance(name_or_path, Path) else self.chunk_path(name_or_path)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
                if raw is None:
                    raise ValueError(f"no '{META_KEY}' metadata: not an ldmclip {self.kind} chunk")
                meta = json.loads(raw)
                loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise self.error(f"chunk {path} of the {self.noun} is missing or damaged "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise self.error(f"chunk {path} of the {self.noun} is damaged (its metadata is not a JSON object)")
        return meta, loaded

    # -- the folder and its manifest ----------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or ``None`` when there is none; ``error`` when it is damaged or of another kind."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise self.error(f"{self.manifest_path} is damaged (not valid JSON: {e})") from None
        if not isinstance(manifest, dict):
            raise self.error(f"{self.manifest_path} is damaged (not a JSON object)")
        if manifest.get("format") != self.format_name:
            raise self.error(f"{self.path} is not an ldmclip {self.kind} (manifest format "
                             f"{manifest.get('format')!r})")
        return manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest, sort_keys=self.canonical)

    def check_unrelated(self) -> None:
        """Refuse a folder without a manifest unless it holds only what an interrupted first run leaves."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise self.error(f"{self.path} exists and is not a folder; choose a new folder for the {self.noun}")
        visible = [p.name for p in self.path.iterdir() if not p.name.startswith(".")
                   and not (p == self.chunks and p.is_dir() and not self.chunk_files())
                   and not (p in self.data_dirs and p.is_dir() and not _visible_files(p))]
        if visible:
            raise self.error(f"{self.path} is not empty and holds no {MANIFEST_NAME}, so it is not an ldmclip "
                             f"{self.kind} ({', '.join(sorted(visible)[:5])}); choose an empty or new folder "
                             f"for the {self.noun}")

    def remove_temporaries(self) -> None:
        """Delete what killed runs left: temporary files are never part of the store. Only one process
        may call this, before any other starts writing (it would delete their files in progress)."""
        for folder in (self.path, self.chunks, *self.data_dirs):
            if folder.is_dir():
                for p in folder.glob(_TEMP_GLOB):
                    p.unlink(missing_ok=True)

    def create(self) -> None:
        """Make the folder and its chunk folder and clear a killed run's temporaries."""
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries()

    def check_same(self, existing: Mapping[str, Any], wanted: Mapping[str, Any], fields: Iterable[str], *,
                   contents: str = "data", advice: str | None = None) -> None:
        """Raise ``mismatch`` naming each of ``fields`` that differs between the store's manifest
        (``existing``) and this run's (``wanted``); for an object field, the keys inside it that differ."""
        differ = differing_fields(existing, wanted, fields)
        if not differ:
            return
        details = []
        for name in differ:
            a, b = existing.get(name), wanted.get(name)
            if isinstance(a, (dict, type(None))) and isinstance(b, (dict, type(None))):  # one is a dict
                a, b = a or {}, b or {}
                keys = differing_fields(a, b, sorted(set(a) | set(b)))
                details.append(f"{name} ({', '.join(keys)} differ)")
            else:
                details.append(f"{name}: {self.noun} has {a!r}, this run {b!r}")
        advice = advice or f"Use another output folder, or the options the {self.noun} was made with."
        raise self.mismatch(f"{self.path} holds {contents} made with another setup ({'; '.join(details)}); "
                            f"refusing to mix them in one {self.noun}. {advice}")
