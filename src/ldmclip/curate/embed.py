"""``ldmclip embed``: CLIP image and caption embeddings, CLIP score and head scores of every sample of
webdataset shards (img2dataset layout), one output per input shard, in clip-retrieval's embedding layout.

Layout of the output folder (the contract that ``--dedup`` and ``ldmclip filter`` read)::

    manifest.json                       model identity, dtype, precision, heads, and at the end the
                                        finished shards with their summed counts
    img_emb/img_emb_NAME.npy            [n, D] L2-normalised image embeddings (float16, or float32)
    text_emb/text_emb_NAME.npy          [n, D] L2-normalised caption embeddings, same rows
    metadata/metadata_NAME.parquet      n rows: key, caption, clip_score (float32), width, height (int32),
                                        shard, one float32 column per head
    done/NAME.safetensors               the shard's done marker (no tensors; its counts in the metadata),
                                        written last

NAME is the input shard's file stem (``data.shards.shard_name``). Rows are the samples whose image and
caption both decoded, in shard order; the others are counted by reason in the marker. Reading
``img_emb/*.npy`` and ``metadata/*.parquet`` in sorted order gives matching rows, which is what autofaiss and
clip-retrieval's back end do.

Resuming and determinism: the folder is a ``data.store.ChunkStore``. Each file is written atomically
(``core.files``); a shard is finished when its marker exists; a rerun skips finished shards and redoes the
others from the start (files of a killed shard are simply rewritten). Batches are formed per shard
(``batch_size`` decoded samples at a time, in shard order), and nothing time- or host-dependent is stored,
so a run killed at any moment and rerun ends with byte-identical files, and so does a run split over
ranks (rank ``r`` of ``w`` takes the shards ``i % w == r``; rank 0 prepares the folder and writes the final
manifest, with barriers between). A shard that fails as a whole (unreadable, not a tar, cut before its first
sample) is not marked done; a rerun retries it.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from ..core.errors import UserError
from ..core.files import write_npy, write_parquet_atomic
from ..core.launch import default_barrier, process_rank
from ..core.precision import autocast, resolve_precision
from ..data.samples import BadSample, decode_sample, drain_pending, exit_with_parent
from ..data.shards import ShardDataset, failed_as_a_whole, named_shards, shard_sizes
from ..data.store import ChunkStore, StoreError, StoreMismatchError, as_json_value
from ..registry import model_weights_sha256
from .heads import check_head, head_identity, load_head

__all__ = ["EmbedReport", "EmbedError", "EmbedMismatchError", "embed_shards", "embed_store", "shard_files", "check_finished",
           "EMBED_DTYPES", "FORMAT"]

FORMAT = "ldmclip-embeddings"
FORMAT_VERSION = 1
DONE_DIR = "done"
IMG_DIR, TEXT_DIR, META_DIR = "img_emb", "text_emb", "metadata"
EMBED_DTYPES = {"fp16": np.float16, "fp32": np.float32}  # clip-retrieval stores float16
_CHECKED_FIELDS = ("format", "format_version", "model", "embed_dim", "dtype", "precision", "heads")


class EmbedError(StoreError):
    """An output folder that cannot be used (damaged, of another kind, unrelated, inside the input)."""


class EmbedMismatchError(EmbedError, StoreMismatchError):
    """The folder holds embeddings made with another model, dtype, precision or heads."""


def embed_store(path: str | os.PathLike) -> ChunkStore:
    """The store of the embedding folder ``path`` (dedup and filter open it the same way)."""
    return ChunkStore(path, FORMAT, DONE_DIR, ".safetensors", kind="embedding folder", canonical=True,
                      error=EmbedError, mismatch=EmbedMismatchError, data_dirs=(IMG_DIR, TEXT_DIR, META_DIR))


def check_finished(path: str | os.PathLike) -> None:
    """Refuse an embedding folder that holds a shard's files without its done marker: a run killed between
    them, or one still running. dedup and filter read the folder only when every shard in it is finished. A
    folder without an ldmclip manifest (clip-retrieval's own output) has no markers and is read as it is."""
    store = embed_store(path)
    if store.read_manifest() is None:  # also refuses a manifest of another kind of folder
        return
    prefix, suffix = "metadata_", ".parquet"
    written = {p.name[len(prefix):-len(suffix)] for p in (store.path / META_DIR).glob(f"{prefix}*{suffix}")
               if not p.name.startswith(".")}
    unfinished = sorted(written - set(store.chunk_names()))
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else "")
        raise EmbedError(f"{store.path}: shard(s) {shown} are not finished (an 'ldmclip embed' run was stopped or is "
                         "still running); rerun the same embed command to finish them, then this one")


