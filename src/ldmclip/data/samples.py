"""What every ldmclip image–text dataset yields, how bad samples are counted, and batch collation.

Samples
-------
Every dataset (``CaptionTable``, ``ShardDataset``, ...) yields, per sample, either

* a :class:`Sample` ``(image, caption, key)`` named tuple: ``image`` is the output of the dataset's
  transform (a float32 tensor ``[3, S, S]`` for the ldmclip transforms; their RGB PIL image with
  ``defer_normalize=True``, normalised by the collator), ``caption`` a non-empty
  ``str`` (surrounding whitespace removed), ``key`` a string that identifies the sample in its source
  (``""`` when unknown). Being a tuple, ``sample[0]`` / ``sample[1]`` are the image and caption; or
* ``None`` when the sample is bad. The reason is never silent: it is recorded in the dataset's
  :class:`SampleStats` (``dataset.stats``, per process) and handed to :class:`ImageTextCollator`,
  which reports it in ``Batch.skipped``. Because the collator runs inside the DataLoader worker that
  produced the samples, summing ``Batch.skipped`` over all batches in the main process gives the
  counts of every worker (``SampleStats.update(batch)`` does it).

Reasons (the strings in the counters) are the ``REASON_*`` constants below.

How a reason reaches the batch: ``record_bad`` adds it to the dataset's stats and to a per-thread,
per-process "pending" counter; ``ImageTextCollator`` drains that counter into ``Batch.skipped``. A
DataLoader fetches a batch's samples and collates them in the same thread (of the worker process, or
of the main process with ``num_workers=0``), so each reason lands in the batch built right after it
was recorded: for map-style datasets that is the batch of the bad sample itself; for ``ShardDataset``
(shuffle buffer, shard-level errors) it may be a later batch of the same worker, but every reason is
reported exactly once. ``ShardDataset`` ends its stream with one extra ``None`` when reasons are still
pending, so they reach a (possibly empty) last batch; with ``drop_last=True`` that batch, and the
reasons it carries, can be dropped. Forked workers start with an empty pending counter.

Decoding
--------
``decode_image`` opens and fully decodes an image with PIL (``ldmclip.transforms.load_image``), with
PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) enforced: bombs, empty, truncated,
corrupt and non-image files raise :class:`BadSample` with the reason. The image keeps its mode; the
ldmclip transforms convert grayscale/CMYK/palette/alpha/16-bit images to RGB after cropping, exactly
as OpenCLIP does. Any other transform callable is given an RGB image (``Image.convert("RGB")``, the
same conversion).

One sample never costs the job, its memory or its time. The limits, each settable in one place:

* only regular files are read (``read_image_file``, through ``ldmclip.core.reading``): a FIFO named
  ``x.jpg`` is ``not_a_file`` at once, never an ``open()`` that blocks;
* ``ldmclip.core.reading.MAX_IMAGE_BYTES`` (64 MiB; env ``LDMCLIP_MAX_IMAGE_MB``): a bigger file is
  ``too_large`` and is not read;
* ``PIL.Image.MAX_IMAGE_PIXELS`` applies to the decoded image *and* to its resize to the transform's
  size, and ``ldmclip.transforms.MAX_ASPECT_RATIO`` (100:1) to its shape: a 1x20000 PNG is a
  ``decompression_bomb`` before it is decoded (a JPEG over the pixel limit decodes at 1/2..1/8 scale
  when that brings it under);
* ``MAX_CAPTION_CHARS`` (131,072): a longer caption is ``caption_too_long``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from PIL import Image

from ..core import reading
from ..transforms import EvalTransform, TrainTransform, load_image, resize_problem

__all__ = [
    "exit_if_orphaned",
    "exit_with_parent",
    "Sample",
    "SampleStats",
    "Batch",
    "BadSample",
    "ImageTextCollator",
    "decode_image",
    "read_image_file",
    "decode_caption",
    "apply_transform",
    "load_sample",
    "decode_sample",
    "DecodedSample",
    "record_bad",
    "drain_pending",
    "make_dataloader",
    "REASONS",
    "SHARD_REASONS",
    "MAX_CAPTION_CHARS",
]

logger = logging.getLogger("ldmclip.data")

# ----------------------------------------------------------------------------------------------------
# Reasons
# ----------------------------------------------------------------------------------------------------

REASON_MISSING_FILE = "missing_file"                # image path does not exist
REASON_NOT_A_FILE = "not_a_file"                    # a FIFO, socket, device or directory (never opened to read)
REASON_TOO_LARGE = "too_large"                      # more bytes than ldmclip.core.reading.MAX_IMAGE_BYTES
REASON_READ_ERROR = "read_error"                    # image path exists but cannot be read (permissions, I/O)
REASON_EMPTY_FILE = "empty_file"                    # zero-byte image file / tar member
REASON_NOT_AN_IMAGE = "not_an_image"                # PIL cannot identify the format
REASON_TRUNCATED_IMAGE = "truncated_image"          # image data ends early
REASON_CORRUPT_IMAGE = "corrupt_image"              # any other decoding failure
REASON_DECOMPRESSION_BOMB = "decompression_bomb"    # too many pixels decoded or resized (transforms.load_image)
REASON_TRANSFORM_ERROR = "transform_error"          # the transform raised (e.g. an unsupported mode)
REASON_MISSING_IMAGE = "missing_image"              # no image in the row / no image member for a key
REASON_MISSING_CAPTION = "missing_caption"          # no caption (null cell, no .txt member)
REASON_EMPTY_CAPTION = "empty_caption"              # caption is empty or only whitespace
REASON_BAD_CAPTION_ENCODING = "bad_caption_encoding"  # caption bytes are not valid UTF-8
REASON_CAPTION_TOO_LONG = "caption_too_long"        # more characters than MAX_CAPTION_CHARS
REASON_DUPLICATE_KEY = "duplicate_key"              # a key seen before in the same shard (the first is kept)
# Shard-level problems (not tied to one sample, so no ``None`` is yielded for them):
REASON_TRUNCATED_SHARD = "truncated_shard"          # tar stream ends in the middle of a member/header
REASON_SHARD_UNREADABLE = "shard_unreadable"        # the shard URL cannot be opened
REASON_SHARD_ERROR = "shard_error"                  # any other error while reading a shard

REASONS = (
    REASON_MISSING_FILE, REASON_NOT_A_FILE, REASON_TOO_LARGE, REASON_READ_ERROR, REASON_EMPTY_FILE,
    REASON_NOT_AN_IMAGE, REASON_TRUNCATED_IMAGE, REASON_CORRUPT_IMAGE, REASON_DECOMPRESSION_BOMB,
    REASON_TRANSFORM_ERROR, REASON_MISSING_IMAGE, REASON_MISSING_CAPTION, REASON_EMPTY_CAPTION,
    REASON_BAD_CAPTION_ENCODING, REASON_CAPTION_TOO_LONG, REASON_DUPLICATE_KEY, REASON_TRUNCATED_SHARD,
    REASON_SHARD_UNREADABLE, REASON_SHARD_ERROR,
)
SHARD_REASONS = frozenset({REASON_TRUNCATED_SHARD, REASON_SHARD_UNREADABLE, REASON_SHARD_ERROR})

# A caption longer than this is a bad sample (``caption_too_long``), not a reason to fail its table: a
# CLIP tokenizer keeps 77 tokens, and this is the field limit of Python's csv module that used to make
# such a CSV unreadable, so no caption that was read before is refused now. Settable here.
MAX_CAPTION_CHARS = 131_072


class BadSample(Exception):
    """Raised by the decoding helpers; ``reason`` is one of the ``REASON_*`` strings."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Sample(NamedTuple):
    """One good image–text pair: ``image`` (transform output), ``caption`` (str), ``key`` (str)."""

    image: Any
    caption: str
    key: str = ""


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------

