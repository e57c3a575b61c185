"""A search index: the normalised image embeddings of every image under a folder.

Layout of an index folder::

    manifest.json              what made the index (model identity, image root, dtype) and, once the
                               build finished, the chunk list and totals
    chunks/00000.safetensors   ``embeddings`` [n, D] (unit length) of up to ``chunk_size`` images, with
                               their relative paths and skipped files in the safetensors metadata
                               (file names as ``core.formats.name_to_text``: a byte that is not UTF-8
                               is written ``\\xNN``)

The images are listed once (recursively, sorted by relative path) and cut into chunks of
``chunk_size`` files. The folder is a ``ldmclip.data.store.ChunkStore`` (the text cache's store too):
a chunk file is written under a temporary name and renamed into place, so a chunk file that exists is
finished. Each chunk records a signature of the files it was planned from
(the bytes of the relative path, size, modification time) and the stored dtype: a rerun skips the chunks whose
signature still matches and recomputes the others (new, changed or removed files), so rerunning the
same command after a crash or Ctrl-C continues where it stopped, and rerunning it after the folder
changed brings the index up to date.

The model identity (config, preprocessing, sha256 of every weight) is stored in the manifest:
adding to, or searching, an index with another model is refused, since embeddings of two models
are not comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils.data

from ..core.formats import IMAGE_SUFFIXES, name_bytes, name_to_text, text_to_name
from ..data.folders import list_images
from ..data.samples import BadSample, apply_transform, decode_image
from ..data.store import ChunkStore, StoreError, StoreMismatchError, differing_fields
from ..registry import model_identity, model_weights_sha256

__all__ = ["SearchIndexError", "IndexMismatchError", "ImageFile", "BuildResult", "SearchIndex",
           "build_index", "find_images", "model_identity", "model_weights_sha256", "check_same_model", "index_store"]

FORMAT = "ldmclip-search-index"
FORMAT_VERSION = 1
CHUNK_DIR = "chunks"
CHUNK_SUFFIX = ".safetensors"
DEFAULT_CHUNK_SIZE = 4096
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class SearchIndexError(StoreError):
    """An index folder that cannot be used (missing, unfinished, damaged). A ``UserError``, so the
    command line prints it as a one-line error."""


class IndexMismatchError(SearchIndexError, StoreMismatchError):
    """The index was built by another model (or from another image folder)."""


def index_store(path: str | os.PathLike) -> ChunkStore:
    """The store of the index folder ``path``: insertion-ordered JSON, non-ASCII paths kept as they are."""
    return ChunkStore(path, FORMAT, CHUNK_DIR, CHUNK_SUFFIX, kind="search index", canonical=False,
                      error=SearchIndexError, mismatch=IndexMismatchError)


# ---------------------------------------------------------------------------------------------------
# Files and model identity


@dataclass(frozen=True)
class ImageFile:
    path: str          # relative to the image root, with '/' separators (the file system's name)
    size: int
    mtime_ns: int


def find_images(root: str | os.PathLike) -> list[ImageFile]:
    """Every image file under ``root`` (``data.folders.list_images``: recursive, by suffix, hidden files
    and folders left out, links to folders not followed), sorted by relative path so the chunks come
    out the same on every run."""
    root = Path(root)
    found: list[ImageFile] = []
    for rel in list_images(root).images:
        try:
            st = os.stat(root / rel)
        except OSError:  # a dangling link: kept, so it is counted as unreadable like other bad files
            st = None
        found.append(ImageFile(rel, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return found


def _describe(identity: dict[str, Any]) -> str:
    weights = identity.get("pretrained") or "its own weights"
    return f"{identity.get('name')} ({weights}; weights sha256 {str(identity.get('sha256'))[:12]}…)"


_MODEL_FIELDS = ("config", "preprocess", "sha256")  # what makes two models' embeddings comparable


def check_same_model(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise :class:`IndexMismatchError` unless both identities describe the same embeddings."""
    differs = ["weights" if k == "sha256" else k for k in differing_fields(stored, current, _MODEL_FIELDS)]
    if not differs:
        return
    raise IndexMismatchError(
        f"{where} was built with another model: {_describe(stored)}; the model given is {_describe(current)} "
        f"(differs in: {', '.join(differs)}). Embeddings of different models cannot be compared: use the model "
        f"that built the index, or build a new index with --out pointing to another folder.")


# ---------------------------------------------------------------------------------------------------
# Chunks


def _chunk_signature(files: Sequence[ImageFile], dtype: str) -> str:
    digest = hashlib.sha256(dtype.encode())
    for f in files:
        # The name's bytes: a name that is not UTF-8 hashes too (and a UTF-8 one as it always did).
        digest.update(b"\0" + name_bytes(f.path) + f"\0{f.size}\0{f.mtime_ns}".encode())
    return digest.hexdigest()