def shard_files(root: str | os.PathLike, name: str) -> dict[str, Path]:
    """The three files of shard ``name``: ``{"img_emb": ..., "text_emb": ..., "metadata": ...}``."""
    root = Path(root)
    return {"img_emb": root / IMG_DIR / f"img_emb_{name}.npy", "text_emb": root / TEXT_DIR / f"text_emb_{name}.npy",
            "metadata": root / META_DIR / f"metadata_{name}.parquet"}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _add_counts(total: dict[str, Any], counts: Mapping[str, Any]) -> None:
    for name in ("records", "embedded"):
        total[name] = total.get(name, 0) + int(counts.get(name, 0))
    skipped = total.setdefault("skipped", {})
    for reason, n in counts.get("skipped", {}).items():
        skipped[reason] = skipped.get(reason, 0) + int(n)
    total["skipped"] = dict(sorted(skipped.items()))


@dataclass
class EmbedReport:
    """What an :func:`embed_shards` call did (this process), and (rank 0) what the folder holds."""

    path: Path
    written: list[str] = field(default_factory=list)        # shards embedded by this call
    already_done: list[str] = field(default_factory=list)   # finished before this call, skipped
    failed: dict[str, str] = field(default_factory=dict)    # shards left for a rerun: name -> why
    other_ranks: int = 0                                      # shards left to the other ranks
    counts: dict[str, Any] = field(default_factory=dict)    # records, embedded, skipped{reason: n} of this call
    folder_shards: int | None = None                          # rank 0: finished shards in the folder
    folder_counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.counts.get("records", 0) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {"out": str(self.path), "written": self.written, "already_done": self.already_done,
                "failed": self.failed, "other_ranks": self.other_ranks, "counts": self.counts,
                "folder_shards": self.folder_shards, "folder_counts": self.folder_counts,
                "images_per_s": round(self.images_per_s, 2), "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        c = self.counts
        lines = [f"embedded {len(self.written)} shard(s) into {self.path}"
                 + (f" ({len(self.already_done)} already done)" if self.already_done else "")
                 + f" in {self.seconds:.1f} s ({self.images_per_s:,.1f} images/s)",
                 f"  samples {c.get('records', 0):,} read, {c.get('embedded', 0):,} embedded"]
        skipped = c.get("skipped", {})
        if skipped:
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            lines.append(f"  skipped {sum(skipped.values()):,}: {reasons}")
        if self.failed:
            shown = ", ".join(f"{name} ({why})" for name, why in list(self.failed.items())[:5])
            more = f" and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            lines.append(f"  {len(self.failed)} input shard(s) failed and were not embedded: {shown}{more}; "
                         "rerun the same command to retry them")
        if self.folder_shards is not None:
            lines.append(f"folder: {self.folder_shards} shard(s), {self.folder_counts.get('embedded', 0):,} rows")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Reading: per shard, batches of decoded samples (in DataLoader workers when workers > 0)
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Shard:
    """One unit of work, one output: a webdataset shard, or ``rows`` [start, stop) of a caption table."""

    index: int
    name: str
    url: str
    size: int | None
    table: Any = None
    rows: tuple[int, int] | None = None

    @property
    def source(self) -> dict[str, Any]:
        """What the output was made from, checked when a rerun finds it done (another --shard-size...)."""
        if self.table is None:
            return {"shard": self.name}
        return {"table": self.table.path.name, "rows": list(self.rows)}