@dataclass
class SampleStats:
    """Counts of bad samples by reason, and of samples looked at (good + bad).

    ``seen`` counts samples only; shard-level reasons (``SHARD_REASONS``) are counted in ``counts``
    but not in ``seen``. Merge per-batch reports with ``update(batch)``.
    """

    counts: collections.Counter = field(default_factory=collections.Counter)
    seen: int = 0

    def record(self, reason: str) -> None:
        self.counts[reason] += 1
        if reason not in SHARD_REASONS:
            self.seen += 1

    @property
    def skipped(self) -> int:
        """Number of bad samples (shard-level errors excluded)."""
        return sum(n for r, n in self.counts.items() if r not in SHARD_REASONS)

    @property
    def good(self) -> int:
        return self.seen - self.skipped

    def update(self, other: "Batch | SampleStats | Mapping[str, int]") -> "SampleStats":
        """Add a ``Batch`` (its good samples and ``skipped``), another ``SampleStats`` or a counter."""
        if isinstance(other, Batch):
            self.seen += len(other) + sum(n for r, n in other.skipped.items() if r not in SHARD_REASONS)
            self.counts.update(other.skipped)
        elif isinstance(other, SampleStats):
            self.seen += other.seen
            self.counts.update(other.counts)
        else:
            counts = collections.Counter(other)
            self.seen += sum(n for r, n in counts.items() if r not in SHARD_REASONS)
            self.counts.update(counts)
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{"seen": n, "good": n, "skipped": n, "reasons": {reason: n}}``."""
        return {"seen": self.seen, "good": self.good, "skipped": self.skipped,
                "reasons": dict(sorted(self.counts.items()))}

    def summary(self) -> str:
        """One line, e.g. ``'1000 seen, 3 skipped (missing_file 2, empty_caption 1)'``."""
        text = f"{self.seen} seen, {self.skipped} skipped"
        if self.counts:
            text += " (" + ", ".join(f"{r} {n}" for r, n in self.counts.most_common()) + ")"
        return text


_local = threading.local()


def _pending() -> collections.Counter:
    # Keyed by process id: a forked DataLoader worker must not inherit its parent's pending reasons.
    if getattr(_local, "pid", None) != os.getpid():
        _local.pending = collections.Counter()
        _local.pid = os.getpid()
    return _local.pending


def record_bad(reason: str, stats: SampleStats | None = None, key: str = "", detail: Any = "") -> None:
    """Record a bad sample (or a shard-level error): in ``stats`` and in this thread's pending
    counter that the next ``ImageTextCollator`` call reports in ``Batch.skipped``."""
    if stats is not None:
        stats.record(reason)
    _pending()[reason] += 1
    logger.debug("skipping %s: %s %s", key or "sample", reason, detail)


def drain_pending() -> collections.Counter:
    """Return and clear the reasons recorded in this thread since the last call."""
    counter = _pending()
    out = collections.Counter(counter)
    counter.clear()
    return out


def has_pending() -> bool:
    return bool(_pending())


def clear_pending() -> None:
    """Forget the reasons recorded in this thread and not yet reported (datasets call it when a new
    pass over the data starts)."""
    _pending().clear()


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------

def _is_bomb(error: BaseException) -> bool:
    bombs = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    return (isinstance(error, bombs) or isinstance(error.__cause__, bombs)
            or "decompression bomb" in str(error).lower())


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, through the one checked read (``ldmclip.core.reading``): raises
    :class:`BadSample` for a missing path, a FIFO/socket/device/directory (``not_a_file``, without
    blocking), a file over ``MAX_IMAGE_BYTES`` (``too_large``, without reading it) and a read error."""
    try:
        return reading.read_regular_file(path, reading.image_byte_limit())
    except (reading.NotARegularFile, IsADirectoryError) as e:
        raise BadSample(REASON_NOT_A_FILE, str(e)) from None
    except reading.FileTooLarge as e:
        raise BadSample(REASON_TOO_LARGE, str(e)) from None
    except (FileNotFoundError, NotADirectoryError) as e:
        raise BadSample(REASON_MISSING_FILE, str(e)) from None
    except OSError as e:
        raise BadSample(REASON_READ_ERROR, str(e)) from None


