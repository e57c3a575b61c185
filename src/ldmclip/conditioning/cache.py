"""Text-embedding cache: a conditioner's outputs for every caption of a dataset, computed once and read
back by key while training a latent diffusion model.

Layout of a cache folder::

    manifest.json                  what made the cache (below) and the finished shards with totals
    empty_prompt.safetensors       hidden [T, W] (+ pooled [D]) of "" for classifier-free guidance
    shards/NAME.safetensors        one per input chunk (cache_inputs): hidden [U, T, W], pooled [U, D]

Compact dtypes (``int8``, ``fp8``: ``quantize.py``): a shard also holds ``hidden_scale`` [U, T] and
``pooled_scale`` [U] (float32; ``x = value * scale``), the manifest a ``scales`` entry, and the empty prompt
is kept exact (float32: it is one row, and classifier-free guidance at inference uses the exact one).

Each shard file also carries its index in the safetensors metadata (one ``"ldmclip"`` entry, JSON):
the sample keys in input order, the row of ``hidden``/``pooled`` each key points to, the input it
was made from and its counts. The cache's index (key -> shard, row) is the union of the shard
indices, so there is no global file to merge or to go stale: a shard and its index appear together,
in one rename. Keys are strings. A key found in two shards resolves to the first shard in name order.

``manifest.json`` holds the conditioner's ``identity()`` (preset, options, model config, sha256 of the
text-tower weights), the preset, the stored dtype, the autocast precision, the hidden/pooled shapes,
the ldmclip version that created the cache, and the sorted list of finished shards with their summed
counts (refreshed every ``MANIFEST_REFRESH_S`` seconds during a run and at its end; the shard files
on disk are what the reader goes by). Adding to a cache made with another identity, preset, dtype or
precision is refused (:class:`CacheMismatchError`, a ``UserError``: the command line prints one
line). ``cache_reader.TextEmbeddingCache`` reads a cache. Several captions per key (``variants=``,
``--caption-variant``) are described in ``variants.py``.

Crash safety and resuming
-------------------------
The folder is a ``ldmclip.data.store.ChunkStore`` (the search index's store too). Every file is
written under a hidden temporary name in its final folder (``.NAME.tmp``), flushed to disk
(``fsync``) and renamed into place, then the folder is synced: a reader never sees a
half-written shard or manifest, and a shard file that exists is finished. A run skips the shards
that exist (after checking they were made from the same input chunk) and removes temporary files
left by a killed run. Nothing time- or host-dependent is stored, captions of a shard are encoded in
the same batches every time (unique captions in order of first appearance, ``batch_size`` at a
time) and safetensors writes its header in a fixed order, so a run killed at any moment and
restarted ends with byte-identical files (same machine, software, batch size and device).

Captions (the defined outcome for each kind of input)
-----------------------------------------------------
* missing (no ``.txt`` member, null cell), empty or whitespace-only: skipped and counted
  (``missing_caption``, ``empty_caption``), as ldmclip's datasets do; use :meth:`empty_prompt` (or
  ``join(..., missing="empty")``) to train those images unconditionally;
* not valid UTF-8: skipped and counted (``bad_caption_encoding``);
* longer than the conditioner's token limit: encoded truncated (as the conditioner does), counted as
  ``truncated``; captions over ``MAX_CAPTION_CHARS`` characters are cut to that first, so a
  megabyte-long "caption" costs no tokenizer time;
* containing the tokenizer's special-token strings (``<start_of_text>``, ``<end_of_text>``): encoded
  exactly as the conditioner encodes them (OpenCLIP's tokenizer maps them to the special ids), and
  counted as ``special_token_text``;
* a key already stored in the same shard: skipped and counted (``duplicate_key``; the first usable
  caption of a key wins);
* identical captions (the same string after removing surrounding whitespace) within one shard are
  encoded and stored once; several keys then point to the same row. Deduplication does not cross
  shards, so shards stay independent (parallel ranks, resuming).

Input shards that cannot be opened or fail while being read, and those that give not one sample (a
zero-byte or non-tar file, a tar cut inside its first member), produce no output shard: they are
reported, and a rerun retries them. A tar file cut later keeps its complete samples and is counted as
``truncated_shard``.

Several processes (``torchrun``): rank ``r`` of ``w`` (``RANK``/``WORLD_SIZE``) takes the input chunks
``i`` with ``i % w == r``. Rank 0 prepares the folder (manifest, empty prompt) before the others start
(a barrier) and, after a final barrier, rewrites the manifest from the shards on disk. The cache is
the same as a single process would make.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..core.errors import UserError
from ..core.files import human_bytes
from ..core.launch import default_barrier as _default_barrier
from ..core.launch import process_rank
from ..core.precision import COMPACT_DTYPES, DTYPES
from ..data.samples import REASON_DUPLICATE_KEY
from ..data.shards import failed_as_a_whole as _failed_as_a_whole
from ..data.store import ChunkStore, StoreError, StoreMismatchError, as_json_value, differing_fields
from .variants import CaptionVariant, open_variant_inputs, parse_variants, plan_variant_records
from .cache_inputs import DEFAULT_SHARD_SIZE, InputChunk, open_inputs
from .quantize import QuantizedRows, is_compact, stored_tensors

__all__ = ["CacheReport", "CacheError", "CacheMismatchError", "build_text_cache", "cache_store", "CACHE_DTYPES",
           "MAX_CAPTION_CHARS"]

FORMAT = "ldmclip-text-embedding-cache"
FORMAT_VERSION = 2  # the newest this ldmclip reads and writes
# A cache is written with the oldest version that can read it: 1 for fp16/bf16/fp32 (what every ldmclip
# reads), 2 for int8/fp8, whose scale tensors an ldmclip of version 1 would not apply (it then says to upgrade).
_FIRST_VERSION_OF = {"int8": 2, "fp8": 2}
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
# the order is the help's; int8/fp8 are stored with a scale per token (quantize.py)
CACHE_DTYPES = {name: DTYPES[name] for name in ("fp16", "bf16", "fp32")} | COMPACT_DTYPES
READ_DTYPE_OF_COMPACT = torch.float16  # what int8/fp8 caches read back as by default (cache_reader)
MAX_CAPTION_CHARS = 20_000
MANIFEST_REFRESH_S = 30.0  # how often rank 0 refreshes the manifest's shard list during a run

class CacheError(StoreError):
    """A cache folder that cannot be used (damaged, not a cache, an unrelated folder)."""


class CacheMismatchError(CacheError, StoreMismatchError):
    """The cache folder was made by another model, preset, dtype, precision or input layout."""


def cache_store(path: str | os.PathLike) -> ChunkStore:
    """The store of the cache folder ``path`` (the reader opens it the same way)."""
    return ChunkStore(path, FORMAT, SHARDS_DIR, SHARD_SUFFIX, kind="text-embedding cache", canonical=True,
                      error=CacheError, mismatch=CacheMismatchError)


# ----------------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------------

_COUNT_FIELDS = ("records", "keys", "unique", "truncated", "special_token_text")


def _add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    for name in _COUNT_FIELDS:
        total[name] = total.get(name, 0) + int(counts.get(name, 0))
    skipped = total.setdefault("skipped", {})
    for reason, n in counts.get("skipped", {}).items():
        skipped[reason] = skipped.get(reason, 0) + int(n)
    for name, of_variant in counts.get("variants", {}).items():  # only in caches with caption variants
        into = total.setdefault("variants", {}).setdefault(name, {"keys": 0, "skipped": {}})
        into["keys"] += int(of_variant.get("keys", 0))
        for reason, n in of_variant.get("skipped", {}).items():
            into["skipped"][reason] = into["skipped"].get(reason, 0) + int(n)


@dataclass
class CacheReport:
    """What a :func:`build_text_cache` call did (this process) and what the cache holds afterwards."""

    path: Path
    written: list[str] = field(default_factory=list)        # shards encoded by this call
    already_done: list[str] = field(default_factory=list)   # shards that existed and were skipped
    failed: dict[str, str] = field(default_factory=dict)    # input chunks left for a rerun: name -> why
    other_ranks: int = 0                                      # chunks left to other ranks
    counts: dict[str, Any] = field(default_factory=dict)    # summed counts of the shards written here
    cache_counts: dict[str, Any] = field(default_factory=dict)  # summed counts of every finished shard
    cache_shards: int = 0                                     # cache_* are filled in by rank 0 only
    cache_known: bool = False
    bytes_written: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for people: what was read, stored and skipped, and how big the cache is."""
        c = self.counts
        records, keys, unique = c.get("records", 0), c.get("keys", 0), c.get("unique", 0)
        rate = records / self.seconds if self.seconds > 0 else 0.0
        lines = [f"wrote {len(self.written)} shard(s) to {self.path}"
                 + (f" ({len(self.already_done)} already done)" if self.already_done else "")
                 + f" in {self.seconds:.1f} s ({rate:,.0f} captions/s)",
                 f"  captions {records:,} read, {keys:,} cached, {unique:,} unique (encoded), "
                 f"{c.get('truncated', 0):,} truncated, {c.get('special_token_text', 0):,} with special-token text",
                 f"  {human_bytes(self.bytes_written)} written"]
        skipped = c.get("skipped", {})
        if skipped:
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            lines.append(f"  skipped {sum(skipped.values()):,}: {reasons}")
        else:
            lines.append("  skipped 0")
        for name, of_variant in c.get("variants", {}).items():
            missed = ", ".join(f"{r} {n:,}" for r, n in sorted(of_variant.get("skipped", {}).items()))
            lines.append(f"  variant {name}: {of_variant.get('keys', 0):,} keys" + (f", without it: {missed}" if missed else ""))
        if self.failed:
            shown = ", ".join(f"{name} ({why})" for name, why in list(self.failed.items())[:5])
            more = f" and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            lines.append(f"  {len(self.failed)} input shard(s) failed and were not cached: {shown}{more}; "
                         "rerun the same command to retry them")
        cc = self.cache_counts
        if self.cache_known:
                lines.append(f"cache: {self.cache_shards} shard(s), {cc.get('keys', 0):,} keys, "
                         f"{cc.get('unique', 0):,} embeddings, {human_bytes(self.cache_bytes)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------

def _device_of(conditioner: Any) -> torch.device:
    device = getattr(conditioner, "device", None)
    if device is not None:
        return torch.device(device)
    modules = [conditioner] + [getattr(conditioner, n, None) for n in ("model", "models")]
    for module in modules:
        for item in (module if isinstance(module, (list, tuple)) else [module]):
            if isinstance(item, torch.nn.Module):
                for p in item.parameters():
                    return p.device
    return torch.device("cpu")


class _Encoder:
    """Runs the conditioner on lists of captions and returns CPU tensors in the stored dtype."""

    def __init__(self, conditioner: Any, dtype: str, precision: str, device: torch.device) -> None:
        from ..core.precision import autocast

        self.conditioner = conditioner
        # int8/fp8: the conditioner's float32 output, quantised by QuantizedRows; the empty prompt stays float32
        self.compact = is_compact(dtype)
        self.dtype = torch.float32 if self.compact else CACHE_DTYPES[dtype]
        self.precision = precision
        self.device = device
        self._autocast = lambda: autocast(precision, device)

    def _store(self, x: torch.Tensor | None, what: str) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.detach().to(device="cpu", dtype=self.dtype)
        if not torch.isfinite(x).all():
            raise UserError(f"the {what} embeddings have values that are not finite in {self.dtype} "
                            "(fp16 overflows above 65504); store them as bf16 or fp32 (--dtype)")
        if self.compact and x.numel() and float(x.abs().max()) > torch.finfo(READ_DTYPE_OF_COMPACT).max:
            raise UserError(f"the {what} embeddings have values above 65504, which int8/fp8 caches cannot give "
                            "back as float16 (what they are read as); store them as bf16 or fp32 (--dtype)")
        return x.contiguous()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(hidden, pooled, truncated)``: ``truncated`` is the conditioner's count of cut prompts
        (None when it does not say)."""
        with torch.inference_mode(), self._autocast(), _quiet_truncation_warnings():
            out = self.conditioner(captions)
        truncated = getattr(out, "truncated", None)
        return (self._store(out.hidden, "hidden"), self._store(getattr(out, "pooled", None), "pooled"),
                None if truncated is None else int(truncated))

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode(), self._autocast():
            out = self.conditioner.empty_prompt()
        hidden, pooled = self._store(out.hidden, "hidden"), self._store(getattr(out, "pooled", None), "pooled")
        if hidden.dim() == 3:  # [1, T, W] -> [T, W]
            hidden = hidden[0]
        if pooled is not None and pooled.dim() == 2:
            pooled = pooled[0]
        return hidden.contiguous(), None if pooled is None else pooled.contiguous()


class _TokenCounter:
    """Counts, per caption, the ones the conditioner truncates (more BPE tokens than it encodes)."""

    def __init__(self, conditioner: Any, context_length: int) -> None:
        from ..tokenizer import build_tokenizer

        tokenizers = getattr(conditioner, "tokenizers", None)
        self.tokenizer = tokenizers[0] if tokenizers else build_tokenizer()
        # SOT ... EOT around context_length - 2 tokens, per long-prompt window.
        ctx = int(getattr(conditioner, "context_length", None) or context_length)
        self.limit = (ctx - 2) * int(getattr(conditioner, "windows", 1) or 1)

    def truncated(self, captions: Sequence[str], any_truncated: int | None) -> list[bool]:
        if any_truncated == 0:  # the conditioner says none was cut: no need to tokenize again
            return [False] * len(captions)
        return [len(ids) > self.limit for ids in self.tokenizer.encode_batch(list(captions))]


@contextlib.contextmanager
def _quiet_truncation_warnings() -> Iterator[None]:
    # The conditioner warns once per batch about cut prompts; the cache counts them per caption and
    # reports the total at the end instead.
    log = logging.getLogger("ldmclip.conditioning.conditioner")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _has_special_text(caption: str) -> bool:
    lowered = caption.lower()  # OpenCLIP matches the special strings case-insensitively
    return "<start_of_text>" in lowered or "<end_of_text>" in lowered


@dataclass
class _Plan:
    """What one chunk holds once read and cleaned: stored keys, their rows, the unique captions."""

    keys: list[str]
    rows: list[int]
    captions: list[str]
    counts: dict[str, Any]
    variant_rows: dict[str, list[int | None]] | None = None  # per caption variant, the row of each key


def _plan_chunk(records: Iterable[tuple[str, Any]]) -> _Plan:
    from ..data.samples import BadSample, decode_caption

    keys: list[str] = []
    rows: list[int] = []
    unique: dict[str, int] = {}
    stored: set[str] = set()
    skipped: collections.Counter = collections.Counter()
    n = 0
    for key, raw in records:
        n += 1
        try:
            caption = decode_caption(raw)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        key = str(key)
        if key in stored:
            skipped[REASON_DUPLICATE_KEY] += 1
            continue
        stored.add(key)
        if len(caption) > MAX_CAPTION_CHARS:
            caption = caption[:MAX_CAPTION_CHARS]
        keys.append(key)
        rows.append(unique.setdefault(caption, len(unique)))
    counts = {"records": n, "keys": len(keys), "unique": len(unique), "skipped": dict(sorted(skipped.items()))}
    return _Plan(keys, rows, list(unique), counts)


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------

_CHECKED_FIELDS = ("format", "identity", "preset", "dtype", "precision", "hidden_shape", "pooled_dim")


def _write_manifest(store: ChunkStore, header: dict[str, Any], shard_counts: dict[str, dict[str, Any]]) -> None:
    totals: dict[str, Any] = {}
    for name in sorted(shard_counts):
        _add_counts(totals, shard_counts[name])
    store.write_manifest({**header, "shards": sorted(shard_counts), "totals": totals})


def build_text_cache(
    conditioner: Any,
    source: str | os.PathLike | Sequence[str] | Sequence[InputChunk],
    out_dir: str | os.PathLike,
    *,
    input_format: str = "auto",
    caption_column: str = "caption",
    key_column: str | None = None,
    image_column: str = "image",
    shard_size: int = DEFAULT_SHARD_SIZE,
    sep: str | None = None,
    dtype: str = "fp16",
    precision: str = "auto",
    batch_size: int = 256,
    variants: Sequence[str | CaptionVariant] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = False,
) -> CacheReport:
    """Encode every caption of ``source`` with ``conditioner`` into the cache folder ``out_dir``
    (created, or resumed: finished shards are skipped). See the module docs for the layout and rules.

    Args:
        conditioner: a :class:`~ldmclip.conditioning.TextConditioner` (anything with ``__call__(list[str])``
            returning ``.hidden``/``.pooled``, ``empty_prompt()`` and ``identity()``).
        source: webdataset shards (a pattern or a list), a table or a text file (``cache_inputs.open_inputs``
            reads them with ``input_format``, ``caption_column``, ``key_column``, ``image_column``,
            ``shard_size``, ``sep``), or a list of ``InputChunk``.
        dtype: stored dtype of ``hidden``/``pooled``: ``fp16`` (default), ``bf16``, ``fp32``, or the compact
            ``int8`` / ``fp8`` (e4m3), each with a float32 scale per token (``quantize.py``; read back as float16).
        precision: ``auto`` (bf16 autocast on GPUs and AMX/AVX512-bf16 CPUs, else fp32), ``amp_bf16``,
            ``amp_fp16`` (CUDA) or ``fp32``.
        batch_size: captions per forward pass (part of what makes a shard's bytes reproducible).
        variants: several captions per key, ``["txt=txt", "synthetic=json:caption"]`` (shards) or
            ``["alt=alt_text", "long=long_caption"]`` (table columns); the first is the default (see
            ``variants.py``). ``None``: the one caption of ``caption_column`` / the ``.txt`` member. Chunks
            given as ``InputChunk`` must then yield ``(key, {name: raw})`` (``open_variant_inputs``).
        rank, world_size: this process's share of the chunks (default: torch.distributed, else the
            ``RANK``/``WORLD_SIZE`` variables, else 0 of 1).
        barrier: called when rank 0 has prepared the folder and when this rank is done, so that all
            ranks wait for each other (default: ``torch.distributed.barrier`` when a process group is
            initialised with several ranks, else nothing).
        progress: show a tqdm bar (captions/s, ETA) for this rank's work.
    """
    from ..core.version import __version__
    from ..core.precision import resolve_precision

    started = time.perf_counter()
    if dtype not in CACHE_DTYPES:
        raise UserError(f"unknown cache dtype {dtype!r}; use one of {', '.join(CACHE_DTYPES)}")
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    variants = None if variants is None else parse_variants(variants)
    if variants is not None and (isinstance(source, (str, os.PathLike))
                                 or not all(isinstance(c, InputChunk) for c in source)):
        chunks = open_variant_inputs(source, variants, input_format, key_column=key_column, image_column=image_column,
                                     shard_size=shard_size, sep=sep)
    elif isinstance(source, (str, os.PathLike)) or not all(isinstance(c, InputChunk) for c in source):
        chunks = open_inputs(source, input_format, caption_column=caption_column, key_column=key_column,
                             image_column=image_column, shard_size=shard_size, sep=sep)
    else:
        chunks = list(source)
    names = [c.name for c in chunks]
    if len(set(names)) != len(names):
        raise ValueError("input chunks must have distinct names")
    rank, world_size = process_rank(rank, world_size)
    barrier = barrier or _default_barrier
    is_main = rank == 0

    device = _device_of(conditioner)
    precision = resolve_precision(precision, device)
    encoder = _Encoder(conditioner, dtype, precision, device)
    empty_hidden, empty_pooled = encoder.empty_prompt()
    identity = as_json_value(conditioner.identity())
    header = {
        "format": FORMAT,
        "format_version": _FIRST_VERSION_OF.get(dtype, 1),
        "ldmclip_version": __version__,
        "identity": identity,
        "preset": identity.get("preset") if isinstance(identity, dict) else None,
        "dtype": dtype,
        "precision": precision,
        "context_length": int(empty_hidden.shape[0]),
        "hidden_shape": list(empty_hidden.shape),
        "pooled_dim": None if empty_pooled is None else int(empty_pooled.shape[-1]),
        # absent without variants: those caches stay byte for byte as they were
        **({} if variants is None else {"variants": [v.as_manifest() for v in variants]}),
    }
    if is_compact(dtype):  # what the reader needs to know besides the dtype (see quantize.py)
        header["scales"] = "float32 absmax scale per token (hidden_scale [U, T]) and per row (pooled_scale [U])"
    store = cache_store(out_dir)
    header = _prepare_folder(store, header, empty_hidden, empty_pooled, is_main, world_size, barrier)

    mine = [c for i, c in enumerate(chunks) if i % world_size == rank]
    report = CacheReport(store.path, other_ranks=len(chunks) - len(mine))
    on_disk = {store.chunk_name(p): p for p in store.chunk_files()}
    todo = [c for c in mine if c.name not in on_disk]
    for chunk in mine:
        if chunk.name in on_disk:
            _check_source(store, on_disk[chunk.name], chunk)
            report.already_done.append(chunk.name)
    # rank 0 keeps the manifest: the finished shards (its own and the other ranks') with their counts
    shard_counts = {name: store.read_chunk_meta(path)["counts"] for name, path in on_disk.items()} if is_main else {}

    counter = _TokenCounter(conditioner, int(empty_hidden.shape[0]))
    bar = _progress_bar(todo, rank, world_size) if progress else None
    last_manifest = time.monotonic()
    try:
        for chunk in todo:
            problems: collections.Counter = collections.Counter()
            plan = _plan_chunk(chunk.read(problems)) if variants is None else _plan_variants(chunk, problems, variants)
            retry = _failed_as_a_whole(problems, plan.counts["records"])
            if retry:  # not cached: a rerun tries this input shard again
                report.failed[chunk.name] = retry
                if bar is not None:
                    bar.update(plan.counts["records"])
                continue
            for reason, n in problems.items():
                plan.counts["skipped"][reason] = plan.counts["skipped"].get(reason, 0) + int(n)
            tensors = _encode_plan(plan, encoder, counter, batch_size, empty_hidden, empty_pooled, bar, dtype)
            meta = {"format_version": header["format_version"], "source": chunk.source, "keys": plan.keys,
                    "rows": plan.rows, "counts": plan.counts}
            if plan.variant_rows is not None:
                meta["variants"] = plan.variant_rows
            path = store.write_chunk(chunk.name, tensors, meta)
            report.written.append(chunk.name)
            report.bytes_written += path.stat().st_size
            _add_counts(report.counts, plan.counts)
            if is_main:
                shard_counts[chunk.name] = plan.counts
                # The shard files are the truth; the manifest's list is refreshed now and then while a
                # run goes on (rewriting it after every shard would cost O(shards^2)) and at the end.
                if time.monotonic() - last_manifest > MANIFEST_REFRESH_S:
                    _write_manifest(store, header, shard_counts)
                    last_manifest = time.monotonic()
    finally:
        if bar is not None:
            bar.close()

    if world_size > 1:
        barrier()  # every rank has finished its shards
    if is_main:
        files = store.chunk_files()
        known = {store.chunk_name(p) for p in files}
        for name in known - set(shard_counts):  # written by the other ranks
            shard_counts[name] = store.read_chunk_meta(name)["counts"]
        shard_counts = {name: shard_counts[name] for name in known}
        _write_manifest(store, header, shard_counts)
        report.cache_shards, report.cache_known = len(files), True
        report.cache_bytes = sum(p.stat().st_size for p in files)
        for name in sorted(shard_counts):
            _add_counts(report.cache_counts, shard_counts[name])
    report.counts.setdefault("records", 0)
    report.seconds = time.perf_counter() - started
    return report


def _plan_variants(chunk: InputChunk, problems: collections.Counter, variants: Sequence[CaptionVariant]) -> _Plan:
    planned = plan_variant_records(chunk.read(problems), [v.name for v in variants], MAX_CAPTION_CHARS)
    return _Plan(planned.keys, planned.rows, planned.captions, planned.counts, planned.variant_rows)


def _prepare_folder(store: ChunkStore, header: dict[str, Any], empty_hidden: torch.Tensor,
                    empty_pooled: torch.Tensor | None, is_main: bool, world_size: int,
                    barrier: Callable[[], None]) -> dict[str, Any]:
    """Check an existing cache against this run, or create a new one (rank 0); returns the manifest
    header to keep writing (an existing cache keeps the one it was created with, e.g. its version)."""
    existing = store.read_manifest()
    if existing is not None:
        _check_compatible(store, existing, header)  # every rank checks: they all fail alike
        header = {k: v for k, v in existing.items() if k not in ("shards", "totals")}
    elif is_main:
        store.check_unrelated()
    if is_main:
        store.create()  # and remove temporaries, before the other ranks start writing theirs
        if existing is None:
            _write_manifest(store, header, {})
        if not (store.path / EMPTY_PROMPT_NAME).is_file():
            tensors = {"hidden": empty_hidden} | ({} if empty_pooled is None else {"pooled": empty_pooled})
            store.write_tensors(store.path / EMPTY_PROMPT_NAME, tensors, {"prompt": ""})
    if world_size > 1:
        barrier()  # rank 0 has created the folder and the manifest
    if not is_main:
        manifest = store.read_manifest()
        if manifest is None:
            raise RuntimeError(f"rank 0 did not create {store.manifest_path} (is a barrier set up?)")
        _check_compatible(store, manifest, header)
        header = {k: v for k, v in manifest.items() if k not in ("shards", "totals")}
    return header


def _check_compatible(store: ChunkStore, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    store.check_same(existing, wanted, (*_CHECKED_FIELDS, "variants"), contents="embeddings")


def _check_source(store: ChunkStore, path: Path, chunk: InputChunk) -> None:
    meta = store.read_chunk_meta(path)
    if differing_fields(meta, {"source": chunk.source}, ["source"]):
        raise CacheMismatchError(
            f"{path} was made from {meta.get('source')}, but this run's chunk {chunk.name!r} is {chunk.source} "
            "(another input file with the same name, or a different --shard-size?); use another output folder")


def _progress_bar(todo: Sequence[InputChunk], rank: int, world_size: int) -> Any:
    if not todo:
        return None
    from tqdm import tqdm

    sizes = [c.size for c in todo]
    total = sum(sizes) if all(s is not None for s in sizes) else None  # no ETA for shards without sizes.json
    return tqdm(total=total, unit="cap", dynamic_ncols=True,
                desc="cache-text" if world_size == 1 else f"cache-text rank {rank}")


def _rows(n: int, like: torch.Tensor, dtype: str) -> torch.Tensor | QuantizedRows:
    """Room for ``n`` rows shaped like ``like``, in the stored dtype (int8/fp8: quantised as they come)."""
    return QuantizedRows(n, like.shape, dtype) if is_compact(dtype) else torch.empty((n, *like.shape), dtype=like.dtype)


def _encode_plan(plan: _Plan, encoder: _Encoder, counter: _TokenCounter, batch_size: int,
                 empty_hidden: torch.Tensor, empty_pooled: torch.Tensor | None, bar: Any,
                 dtype: str = "fp32") -> dict[str, torch.Tensor]:
    n = len(plan.captions)
    hidden = _rows(n, empty_hidden, dtype)
    pooled = None if empty_pooled is None else _rows(n, empty_pooled, dtype)
    truncated = [False] * n
    special = [False] * n
    shown = 0
    for start in range(0, n, batch_size):
        batch = plan.captions[start:start + batch_size]
        h, p, cut = encoder.encode(batch)
        if h.shape[1:] != hidden.shape[1:]:
            raise RuntimeError(f"the conditioner returned hidden states of shape {tuple(h.shape)}, expected "
                               f"[{len(batch)}, {', '.join(map(str, hidden.shape[1:]))}] like its empty prompt")
        hidden[start:start + len(batch)] = h
        if pooled is not None:
            if p is None:
                raise RuntimeError("the conditioner returned no pooled embedding for a batch but one for ''")
            pooled[start:start + len(batch)] = p
        truncated[start:start + len(batch)] = counter.truncated(batch, cut)
        special[start:start + len(batch)] = [_has_special_text(c) for c in batch]
        if bar is not None:
            done = plan.counts["records"] * (start + len(batch)) // max(n, 1)
            bar.update(done - shown)
            shown = done
    if bar is not None:
        bar.update(plan.counts["records"] - shown)
    plan.counts["truncated"] = sum(truncated[r] for r in plan.rows)
    plan.counts["special_token_text"] = sum(special[r] for r in plan.rows)
    tensors = stored_tensors("hidden", hidden)
    if pooled is not None:
        tensors |= stored_tensors("pooled", pooled)
    return tensors