@dataclass
class _Batch:
    """``batch_size`` (or fewer) decoded samples of one shard; ``last`` ends the shard and carries its counts."""

    shard: str
    keys: list[str]
    captions: list[str]
    widths: list[int]
    heights: list[int]
    images: torch.Tensor | None
    tokens: torch.Tensor | None
    last: bool = False
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class _ShardBatches(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``n`` reads the shards ``j % n == w`` of this rank's list, each in its own order."""

    def __init__(self, shards: Sequence[_Shard], transform: Callable, tokenizer: Callable, batch_size: int) -> None:
        super().__init__()
        self.shards, self.transform, self.tokenizer, self.batch_size = list(shards), transform, tokenizer, batch_size

    def __iter__(self) -> Iterator[_Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self._shard_batches(shard)

    def _decoded(self, key: str, image: Any, caption: Any, skipped: collections.Counter) -> tuple[str, Any] | None:
        try:
            return key, decode_sample(image, caption, self.transform)
        except BadSample as bad:
            skipped[bad.reason] += 1
            return None

    def _shard_batches(self, shard: _Shard) -> Iterator[_Batch]:
        if shard.table is not None:
            yield from self._table_batches(shard)
            return
        reader = ShardDataset(shard.url, shuffle_buffer=0)
        skipped: collections.Counter = collections.Counter()
        pending: list[tuple[str, Any]] = []
        records = 0
        try:
            for raw in reader._read_shard(shard.url):
                records += 1
                image = next((raw[e] for e in reader.image_extensions if raw.get(e) is not None), None)
                item = self._decoded(str(raw["__key__"]), image, raw.get(reader.caption_extension), skipped)
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == self.batch_size:
                    yield self._batch(shard, pending)
                    pending = []
        finally:
            drain_pending()  # the reader's reasons are reported in this shard's counts, not by a collator
        skipped.update(reader.stats.counts)  # shard-level problems and duplicate keys
        last = self._batch(shard, pending)
        last.last, last.records, last.skipped = True, records, dict(sorted(skipped.items()))
        yield last

    def _table_batches(self, shard: _Shard) -> Iterator[_Batch]:
        table, (start, stop) = shard.table, shard.rows
        skipped: collections.Counter = collections.Counter()
        pending: list[tuple[str, Any]] = []
        for i in range(start, stop):
            error = table.caption_error(i)
            if error is not None:  # the table decoded its captions when it was read
                skipped[error] += 1
                continue
            item = self._decoded(table.key(i), table.images[i] or None, table.captions[i], skipped)
            if item is not None:
                pending.append(item)
            if len(pending) == self.batch_size:
                yield self._batch(shard, pending)
                pending = []
        last = self._batch(shard, pending)
        last.last, last.records, last.skipped = True, stop - start, dict(sorted(skipped.items()))
        yield last

    def _batch(self, shard: _Shard, items: list[tuple[str, Any]]) -> _Batch:
        keys = [k for k, _ in items]
        captions = [d.caption for _, d in items]
        images = torch.stack([d.image for _, d in items]) if items else None
        tokens = self.tokenizer(captions) if items else None
        return _Batch(shard.name, keys, captions, [d.width for _, d in items], [d.height for _, d in items],
                      images, tokens)


def _batches(shards: Sequence[_Shard], transform: Callable, tokenizer: Callable, batch_size: int,
             workers: int) -> Iterator[_Batch]:
    dataset = _ShardBatches(shards, transform, tokenizer, batch_size)
    if workers <= 0 or len(shards) == 0:
        yield from dataset
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(workers, len(shards)),
                                         collate_fn=_identity, worker_init_fn=exit_with_parent)
    yield from loader


def _identity(batch: _Batch) -> _Batch:
    return batch


# ----------------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------------

class _Encoder:
    def __init__(self, model: torch.nn.Module, heads: Mapping[str, torch.nn.Module], precision: str,
                 device: torch.device) -> None:
        self.model, self.precision, self.device = model, precision, device
        self.heads = {name: head.to(device=device, dtype=torch.float32).eval() for name, head in sorted(heads.items())}

    def __call__(self, batch: _Batch) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            with autocast(self.precision, self.device):
                image = self.model.encode_image(batch.images.to(self.device))
                text = self.model.encode_text(batch.tokens.to(self.device))
            # normalised and scored in float32, whatever the autocast computed in
            image = F.normalize(image.float(), dim=-1)
            text = F.normalize(text.float(), dim=-1)
            out = {"img_emb": image, "text_emb": text, "clip_score": (image * text).sum(-1)}
            for name, head in self.heads.items():  # heads in float32, on the normalised image embedding
                out[name] = head(image).reshape(-1).float()
        return {k: v.cpu() for k, v in out.items()}


class _ShardResult:
    """The encoded batches of one shard, gathered until its last batch arrives."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.widths: list[int] = []
        self.heights: list[int] = []

    def add(self, batch: _Batch, encoded: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in encoded.items():
            self.parts[name].append(tensor)
        self.keys += batch.keys
        self.captions += batch.captions
        self.widths += batch.widths
        self.heights += batch.heights

    def column(self, name: str, width: int | None = None) -> np.ndarray:
        if not self.parts[name]:
            return np.zeros((0,) if width is None else (0, width), dtype=np.float32)
        return torch.cat(self.parts[name]).numpy()


def _write_shard(store: ChunkStore, name: str, result: _ShardResult, dtype: Any, embed_dim: int,
                 head_names: Sequence[str], counts: Mapping[str, Any], source: Mapping[str, Any]) -> None:
    import pyarrow as pa

    files = shard_files(store.path, name)
    write_npy(files["img_emb"], result.column("img_emb", embed_dim).astype(dtype))
    write_npy(files["text_emb"], result.column("text_emb", embed_dim).astype(dtype))
    columns = {
        "key": pa.array(result.keys, pa.string()),
        "caption": pa.array(result.captions, pa.string()),
        "clip_score": pa.array(result.column("clip_score").astype(np.float32), pa.float32()),
        "width": pa.array(np.asarray(result.widths, dtype=np.int32), pa.int32()),
        "height": pa.array(np.asarray(result.heights, dtype=np.int32), pa.int32()),
        "shard": pa.array([name] * len(result.keys), pa.string()),
    }
    for head in head_names:
        columns[head] = pa.array(result.column(head).astype(np.float32), pa.float32())
    write_parquet_atomic(files["metadata"], pa.table(columns))
    store.write_chunk(name, {}, {"source": dict(source), "counts": dict(counts)})  # the done marker, last


# ----------------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------------

def _shards(source: str | os.PathLike | Sequence[str]) -> list[_Shard]:
    shards = named_shards(source, "embed")
    sizes = shard_sizes([url for _, url in shards])
    return [_Shard(i, name, url, size) for i, ((name, url), size) in enumerate(zip(shards, sizes))]


def _table_shards(path: str | os.PathLike, images: str | os.PathLike | None, image_column: str,
                  caption_column: str, shard_size: int, sep: str | None) -> list[_Shard]:
    from ..data.table import CaptionTable, table_chunk_names

    if int(shard_size) < 1:
        raise UserError(f"shard_size must be at least 1, got {shard_size}")
    table = CaptionTable(path, images, None, image_column=image_column, caption_column=caption_column, sep=sep)
    starts = range(0, len(table), int(shard_size))
    names = table_chunk_names(Path(path).stem, len(starts))
    return [_Shard(i, name, os.fspath(path), min(start + shard_size, len(table)) - start, table,
                   (start, min(start + shard_size, len(table)))) for i, (name, start) in enumerate(zip(names, starts))]


def _inputs(source: str | os.PathLike | Sequence[str], images: str | os.PathLike | None, image_column: str,
            caption_column: str, shard_size: int, sep: str | None) -> list[_Shard]:
    from ..core.formats import input_kind

    if isinstance(source, (str, os.PathLike)) and input_kind(source) == "table":
        return _table_shards(source, images, image_column, caption_column, shard_size, sep)
    if images is not None:
        raise UserError("--images is the image folder of a caption table; webdataset shards hold their images")
    return _shards(source)


def check_out_not_input(out: str | os.PathLike, shards: Sequence[str], images: str | os.PathLike | None = None) -> None:
    """Refuse an output folder that holds input shards (or a table, or is its image folder): its files would
    be mixed with the dataset's. (A folder of its own next to them or below them, such as ``data/emb``, is fine.)"""
    out_path = Path(out).resolve()
    folders = [(Path(url).resolve().parent, url) for url in shards if "://" not in url and not url.startswith("pipe:")]
    if images is not None:
        folders.append((Path(images).resolve(), os.fspath(images)))
    for folder, what in folders:
        if folder == out_path:
            raise UserError(f"--out {out} is the folder of the input shards ({what}); write the embeddings to a "
                            "folder of their own (e.g. a new subfolder)")


def _header(model: torch.nn.Module, dtype: str, precision: str, heads: Mapping[str, torch.nn.Module],
            embed_dim: int, model_name: str | None, pretrained: str | None) -> dict[str, Any]:
    from ..core.version import __version__

    return as_json_value({
        "format": FORMAT, "format_version": FORMAT_VERSION, "ldmclip_version": __version__,
        "layout": "clip-retrieval (img_emb/*.npy, text_emb/*.npy, metadata/*.parquet)",
        "model": {"config": model.config.to_dict(), "preprocess": dict(model.preprocess_cfg),
                  "sha256": model_weights_sha256(model)},
        "model_name": model_name, "pretrained": pretrained,
        "embed_dim": embed_dim, "dtype": dtype, "precision": precision,
        "heads": {name: head_identity(head) for name, head in sorted(heads.items())},
    })


def _write_manifest(store: ChunkStore, header: Mapping[str, Any], shard_counts: Mapping[str, Mapping[str, Any]]) -> None:
    totals: dict[str, Any] = {}
    for name in sorted(shard_counts):
        _add_counts(totals, shard_counts[name])
    store.write_manifest({**header, "shards": sorted(shard_counts), "totals": totals})


def _prepare_folder(store: ChunkStore, header: dict[str, Any], is_main: bool, world_size: int,
                    barrier: Callable[[], None]) -> dict[str, Any]:
    """Check an existing folder against this run or create a new one (rank 0); the header to keep."""
    existing = store.read_manifest()
    if existing is not None:
        store.check_same(existing, header, _CHECKED_FIELDS, contents="embeddings")
        header = {k: v for k, v in existing.items() if k not in ("shards", "totals")}
    elif is_main:
        store.check_unrelated()
    if is_main:
        store.create()  # and remove a killed run's temporaries, before the other ranks write theirs
        if existing is None:
            _write_manifest(store, header, {})
    if world_size > 1:
        barrier()  # rank 0 has created the folder and the manifest
    if not is_main:
        manifest = store.read_manifest()
        if manifest is None:
            raise RuntimeError(f"rank 0 did not create {store.manifest_path} (is a barrier set up?)")
        store.check_same(manifest, header, _CHECKED_FIELDS, contents="embeddings")
        header = {k: v for k, v in manifest.items() if k not in ("shards", "totals")}
    return header


def _embed_dim(model: torch.nn.Module) -> int:
    dim = getattr(getattr(model, "config", None), "embed_dim", None)
    if dim is None:
        raise TypeError("the model has no config.embed_dim (an ldmclip CLIP model is needed)")
    return int(dim)


def _load_heads(heads: Mapping[str, torch.nn.Module | str | os.PathLike] | None, embed_dim: int
                ) -> dict[str, torch.nn.Module]:
    loaded: dict[str, torch.nn.Module] = {}
    for name, head in (heads or {}).items():
        module = head if isinstance(head, torch.nn.Module) else load_head(head)
        check_head(name, module, embed_dim, set(loaded))
        loaded[name] = module
    return loaded


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def embed_shards(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    source: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    dtype: str = "fp16",
    precision: str = "auto",
    batch_size: int = 256,
    heads: Mapping[str, torch.nn.Module | str | os.PathLike] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = False,
    workers: int = 0,
    model_name: str | None = None,
    pretrained: str | None = None,
    images: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    shard_size: int = 10_000,
    sep: str | None = None,
) -> EmbedReport:
    """Embed every sample of the webdataset shards ``source`` into the folder ``out`` (created, or
    resumed: finished shards are skipped). See the module docs for the layout and the rules.

    Args:
        model: an ldmclip ``CLIP`` (on its device, in eval mode); preprocess: its image transform;
            tokenizer: its tokenizer (``list[str] -> LongTensor``).
        source: a brace pattern (``'data/{00000..00099}.tar'``) or a list of shard paths/URLs; or a caption
            table (``.csv``/``.tsv``/``.parquet``, read as ``data.table.CaptionTable`` with ``images`` as its
            image root, ``image_column``, ``caption_column``, ``sep``), cut into outputs of ``shard_size``
            rows named ``{table stem}-{00000}`` (the text cache's names), keys ``IMAGE#ROW``.
        dtype: stored embedding dtype, ``fp16`` (default, as clip-retrieval) or ``fp32``.
        precision: ``auto`` (bf16 autocast on GPUs and AVX512-bf16/AMX CPUs, else fp32), ``amp_bf16``,
            ``amp_fp16`` (CUDA) or ``fp32``.
        batch_size: decoded samples per forward pass (per shard: part of what makes the bytes reproducible).
        heads: ``{column name: nn.Module or head file}`` (``curate.heads.load_head``), applied to the
            normalised image embeddings; each a float32 column.
        rank, world_size: this process's share (default: torch.distributed, else RANK/WORLD_SIZE or SLURM).
        barrier: called after rank 0 prepared the folder and when this rank is done (default:
            ``torch.distributed.barrier`` under an initialised process group of several ranks).
        progress: a tqdm bar (images/s, ETA from ``sizes.json`` when present).
        workers: DataLoader worker processes decoding images (0: in this process).
        model_name, pretrained: recorded in the manifest, to say what made the embeddings.
    """
    started = time.perf_counter()
    if dtype not in EMBED_DTYPES:
        raise UserError(f"unknown embedding dtype {dtype!r}; use one of {', '.join(EMBED_DTYPES)}")
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if int(workers) < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    shards = _inputs(source, images, image_column, caption_column, shard_size, sep)
    check_out_not_input(out, [s.url for s in shards], images)
    rank, world_size = process_rank(rank, world_size)
    barrier = barrier or default_barrier
    is_main = rank == 0

    embed_dim = _embed_dim(model)
    loaded_heads = _load_heads(heads, embed_dim)  # every head is checked before any work
    device = _device_of(model)
    precision = resolve_precision(precision, device)
    store = embed_store(out)
    header = _header(model, dtype, precision, loaded_heads, embed_dim, model_name, pretrained)
    header = _prepare_folder(store, header, is_main, world_size, barrier)

    mine = [s for s in shards if s.index % world_size == rank]
    report = EmbedReport(store.path, other_ranks=len(shards) - len(mine))
    done = set(store.chunk_names())
    for shard in mine:
        if shard.name in done:
            _check_source(store, shard)
    report.already_done = [s.name for s in mine if s.name in done]
    todo = [s for s in mine if s.name not in done]
    report.counts = {"records": 0, "embedded": 0, "skipped": {}}

    encoder = _Encoder(model, loaded_heads, precision, device)
    bar = _progress_bar(todo, rank, world_size) if progress and todo else None
    results: dict[str, _ShardResult] = {}
    try:
        sources = {s.name: s.source for s in todo}
        for batch in _batches(todo, preprocess, tokenizer, int(batch_size), int(workers)):
            result = results.setdefault(batch.shard, _ShardResult())
            if batch.keys:
                result.add(batch, encoder(batch))
                if bar is not None:
                    bar.update(len(batch.keys))
            if batch.last:
                del results[batch.shard]
                _finish_shard(store, batch, result, dtype, embed_dim, list(encoder.heads), report, sources[batch.shard])
                if bar is not None:
                    bar.update(batch.records - len(result.keys))
    finally:
        if bar is not None:
            bar.close()

    if world_size > 1:
        barrier()  # every rank has finished its shards
    if is_main:
        shard_counts = {store.chunk_name(p): store.read_chunk_meta(p)["counts"] for p in store.chunk_files()}
        _write_manifest(store, header, shard_counts)
        report.folder_shards = len(shard_counts)
        for name in sorted(shard_counts):
            _add_counts(report.folder_counts, shard_counts[name])
    report.seconds = time.perf_counter() - started
    return report


def _check_source(store: ChunkStore, shard: _Shard) -> None:
    made_from = store.read_chunk_meta(shard.name).get("source")
    if as_json_value(made_from) != as_json_value(shard.source):
        raise EmbedMismatchError(f"{store.chunk_path(shard.name)} was made from {made_from}, but this run's "
                                 f"{shard.name!r} is {shard.source} (another input with the same name, or another "
                                 "--shard-size?); use another output folder")


def _finish_shard(store: ChunkStore, batch: _Batch, result: _ShardResult, dtype: str, embed_dim: int,
                  head_names: Sequence[str], report: EmbedReport, source: Mapping[str, Any]) -> None:
    counts = {"records": batch.records, "embedded": len(result.keys), "skipped": batch.skipped}
    retry = failed_as_a_whole(batch.skipped, batch.records)
    if retry:  # no files and no marker: a rerun tries this shard again
        report.failed[batch.shard] = retry
        return
    _write_shard(store, batch.shard, result, EMBED_DTYPES[dtype], embed_dim, head_names, counts, source)
    report.written.append(batch.shard)
    _add_counts(report.counts, counts)


def _progress_bar(todo: Sequence[_Shard], rank: int, world_size: int) -> Any:
    from tqdm import tqdm

    sizes = [s.size for s in todo]
    total = sum(sizes) if all(s is not None for s in sizes) else None  # no ETA without sizes.json
    return tqdm(total=total, unit="img", dynamic_ncols=True,
                desc="embed" if world_size == 1 else f"embed rank {rank}")