def _read_chunk_meta(store: ChunkStore, name: str) -> dict[str, Any] | None:
    """The metadata of a finished chunk, or ``None`` when it is not a readable chunk (then recomputed)."""
    try:
        return store.read_chunk_meta(name)
    except SearchIndexError:
        return None


# ---------------------------------------------------------------------------------------------------
# Building


class _ImageFiles(torch.utils.data.Dataset):
    """``dataset[i]`` is ``(i, tensor, None)`` or ``(i, None, reason)`` for an unreadable file."""

    def __init__(self, root: Path, paths: Sequence[str], transform: Callable) -> None:
        self.root, self.paths, self.transform = root, list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = decode_image(self.root / self.paths[i])
            return i, apply_transform(image, self.transform), None
        except BadSample as bad:
            return i, None, bad.reason


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


@dataclass
class BuildResult:
    """What ``build_index`` did: totals over the whole index and the work of this run."""

    out: Path
    files: int
    images: int
    skipped: dict[str, int]
    skipped_files: list[tuple[str, str]]
    chunks: int
    chunks_reused: int
    seconds: float
    embed_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _prepare(store: ChunkStore, header: dict[str, Any]) -> None:
    """Create the index folder or check that it holds an index of the same model and image folder."""
    existing = store.read_manifest()
    if existing is not None:
        check_same_model(existing.get("model", {}), header["model"], f"the index {store.path}")
        if differing_fields(existing, header, ["image_root"]):
            raise IndexMismatchError(
                f"the index {store.path} is an index of {existing.get('image_root')}, not of {header['image_root']}: "
                "pass that folder, or another --out for a new index")
    else:
        store.check_unrelated()
    store.create()
    store.write_manifest({**header, "complete": False})


