"""Reading a text-embedding cache (the layout is described in ``ldmclip.conditioning.cache``):
random access by key, a ``torch.utils.data.Dataset``, and a join with image samples by key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.utils.data

from .cache import CACHE_DTYPES, EMPTY_PROMPT_NAME, FORMAT_VERSION, READ_DTYPE_OF_COMPACT, CacheError, cache_store
from .cache_join import JOIN_MISSING, CacheJoin, VariantJoin
from .quantize import SCALE_SUFFIX, dequantize, is_compact

__all__ = ["TextEmbeddingCache", "CachedTextDataset", "CacheJoin", "JOIN_MISSING"]

class TextEmbeddingCache(Mapping):
    """Read a text-embedding cache: ``cache[key]`` is ``{"hidden": [T, W], "pooled": [D]}``
    (``pooled`` only when the preset has one), in the stored dtype, or ``dtype`` when given.

    int8 / fp8 caches are read back transparently: every access (``cache[key]``, ``get_batch``,
    ``empty_prompt()``, ``dataset()``, ``join()``) gives dequantised float tensors of the same shapes,
    float16 by default (its rounding, 2**-11 relative, is far below int8's and fp8's error); pass
    ``dtype=torch.bfloat16`` or ``torch.float32`` for another. Only the rows asked for, and their scales,
    are read from the memory-mapped files.

    The shard files are memory-mapped (safetensors ``safe_open``) and opened on first use, per process,
    so the cache can be handed to DataLoader workers. The key index (key -> shard, row) is built from
    the shard headers when the cache is opened. It is a read-only ``Mapping``: ``len``, ``in``,
    ``keys()``, ``get()``. ``dataset()`` gives a ``torch.utils.data.Dataset`` and ``join(samples)``
    adds the embeddings to image samples by key.

    Attributes:
        manifest: the parsed ``manifest.json``.
        duplicate_keys: keys found in more than one shard (the first shard in name order wins).
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        self.path = Path(path)
        store = cache_store(self.path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"text-embedding cache not found: {self.path}")
        manifest = store.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.path} holds no {store.manifest_path.name}: not a text-embedding cache "
                                    "(make one with `ldmclip cache-text`)")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise CacheError(f"{self.path} was written by a newer ldmclip (cache format "
                             f"{manifest.get('format_version')}); upgrade ldmclip to read it")
        self.manifest: dict[str, Any] = manifest
        stored = manifest.get("dtype")
        if stored not in CACHE_DTYPES:
            raise CacheError(f"{self.path} stores its embeddings as {stored!r}, which this ldmclip cannot read "
                             f"(it knows {', '.join(CACHE_DTYPES)}); upgrade ldmclip to read it")
        self._compact = is_compact(stored)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
        self._read_dtype = dtype if dtype is not None else (READ_DTYPE_OF_COMPACT if self._compact else None)
        self._files: list[Path] = store.chunk_files()
        self.shard_names: list[str] = [store.chunk_name(p) for p in self._files]
        from .variants import VariantIndex  # key -> row, and (key, caption variant) -> row

        self._index = VariantIndex([v["name"] for v in manifest.get("variants") or []])
        self.duplicate_keys = 0
        for number, file in enumerate(self._files):
            meta = store.read_chunk_meta(file)
            for key, row in zip(meta["keys"], meta["rows"]):
                if key in self._index:
                    self.duplicate_keys += 1
                else:
                    self._index[key] = (number, int(row))
            self._index.add_variants(number, meta)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # -- description ------------------------------------------------------------------------------------
    @property
    def preset(self) -> str | None:
        return self.manifest.get("preset")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tensors this reader gives (int8/fp8 caches: the dequantised dtype)."""
        return self._read_dtype or CACHE_DTYPES[self.manifest["dtype"]]

    @property
    def stored_dtype(self) -> str:
        """The dtype name the embeddings are stored as (``manifest["dtype"]``: fp16, bf16, fp32, int8, fp8)."""
        return self.manifest["dtype"]

    @property
    def has_pooled(self) -> bool:
        return self.manifest.get("pooled_dim") is not None

    # -- caption variants (variants.py) -------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        """The caption variant names, the default first (``["default"]`` for a cache made without variants)."""
        return list(self._index.names)

    def variants_of(self, key: str) -> list[str]:
        """The variants ``key`` has (``KeyError`` if the key is not cached)."""
        return [name for name, row in zip(self._index.names, self._index.rows_of(key)) if row is not None]

    def variant(self, key: str, name: str) -> dict[str, torch.Tensor]:
        """The embedding of ``key``'s caption variant ``name``, shaped like ``cache[key]`` (which gives the
        default variant, or the key's first one in the listed order when it has no default)."""
        if name not in self._index.names:
            raise KeyError(f"unknown caption variant {name!r}; this cache has {', '.join(self._index.names)}")
        if key not in self._index:
            raise KeyError(key)
        if name not in self.variants_of(key):
            raise KeyError(f"key {key!r} has no caption variant {name!r} (it has {', '.join(self.variants_of(key))})")
        return self[(key, name)]  # type: ignore[index] - VariantIndex resolves (key, name) pairs

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, keys={len(self)}, shards={len(self._files)}, "
                f"preset={self.preset!r}, dtype={self.manifest.get('dtype')!r}, "
                f"hidden={self.manifest.get('hidden_shape')}, pooled_dim={self.manifest.get('pooled_dim')})")

    # -- access -------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # memory maps do not travel to other processes; reopened there
        return state

    def _handle(self, number: int) -> Any:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(number)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[number] = safe_open(str(self._files[number]), framework="pt")
        return handle

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def location(self, key: str) -> tuple[str, int]:
        """``(shard name, row)`` of a key (``KeyError`` if absent)."""
        number, row = self._index[key]
        return self.shard_names[number], row

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        number, row = self._index[key]
        handle = self._handle(number)
        item = {"hidden": self._row(handle, "hidden", row)}
        if self.has_pooled:
            item["pooled"] = self._row(handle, "pooled", row)
        return item

    def _row(self, handle: Any, name: str, row: int) -> torch.Tensor:
        """One row of tensor ``name`` (and of its scale, for int8/fp8), in the reader's dtype."""
        values = handle.get_slice(name)[row]
        if self._compact:
            return dequantize(values, handle.get_slice(name + SCALE_SUFFIX)[row], self.dtype)
        return values if self._read_dtype is None else values.to(self._read_dtype)

    def get_batch(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Embeddings of several keys stacked: ``{"hidden": [B, T, W], "pooled": [B, D]}``."""
        items = [self[k] for k in keys]
        if not items:
            raise ValueError("get_batch() needs at least one key")
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """Embedding of ``""`` (classifier-free guidance), same shapes as ``cache[key]``."""
        from safetensors.torch import load_file

        empty = load_file(str(self.path / EMPTY_PROMPT_NAME))  # int8/fp8 caches keep it exact (float32)
        return empty if self._read_dtype is None else {k: v.to(self._read_dtype) for k, v in empty.items()}

    def dataset(self, keys: Sequence[str] | None = None) -> "CachedTextDataset":
        """A map-style ``Dataset`` over ``keys`` (default: all, in index order) giving
        ``{"key", "hidden", "pooled"}`` dicts that ``default_collate`` batches."""
        return CachedTextDataset(self, keys)

    def join(self, samples: Any, *, missing: str = "skip", variants: Mapping[str, float] | None = None,
             drop: float = 0.0, seed: int = 0, epoch: int = 0, drop_to: str = "empty") -> "CacheJoin":
        """Add the cached embeddings to image samples by key; see :class:`CacheJoin`.

        With ``variants`` (probabilities per caption variant, e.g. ``{"txt": 0.5, "synthetic": 0.5}``) or
        ``drop`` (the probability of caption dropout), a :class:`~ldmclip.conditioning.cache_join.VariantJoin`:
        per sample and epoch (``set_epoch``), one variant drawn and the caption dropped to the empty prompt
        (``drop_to="empty"``) or zeros (``"zeros"``), deterministically from ``(seed, epoch, key)``."""
        if variants is None and not drop:
            return CacheJoin(self, samples, missing=missing)

        return VariantJoin(self, samples, missing=missing, variants=variants, drop=drop, seed=seed, epoch=epoch,
                           drop_to=drop_to)


class CachedTextDataset(torch.utils.data.Dataset):
    """``dataset[i]`` is ``{"key": keys[i], "hidden": ..., "pooled": ...}`` (``pooled`` when stored)."""

    def __init__(self, cache: TextEmbeddingCache, keys: Sequence[str] | None = None) -> None:
        self.cache = cache
        self.keys = list(cache.keys()) if keys is None else list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        return {"key": key, **self.cache[key]}