def decode_image(source: bytes | bytearray | memoryview | str | Any, *, target_size: int | None = None,
                 fast: bool = False) -> Image.Image:
    """Fully decode an image (encoded bytes or a path) with PIL, keeping its mode.

    Raises :class:`BadSample` for: a missing/unreadable/zero-byte file, a path that is not a regular
    file, more bytes than ``MAX_IMAGE_BYTES``, data PIL cannot identify, a truncated or otherwise
    corrupt image, and a decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, or, with
    ``target_size``, an absurd resize: ``ldmclip.transforms.resize_problem``). ``fast``/``target_size``:
    JPEG draft decoding, see ``ldmclip.transforms.load_image``.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)):
        source = read_image_file(source)
    if len(source) == 0:
        raise BadSample(REASON_EMPTY_FILE)
    try:
        return load_image(source, target_size, fast=fast)
    except reading.FileTooLarge as e:
        raise BadSample(REASON_TOO_LARGE, str(e)) from None
    except Image.UnidentifiedImageError as e:
        raise BadSample(REASON_NOT_AN_IMAGE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...)
        if _is_bomb(e):
            raise BadSample(REASON_DECOMPRESSION_BOMB, str(e)) from None
        if isinstance(e, OSError) and "truncated" in str(e).lower():
            raise BadSample(REASON_TRUNCATED_IMAGE, str(e)) from None
        raise BadSample(REASON_CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None


def decode_caption(value: bytes | bytearray | str | None) -> str:
    """Caption bytes/str -> stripped ``str``; raises :class:`BadSample` for a missing caption, one that
    is not valid UTF-8 (or holds undecodable bytes) and one that is empty."""
    if value is None:
        raise BadSample(REASON_MISSING_CAPTION)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample(REASON_BAD_CAPTION_ENCODING, str(e)) from None
    elif not isinstance(value, str):
        raise BadSample(REASON_MISSING_CAPTION, f"caption is a {type(value).__name__}")
    if len(value) > MAX_CAPTION_CHARS:
        raise BadSample(REASON_CAPTION_TOO_LONG, f"{len(value)} characters, over MAX_CAPTION_CHARS ({MAX_CAPTION_CHARS})")
    if value.startswith("\ufeff"):
        value = value[1:]
    try:  # lone surrogates: text read with errors="surrogateescape" from a non-UTF-8 file
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadSample(REASON_BAD_CAPTION_ENCODING, str(e)) from None
    value = value.strip()
    if not value:
        raise BadSample(REASON_EMPTY_CAPTION)
    return value


def apply_transform(img: Image.Image, transform: Callable[[Image.Image], Any] | None) -> Any:
    """Run ``transform`` on a decoded image.

    The ldmclip ``EvalTransform``/``TrainTransform`` get the image in its own mode (they convert to RGB
    after cropping, as OpenCLIP does); any other callable, and ``transform=None`` (which returns the
    PIL image), get an RGB image. Errors raise :class:`BadSample` (``transform_error``), and so does an
    image the transform's resize would blow up (``decompression_bomb``, see ``resize_problem``).
    """
    problem = resize_problem(img.width, img.height, _target_size(transform))
    if problem is not None:  # decoded by a caller that did not pass target_size to decode_image
        raise BadSample(REASON_DECOMPRESSION_BOMB, problem)
    try:
        if not isinstance(transform, (EvalTransform, TrainTransform)) and img.mode != "RGB":
            img = img.convert("RGB")
        return img if transform is None else transform(img)
    except Exception as e:  # noqa: BLE001
        raise BadSample(REASON_TRANSFORM_ERROR, f"{type(e).__name__}: {e}") from None


def _target_size(transform: Any) -> int | None:
    size = getattr(transform, "image_size", None)
    return size if isinstance(size, int) else None


class DecodedSample(NamedTuple):
    """One decoded pair with the size of its image as decoded (before the transform)."""

    image: Any
    caption: str
    width: int
    height: int


def decode_sample(image: Any, caption: Any, transform: Callable | None, *, fast: bool = False) -> DecodedSample:
    """Decode one pair (see :func:`load_sample`); raises :class:`BadSample` with the reason."""
    if image is None:
        raise BadSample(REASON_MISSING_IMAGE)
    text = decode_caption(caption)  # cheap: check before decoding the image
    img = decode_image(image, target_size=_target_size(transform), fast=fast)
    width, height = img.size
    out = apply_transform(img, transform)
    if out is not img:
        img.close()
    return DecodedSample(out, text, width, height)


def load_sample(image: Any, caption: Any, key: str, transform: Callable | None,
                stats: SampleStats | None = None, *, fast: bool = False) -> Sample | None:
    """Decode one pair: ``image`` (bytes or path, or ``None`` for a missing image) and ``caption``
    (bytes/str/``None``). Returns a :class:`Sample`, or ``None`` with the reason recorded."""
    try:
        decoded = decode_sample(image, caption, transform, fast=fast)
    except BadSample as bad:
        record_bad(bad.reason, stats, key, bad.detail)
        return None
    if stats is not None:
        stats.seen += 1
    return Sample(decoded.image, decoded.caption, key)


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """A collated batch.

    images:   ``[B, 3, S, S]`` float32 (stacked transform outputs).
    tokens:   ``[B, context_length]`` int64, or ``None`` when the collator has no tokenizer.
    captions: the ``B`` captions.
    skipped:  reasons of the bad samples reported with this batch (see the module docs).
    keys:     the ``B`` sample keys (``""`` where the dataset has none).

    ``B`` may be 0 (every sample of the batch was bad): skip the step and count ``skipped``.
    """

    images: torch.Tensor
    tokens: torch.Tensor | None
    captions: list[str]
    skipped: collections.Counter
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), None if self.tokens is None else self.tokens.pin_memory(),
                     self.captions, self.skipped, self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     None if self.tokens is None else self.tokens.to(device, non_blocking=non_blocking),
                     self.captions, self.skipped, self.keys)


class ImageTextCollator:
    """``collate_fn`` for every ldmclip image–text dataset.

    Accepts a list of :class:`Sample` (or plain ``(image, caption)`` / ``(image, caption, key)``
    tuples) and ``None`` (bad samples); drops the ``None``s, stacks the images, tokenizes all captions
    in one tokenizer call, and reports the reasons of the bad samples in ``Batch.skipped``.

    Args:
        tokenizer: callable ``list[str] -> LongTensor [B, ctx]`` (``ldmclip.tokenizer.CLIPTokenizer``);
            ``None`` leaves ``Batch.tokens`` as ``None``.
        image_size: shape of the empty image tensor of a batch with no good sample (``[0, 3, S, S]``);
            defaults to the size of the last image seen by this collator (0 before any).
        normalizer: ``transform.normalizer`` of an ldmclip transform built with ``defer_normalize=True``:
            the samples then carry RGB PIL images, normalised here straight into the batch tensor.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 image_size: int | None = None, normalizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.normalizer = normalizer
        self._image_shape: tuple[int, ...] | None = (3, image_size, image_size) if image_size else None

    def _empty_tokens(self) -> torch.Tensor | None:
        if self.tokenizer is None:
            return None
        ctx = getattr(self.tokenizer, "context_length", None)
        if ctx is None:
            return self.tokenizer([""])[:0]
        return torch.empty((0, int(ctx)), dtype=torch.long)

    def __call__(self, samples: Sequence[Any]) -> Batch:
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        for s in samples:
            if s is None:
                continue
            images.append(s[0])
            captions.append(s[1])
            keys.append(str(s[2]) if len(s) > 2 and s[2] is not None else "")
        skipped = drain_pending()
        if not images:
            shape = self._image_shape or (3, 0, 0)
            return Batch(torch.empty((0, *shape), dtype=torch.float32), self._empty_tokens(), [], skipped, [])
        if isinstance(images[0], Image.Image):
            stacked = self._normalize_batch(images)
        else:
            # default_collate stacks straight into shared memory inside DataLoader workers (one copy
            # fewer on the way to the main process).
            stacked = torch.utils.data.default_collate(images)
        self._image_shape = tuple(stacked.shape[1:])
        tokens = self.tokenizer(captions) if self.tokenizer is not None else None
        return Batch(stacked, tokens, captions, skipped, keys)

    def _normalize_batch(self, images: list[Image.Image]) -> torch.Tensor:
        if self.normalizer is None:
            raise TypeError("the samples hold PIL images: build the collator with normalizer=transform.normalizer "
                            "(a transform made with defer_normalize=True), or use a transform that returns tensors")
        width, height = images[0].size
        if any(img.size != (width, height) for img in images):
            sizes = sorted({img.size for img in images})
            raise ValueError(f"images of different sizes cannot form one batch: {sizes[:4]}")
        batch = _batch_tensor((len(images), 3, height, width))
        slots = batch.numpy()
        for slot, img in zip(slots, images):
            self.normalizer.into(img, slot)
        return batch


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; in shared memory inside a DataLoader worker, as default_collate
    does, so the batch reaches the main process without a copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def default_workers() -> int:
    """Decoding worker processes for an inference pass: every core but one, which stays with the
    process running the model (at most 8)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(worker_id: int | None = None) -> None:
    """Make this (DataLoader worker) process die with its parent: a ``worker_init_fn``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the worker when the parent (the
    thread that started it) ends, even by SIGKILL, and even while the worker is stuck in a read. Then,
    as on other systems, a parent already gone ends the worker at once. Harmless where unsupported."""
    del worker_id
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: fall back on the parent check alone
            pass
    exit_if_orphaned()


def exit_if_orphaned() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        os._exit(1)  # nobody is left to read what this worker would produce


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    batch_size: int,
    *,
    num_workers: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    sampler: Iterable[int] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader with :class:`ImageTextCollator` for a map-style or iterable ldmclip dataset.

    ``shuffle`` applies to map-style datasets only (iterable ``ShardDataset``\\s shuffle themselves);
    ``seed`` seeds the loader's generator (shuffling order and the per-worker torch seeds that
    ``TrainTransform`` draws its crops from). ``persistent_workers`` defaults to ``num_workers > 0``.
    """
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    transform = getattr(dataset, "transform", None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False if (iterable or sampler is not None) else shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=ImageTextCollator(tokenizer, image_size=_target_size(transform),
                                     normalizer=getattr(transform, "normalizer", None)),
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=exit_with_parent,  # no worker outlives a killed command
        **kwargs,
    )