@torch.inference_mode()
def build_index(model: Any, transform: Callable, root: str | os.PathLike, out: str | os.PathLike, *,
                identity: dict[str, Any], batch_size: int = 64, chunk_size: int = DEFAULT_CHUNK_SIZE,
                dtype: str = "float16", device: str | torch.device = "cpu", workers: int = 0,
                autocast: Callable[[], Any] | None = None, progress: bool = True) -> BuildResult:
    """Embed every image under ``root`` into the index folder ``out`` (see the module docs).

    ``identity`` is :func:`model_identity` of ``model``; ``transform`` its eval transform. Finished chunks
    of an earlier run are kept; unreadable files are skipped and counted by reason.
    """
    from tqdm.auto import tqdm

    from ..core.version import __version__

    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch size and chunk size must be at least 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    root, out, device = Path(root).resolve(), Path(out), torch.device(device)
    files = find_images(root)
    if not files:
        raise ValueError(f"no image files under {root} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    embed_dim = model.config.embed_dim
    header = {"format": FORMAT, "version": FORMAT_VERSION, "model": identity, "image_root": name_to_text(root),
              "dtype": dtype, "embed_dim": embed_dim, "chunk_size": chunk_size, "ldmclip_version": __version__}
    store = index_store(out)
    _prepare(store, header)

    plan = [files[i:i + chunk_size] for i in range(0, len(files), chunk_size)]
    names = [f"{n:05d}" for n in range(len(plan))]
    signatures = [_chunk_signature(chunk, dtype) for chunk in plan]
    todo = [n for n, (name, sig) in enumerate(zip(names, signatures))
            if ((_read_chunk_meta(store, name) or {}).get("signature") != sig)]
    autocast = autocast or contextlib.nullcontext
    bar = tqdm(total=sum(len(plan[n]) for n in todo), desc="index", unit="img", dynamic_ncols=True,
               disable=None if progress else True)  # None: a bar on a terminal, silence in logs
    try:
        for n in todo:
            _embed_chunk(model, transform, root, plan[n], store, names[n], signatures[n], dtype,
                         embed_dim, batch_size, device, workers, autocast, bar)
    finally:
        bar.close()
    for stale in store.chunk_files():  # chunks of an earlier, longer listing
        if store.chunk_name(stale) not in names:
            stale.unlink()

    skipped: Counter = Counter()
    skipped_files: list[tuple[str, str]] = []
    images = 0
    for name in names:
        meta = _read_chunk_meta(store, name)
        if meta is None:
            raise SearchIndexError(f"chunk {store.chunk_path(name)} cannot be read back; rerun the command")
        images += len(meta["paths"])
        skipped.update(meta["skipped"])
        skipped_files += [tuple(item) for item in meta["skipped_files"]]
    chunk_files = [store.chunk_path(name).name for name in names]
    store.write_manifest({**header, "complete": True, "chunks": chunk_files, "files": len(files),
                                  "images": images, "skipped": dict(sorted(skipped.items()))})
    return BuildResult(out=out, files=len(files), images=images, skipped=dict(sorted(skipped.items())),
                       skipped_files=skipped_files, chunks=len(names), chunks_reused=len(names) - len(todo),
                       seconds=time.perf_counter() - started, embed_dim=embed_dim)


def _embed_chunk(model, transform, root: Path, files: Sequence[ImageFile], store: ChunkStore, name: str, signature: str,
                 dtype: str, embed_dim: int, batch_size: int, device: torch.device, workers: int,
                 autocast, bar) -> None:
    dataset = _ImageFiles(root, [f.path for f in files], transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    rows: list[torch.Tensor] = []
    kept: list[str] = []
    bad: list[tuple[str, str]] = []
    for positions, images, failures in loader:
        bad += [(name_to_text(files[i].path), reason) for i, reason in failures]
        if images is not None:
            with autocast():
                features = model.encode_image(images.to(device, non_blocking=True))
            # Normalise in fp32: a bf16 autocast norm would leave vectors visibly off unit length.
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            rows.append(features.to("cpu", DTYPES[dtype]))
            kept += [name_to_text(files[i].path) for i in positions]
        bar.update(len(positions) + len(failures))
    embeddings = torch.cat(rows) if rows else torch.zeros(0, embed_dim, dtype=DTYPES[dtype])
    meta = {"signature": signature, "paths": kept, "skipped_files": bad,
            "skipped": dict(Counter(reason for _, reason in bad))}
    store.write_chunk(name, {"embeddings": embeddings}, meta)


# ---------------------------------------------------------------------------------------------------
# Reading


class SearchIndex:
    """A finished index, read into memory: ``embeddings`` [N, D] float32 (unit rows), ``paths`` (relative
    to ``root``, as text: ``core.formats.name_to_text``, so a name that is not UTF-8 shows and travels in
    JSON; ``file(i)`` is the file itself), ``manifest`` (as written) and ``identity`` (the model that made
    it)."""

    def __init__(self, path: Path, manifest: dict[str, Any], embeddings: torch.Tensor, paths: list[str],
                 root: Path) -> None:
        self.path, self.manifest, self.embeddings, self.paths, self.root = path, manifest, embeddings, paths, root
        self.identity: dict[str, Any] = manifest["model"]
        self._ids = {p: i for i, p in enumerate(paths)}

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def load(cls, path: str | os.PathLike, images: str | os.PathLike | None = None) -> "SearchIndex":
        """Read the index at ``path``. ``images`` replaces the stored image root (a moved folder)."""
        path = Path(path)
        store = index_store(path)
        manifest = store.read_manifest()
        if manifest is None:
            what = "folder not found" if not path.exists() else "no manifest.json in it"
            raise FileNotFoundError(f"search index {path}: {what} (build one with `ldmclip index IMAGES --out {path}`)")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise SearchIndexError(f"{path} was written by a newer ldmclip (index format {manifest.get('version')}); "
                              "upgrade ldmclip to read it")
        if not manifest.get("complete"):
            raise SearchIndexError(f"the index {path} is not finished: rerun the `ldmclip index` command that "
                              "built it (it continues where it stopped)")
        rows, paths = [], []
        for name in manifest["chunks"]:
            chunk = store.chunks / name
            try:
                meta, tensors = store.read_chunk(chunk)
            except SearchIndexError as e:
                raise SearchIndexError(f"{e}; rerun `ldmclip index` to rebuild it") from None
            if "embeddings" not in tensors or not isinstance(meta.get("paths"), list):
                raise SearchIndexError(f"chunk {chunk} of the index is damaged (no embeddings or paths); rerun "
                                       "`ldmclip index` to rebuild it")
            rows.append(tensors["embeddings"].float())
            if rows[-1].shape[0] != len(meta["paths"]):
                raise SearchIndexError(f"chunk {chunk} is damaged: {rows[-1].shape[0]} rows for "
                                       f"{len(meta['paths'])} paths")
            paths += meta["paths"]
        embed_dim = int(manifest.get("embed_dim", 0))
        embeddings = torch.cat(rows) if rows else torch.zeros(0, embed_dim)
        root = Path(images) if images is not None else Path(text_to_name(manifest["image_root"]))
        return cls(path, manifest, embeddings, paths, root)

    def id_of(self, relative_path: str) -> int | None:
        """The id of an indexed relative path, or ``None``."""
        return self._ids.get(relative_path)

    def file(self, i: int) -> Path:
        """The image file of entry ``i`` (an id from this index, never a user-supplied path)."""
        if not 0 <= i < len(self.paths):
            raise KeyError(i)
        return self.root / text_to_name(self.paths[i])
