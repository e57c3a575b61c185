"""Image samples joined with their cached text embeddings by key (:class:`CacheJoin`), and the same with
caption variants and caption dropout (:class:`VariantJoin`). ``TextEmbeddingCache.join`` builds them;
this module does not import the reader (``cache`` is any ``TextEmbeddingCache``), so the two stay acyclic.

Caption variants and caption dropout while training: per sample and epoch, one caption variant of
the text-embedding cache is drawn, and with probability ``drop`` the caption is dropped (classifier-free
guidance training), as kohya's ``caption_dropout_rate`` and SimpleTuner's ``caption_dropout_probability``
do, but from cached embeddings.

The draws are a pure function of ``(seed, epoch, key)``: two 64-bit numbers from
``hashlib.blake2b`` of the three (a counter-based generator, no state), so the same seed and epoch give
the same draws whatever the order of the samples and however they are split over DataLoader workers,
ranks and nodes, and a resumed run draws what the interrupted one would have.

* ``variants={"txt": 0.5, "synthetic": 0.5}``: weights, normalised to sum 1 (``{"txt": 1, "synthetic":
  1}`` is the same); for each key they are renormalised over the variants it has (a key without a
  synthetic caption always gets its ``txt``). Variants left out are never drawn. ``None``: the key's
  default variant (what ``cache[key]`` gives).
* ``drop``: the probability that the caption is dropped, drawn independently of the variant: the item
  then carries the cache's empty-prompt embedding (``drop_to="empty"``, the preset's ``""`` as SD
  trains it) or zeros of the same shapes (``"zeros"``, as SDXL's ``force_zeros_for_empty_prompt``).
* ``missing``: what happens to a sample whose key is not cached, or has none of the weighted variants:
  ``"skip"`` (default), ``"empty"`` (the empty prompt) or ``"error"``.

Each item is the sample's entries plus ``"hidden"`` (and ``"pooled"``) and ``"variant"``: the name of the
variant used, or ``""`` (:data:`NO_CAPTION`) when the caption was dropped (or missing with
``missing="empty"``); a string either way, so that ``default_collate`` batches it (it refuses ``None``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import multiprocessing
import multiprocessing.context
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..core.errors import UserError

__all__ = ["CacheJoin", "JOIN_MISSING", "VariantJoin", "draw_caption", "DROP_TO", "NO_CAPTION"]


JOIN_MISSING = ("skip", "empty", "error")


class CacheJoin(torch.utils.data.IterableDataset):
    """Image samples with their cached text embeddings, for an LDM training loop.

    ``samples`` is any ldmclip dataset (``ShardDataset``, ``CaptionTable``, ...) or iterable whose items
    are :class:`~ldmclip.data.Sample` tuples (``image, caption, key``), dicts with a ``"__key__"`` or
    ``"key"`` entry (webdataset style), or ``None`` (a bad sample). Each good item becomes a dict:
    ``{"key", "image", "caption", "hidden", "pooled"}`` for a ``Sample``, the item's own entries plus
    ``"hidden"``/``"pooled"`` for a dict. A map-style dataset is iterated in index order, split between
    DataLoader workers (worker ``w`` of ``n`` takes the indices ``i % n == w``); an ``IterableDataset``
    splits itself.

    A key that is not in the cache is skipped (``missing="skip"``, default), given the empty-prompt
    embedding (``"empty"``: the image trains unconditionally) or raises ``KeyError`` (``"error"``).
    ``stats`` counts, per process, ``joined``, ``missing_key``, ``empty_prompt`` and ``bad_sample``.
    """

    def __init__(self, cache: Any, samples: Any, *, missing: str = "skip") -> None:
        super().__init__()
        if missing not in JOIN_MISSING:
            raise ValueError(f"missing must be one of {', '.join(JOIN_MISSING)}, got {missing!r}")
        self.cache = cache
        self.samples = samples
        self.missing = missing
        self.stats: collections.Counter = collections.Counter()

    def _items(self) -> Iterator[Any]:
        samples = self.samples
        map_style = (not isinstance(samples, torch.utils.data.IterableDataset)
                     and hasattr(samples, "__len__") and hasattr(samples, "__getitem__"))
        if not map_style:
            yield from samples
            return
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(samples), workers):
            yield samples[index]

    def set_epoch(self, epoch: int) -> None:
        """Passed on to ``samples`` when it has ``set_epoch`` (e.g. a ``ShardDataset``'s shuffle)."""
        if hasattr(self.samples, "set_epoch"):
            self.samples.set_epoch(epoch)

    @staticmethod
    def _key_and_base(item: Any) -> tuple[str, dict[str, Any]]:
        """The key of a sample and the entries it brings to the joined item."""
        if isinstance(item, Mapping):
            key = item.get("__key__", item.get("key"))
            base = dict(item)
        elif hasattr(item, "key") and hasattr(item, "image"):
            key = item.key
            base = {"key": item.key, "image": item.image, "caption": getattr(item, "caption", None)}
        else:
            raise TypeError(f"cannot find the key of a {type(item).__name__} sample; give Sample tuples "
                            "or dicts with a '__key__' or 'key' entry")
        return str(key), base

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty = None
        for item in self._items():
            if item is None:
                self.stats["bad_sample"] += 1
                continue
            key, base = self._key_and_base(item)
            if key in self.cache:
                embedding = self.cache[key]
            elif self.missing == "skip":
                self.stats["missing_key"] += 1
                continue
            elif self.missing == "empty":
                empty = empty if empty is not None else self.cache.empty_prompt()
                embedding = empty
                self.stats["empty_prompt"] += 1
            else:
                raise KeyError(f"sample key {key!r} is not in the text-embedding cache {self.cache.path}")
            self.stats["joined"] += 1
            yield {**base, **embedding}


DROP_TO = ("empty", "zeros")
NO_CAPTION = ""  # the "variant" of an item whose caption was dropped
_TWO_64 = float(2 ** 64)


def _uniforms(seed: int, epoch: int, key: str) -> tuple[float, float]:
    """Two independent numbers in [0, 1) for ``(seed, epoch, key)``: the dropout draw and the variant draw."""
    message = json.dumps(["ldmclip-caption-draw", int(seed), int(epoch), str(key)]).encode("utf-8")
    digest = hashlib.blake2b(message, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / _TWO_64, int.from_bytes(digest[8:], "little") / _TWO_64


def draw_caption(key: str, available: Sequence[str], weights: Mapping[str, float], drop: float, seed: int,
                 epoch: int) -> tuple[bool, str | None]:
    """``(dropped, variant)`` for one sample: ``variant`` is drawn among ``available`` with ``weights``
    (renormalised over them; missing names weigh 0), ``None`` when none of them has a weight."""
    u_drop, u_variant = _uniforms(seed, epoch, key)
    candidates = [(name, float(weights.get(name, 0.0))) for name in available]
    candidates = [(name, w) for name, w in candidates if w > 0]
    if not candidates:
        return False, None
    target = u_variant * sum(w for _, w in candidates)
    chosen = candidates[-1][0]  # when rounding puts target at the very top
    total = 0.0
    for name, w in candidates:
        total += w
        if target < total:
            chosen = name
            break
    return u_drop < drop, chosen


def _checked_weights(cache: Any, variants: Mapping[str, float] | None) -> dict[str, float] | None:
    if variants is None:
        return None
    if not isinstance(variants, Mapping) or not variants:
        raise UserError("variants must be a dict of caption variant -> probability, e.g. {'txt': 0.5, 'synthetic': 0.5}")
    unknown = [name for name in variants if name not in cache.variants]
    if unknown:
        raise UserError(f"unknown caption variant(s) {', '.join(map(repr, unknown))}; the cache {cache.path} has "
                        f"{', '.join(cache.variants)}")
    weights = {}
    for name, p in variants.items():
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or p < 0:
            raise UserError(f"the probability of caption variant {name!r} must be a number >= 0, got {p!r}")
        weights[name] = float(p)
    total = sum(weights.values())
    if total <= 0:
        raise UserError("the caption variant probabilities are all 0: give at least one a weight above 0")
    return {name: w / total for name, w in weights.items()}


class VariantJoin(CacheJoin):
    """A :class:`~ldmclip.conditioning.cache_reader.CacheJoin` that draws a caption variant and caption
    dropout per sample and epoch (module docs). Call ``set_epoch(epoch)`` before each epoch (before
    ``iter(loader)``; DataLoader workers, persistent ones too, see it); it is passed on to ``samples``.
    ``stats`` also counts ``dropped`` and ``variant:NAME``."""

    def __init__(self, cache: Any, samples: Any, *, variants: Mapping[str, float] | None = None,
                 drop: float = 0.0, seed: int = 0, epoch: int = 0, drop_to: str = "empty",
                 missing: str = "skip") -> None:
        super().__init__(cache, samples, missing=missing)
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= float(drop) <= 1.0:
            raise UserError(f"drop is the probability of dropping a caption, between 0 and 1; got {drop!r}")
        if drop_to not in DROP_TO:
            raise UserError(f"drop_to must be one of {', '.join(DROP_TO)}, got {drop_to!r}")
        self.weights = _checked_weights(cache, variants)
        self.drop = float(drop)
        self.seed = int(seed)
        self.drop_to = drop_to
        # Shared with DataLoader workers, persistent ones too (as ShardDataset's epoch): set_epoch() in the
        # main process is seen by the workers when the next epoch starts.
        self._epoch: Any = multiprocessing.Value("q", int(epoch), lock=False)

    # -- epoch ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch if isinstance(self._epoch, int) else int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self._epoch, int):
            self._epoch = int(epoch)
        else:
            self._epoch.value = int(epoch)
        super().set_epoch(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # A shared Value only travels to a process being started; other pickles get the current value.
        if multiprocessing.context.get_spawning_popen() is None and not isinstance(self._epoch, int):
            state["_epoch"] = self.epoch
        return state

    # -- draws ----------------------------------------------------------------------------------------
    def draw(self, key: str, epoch: int | None = None) -> tuple[bool, str | None]:
        """``(dropped, variant)`` of a cached ``key`` in ``epoch`` (default: the current one); ``variant``
        is None when the key has none of the weighted variants."""
        available = self.cache.variants_of(key)
        weights = self.weights if self.weights is not None else {available[0]: 1.0}
        return draw_caption(key, available, weights, self.drop, self.seed, self.epoch if epoch is None else epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty: dict[str, torch.Tensor] | None = None    # missing="empty": the empty prompt
        dropped_to: dict[str, torch.Tensor] | None = None  # a dropped caption: the empty prompt or zeros
        epoch = self.epoch
        for item in self._items():
            if item is None:
                self.stats["bad_sample"] += 1
                continue
            key, base = self._key_and_base(item)
            cached = key in self.cache
            dropped, name = self.draw(key, epoch) if cached else (False, None)
            if name is None:  # not cached, or none of the variants asked for
                self.stats["missing_key" if not cached else "missing_variant"] += 1
                if self.missing == "skip":
                    continue
                if self.missing == "error":
                    raise KeyError(f"sample key {key!r} is not in the text-embedding cache {self.cache.path}"
                                   + (" with any of the variants asked for" if cached else ""))
                empty = empty if empty is not None else self.cache.empty_prompt()
                embedding, name = empty, NO_CAPTION
                self.stats["empty_prompt"] += 1
            elif dropped:
                dropped_to = dropped_to if dropped_to is not None else self._dropped_embedding()
                embedding, name = dropped_to, NO_CAPTION
                self.stats["dropped"] += 1
            else:
                embedding = self.cache.variant(key, name)
                self.stats[f"variant:{name}"] += 1
            self.stats["joined"] += 1
            yield {**base, **embedding, "variant": name}

    def _dropped_embedding(self) -> dict[str, torch.Tensor]:
        empty = self.cache.empty_prompt()
        return {k: torch.zeros_like(v) for k, v in empty.items()} if self.drop_to == "zeros" else empty
