"""Near-duplicate groups of an embedding folder: every pair of samples whose image embeddings have cosine
similarity at or above a threshold is linked, the links are joined into groups (connected components, so a
chain a~b~c is one group even when a and c are further apart), and one member of each group is kept.

Pairs come from FAISS range search (``pip install faiss-cpu``): exact (``IndexFlatIP``, every pair
compared) up to ``exact_limit`` vectors, approximate (``IndexIVFFlat``: only the ``nprobe`` nearest of
``nlist`` clusters are searched) above it. An approximate search can miss pairs, so its recall of the
above-threshold pairs is measured every time against exact search for a random sample of queries, reported,
and warned about when low. Every pair FAISS returns is checked again in float64, so the groups do not depend
on FAISS's rounding (or thread count) and a rerun writes the same bytes.

The kept member of a group is the one with the highest score (a metadata column: ``clip_score`` by default,
or a head's score such as ``aesthetic``), ties broken by the smallest key, so the result does not depend on
the order of the rows. Group ids are numbered in the order of each group's smallest key, for the same reason.

On disk (the embedding folder of ``ldmclip embed``, see ``dedup_folder``)::

    DIR/dedup/dedup.parquet     key, dup_group (int64), dup_group_size (int32), dup_keep (bool); one row per
                                sample, in the folder's global row order
    DIR/dedup/summary.json      threshold, method, recall, groups with more than one member, samples not kept
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.ann import import_faiss
from ..core.errors import UserError
from ..core.files import write_json_atomic, write_parquet_atomic
from .embed import FORMAT as EMBEDDINGS_FORMAT
from .embed import IMG_DIR as IMG_EMB_DIR
from .embed import META_DIR as METADATA_DIR
from .embed import check_finished

__all__ = ["DedupResult", "find_near_duplicates", "dedup_folder", "read_embedding_folder", "EmbeddingFolder",
           "DEFAULT_EXACT_LIMIT", "DEFAULT_NPROBE", "RECALL_QUERIES", "LOW_RECALL", "DEDUP_DIR"]

# Exact range search compares all N² pairs, so its cost grows with N²·D: 20,000 × 64-d took about 4 s on 2 shared
# CPU cores, so 100,000 × 768-d is some minutes on a multi-core server. Above that the approximate index, whose
# recall is measured, is the better trade.
DEFAULT_EXACT_LIMIT = 100_000
DEFAULT_NPROBE = 16              # clusters searched per query by the approximate index
RECALL_QUERIES = 1000            # random queries whose pairs are checked against exact search
LOW_RECALL = 0.95                # below it the approximate search warns: raise nprobe or exact_limit
QUERY_BLOCK = 8192               # queries per range search: bounds the memory of the results held at once
# FAISS is asked for pairs a little below the threshold, and each one is checked again in float64: a pair
# exactly at the threshold is then found whatever FAISS's float32 sums round to.
SEARCH_MARGIN = 1e-4
DEDUP_DIR = "dedup"


@dataclass
class DedupResult:
    """Near-duplicate groups of N rows.

    ``group`` [N] int64: the group id of each row (singletons have a group of their own);
    ``group_size`` [N] int32; ``keep`` [N] bool: the one kept member of each group (every singleton);
    ``pairs`` [P, 2] int64: the linked row pairs (i < j, sorted); ``method``: "exact" or "approximate";
    ``recall``: the fraction of above-threshold pairs of the sampled queries that the approximate search
    found (``None`` for exact search, or when no sampled query had a near-duplicate);
    ``recall_queries``: the sampled rows; ``recall_pairs``: how many exact pairs the recall is measured on.
    """

    threshold: float
    group: np.ndarray
    group_size: np.ndarray
    keep: np.ndarray
    pairs: np.ndarray
    method: str
    recall: float | None = None
    recall_queries: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    recall_pairs: int = 0
    note: str = ""

    @property
    def groups(self) -> int:
        """Groups with more than one member."""
        return int(len(np.unique(self.group[self.group_size > 1])))

    @property
    def not_kept(self) -> int:
        return int((~self.keep).sum())

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "method": self.method, "recall": self.recall,
                "recall_pairs": self.recall_pairs, "recall_queries": int(len(self.recall_queries)),
                "samples": int(len(self.group)), "pairs": int(len(self.pairs)), "groups": self.groups,
                "not_kept": self.not_kept, "note": self.note}


# ----------------------------------------------------------------------------------------------------
# Pairs


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (-1.0 < threshold <= 1.0) or math.isnan(threshold):
        raise UserError(f"the near-duplicate threshold is a cosine similarity in (-1, 1], got {threshold} "
                        "(0.95 links re-encoded copies of a photo with a trained CLIP model)")
    return threshold


def _range_pairs(index: Any, queries: np.ndarray, threshold: float, *, query_offset: int = 0,
                 progress: bool = False, desc: str = "near-duplicates") -> np.ndarray:
    """``[P, 2]`` (query row + ``query_offset``, index row) of every result of ``index.range_search`` with an
    inner product above ``threshold - SEARCH_MARGIN``, searched ``QUERY_BLOCK`` queries at a time."""
    from tqdm import tqdm

    found: list[np.ndarray] = []
    starts = range(0, len(queries), QUERY_BLOCK)
    for start in tqdm(starts, desc=desc, unit="block", disable=not progress or len(starts) < 2):
        block = np.ascontiguousarray(queries[start:start + QUERY_BLOCK], dtype=np.float32)
        limits, _, ids = index.range_search(block, float(threshold - SEARCH_MARGIN))
        rows = np.repeat(np.arange(len(block), dtype=np.int64), np.diff(limits.astype(np.int64))) + start + query_offset
        found.append(np.stack([rows, ids.astype(np.int64)], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _verified(pairs: np.ndarray, vectors: np.ndarray, threshold: float, *, other: np.ndarray | None = None) -> np.ndarray:
    """The pairs whose cosine, computed again in float64, is at least ``threshold`` (rows of ``vectors``
    against rows of ``other``, which defaults to ``vectors``)."""
    other = vectors if other is None else other
    if not len(pairs):
        return pairs
    cosine = np.einsum("ij,ij->i", vectors[pairs[:, 0]].astype(np.float64), other[pairs[:, 1]].astype(np.float64))
    return pairs[cosine >= threshold]


def _unique_links(pairs: np.ndarray) -> np.ndarray:
    """Pairs as (smaller, larger) row, without self-pairs or repeats, sorted."""
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _exact_pairs(vectors: np.ndarray, threshold: float, progress: bool) -> np.ndarray:
    faiss = import_faiss("near-duplicate search")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return _unique_links(_verified(_range_pairs(index, vectors, threshold, progress=progress), vectors, threshold))


def _ivf_lists(n: int) -> int:
    # About 4·√N clusters (FAISS's guidance for IVF), with at least 39 training points per cluster, which
    # FAISS's k-means asks for.
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _approximate_pairs(vectors: np.ndarray, threshold: float, nprobe: int, progress: bool) -> np.ndarray:
    faiss = import_faiss("approximate near-duplicate search")
    nlist = _ivf_lists(len(vectors))
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    # Trained on an evenly spaced subset (k-means needs no more than 256 points per cluster): deterministic.
    step = max(1, len(vectors) // (256 * nlist))
    index.train(np.ascontiguousarray(vectors[::step]))
    index.add(vectors)
    index.nprobe = min(nprobe, nlist)
    pairs = _range_pairs(index, vectors, threshold, progress=progress)
    return _unique_links(_verified(pairs, vectors, threshold))


def _recall_sample(n: int, queries: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(queries, n), replace=False)).astype(np.int64)


def _measured_recall(vectors: np.ndarray, threshold: float, found: np.ndarray, sample: np.ndarray) -> tuple[float | None, int]:
    """(recall, exact pairs): of the above-threshold pairs (query, other row) of the sampled queries, found
    by exact search, the fraction that is among ``found``. Exact search here is the sample as a flat index,
    searched by every row: N × len(sample) products, cheap beside the N × N of a full exact search."""
    faiss = import_faiss("measuring the recall of approximate near-duplicate search")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[sample]))
    hits = _range_pairs(index, vectors, threshold, desc="recall check")       # (row, position in sample)
    truth = np.stack([sample[hits[:, 1]], hits[:, 0]], axis=1)                  # (sampled query, row)
    truth = _verified(truth, vectors, threshold)
    truth = truth[truth[:, 0] != truth[:, 1]]
    if not len(truth):
        return None, 0
    links = {(int(a), int(b)) for a, b in found}
    hit = sum((min(a, b), max(a, b)) in links for a, b in truth.tolist())
    return hit / len(truth), int(len(truth))


# ----------------------------------------------------------------------------------------------------
# Groups


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The root row of each row's connected component (union-find with path halving)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return np.array([find(x) for x in range(n)], dtype=np.int64)


def _groups(roots: np.ndarray, keys: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group id, group size, keep) from each row's component root: ids in the order of each group's
    smallest key; the kept member the highest score, then the smallest key (then the first row, for keys
    that repeat). NaN scores count as the lowest."""
    n = len(roots)
    rows = np.arange(n)
    by_key = np.lexsort((rows, keys))
    first_seen = np.unique(roots[by_key], return_index=True)[1]          # per root: position in key order
    ordered_roots = np.unique(roots[by_key])[np.argsort(first_seen)]
    group_of_root = {int(root): gid for gid, root in enumerate(ordered_roots)}
    group = np.array([group_of_root[int(r)] for r in roots], dtype=np.int64)
    size = np.bincount(group, minlength=len(ordered_roots)).astype(np.int32)[group]
    ranking = np.where(np.isnan(scores), -np.inf, scores)
    best_first = np.lexsort((rows, keys, -ranking))
    keep = np.zeros(n, dtype=bool)
    keep[best_first[np.unique(group[best_first], return_index=True)[1]]] = True
    return group, size, keep


def find_near_duplicates(embeddings: np.ndarray, threshold: float, *, keys: Sequence[str],
                         scores: np.ndarray | None = None, exact_limit: int = DEFAULT_EXACT_LIMIT,
                         nprobe: int = DEFAULT_NPROBE, recall_queries: int = RECALL_QUERIES, seed: int = 0,
                         progress: bool = False) -> DedupResult:
    """Group the rows of ``embeddings`` ([N, D], L2-normalised) whose cosine similarity is ``>= threshold``.

    Args:
        keys: one unique name per row (the sample keys): the tie-break of the kept member and the order of
            the group ids, so that the result does not depend on the row order.
        scores: [N] numbers, the highest kept in each group; ``None``: all equal (the smallest key is kept).
        exact_limit: exact search up to this many rows, approximate (FAISS IVF-Flat) above it.
        nprobe: clusters searched per query by the approximate index (more: slower, higher recall).
        recall_queries: sampled rows on which the approximate search's recall is measured; ``seed`` draws them.
    """
    threshold = _check_threshold(threshold)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise UserError(f"embeddings must be a [N, D] array, got shape {tuple(vectors.shape)}")
    n = len(vectors)
    keys = np.asarray([str(k) for k in keys], dtype=str) if n else np.zeros(0, dtype=str)
    if len(keys) != n:
        raise UserError(f"{len(keys)} keys for {n} embeddings: give one key per row")
    scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise UserError(f"{scores.shape[0] if scores.ndim else 0} scores for {n} embeddings: give one score per row")
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return DedupResult(threshold, empty, empty.astype(np.int32), empty.astype(bool), empty.reshape(0, 2), "exact")
    approximate = n > exact_limit
    if approximate:
        pairs = _approximate_pairs(vectors, threshold, nprobe, progress)
        sample = _recall_sample(n, recall_queries, seed)
        recall, measured = _measured_recall(vectors, threshold, pairs, sample)
        note = _recall_note(recall, measured, len(sample), nprobe)
        if recall is not None and recall < LOW_RECALL:
            warnings.warn(note, stacklevel=2)
    else:
        pairs = _exact_pairs(vectors, threshold, progress)
        sample, recall, measured, note = np.zeros(0, dtype=np.int64), None, 0, "exact search: every pair compared"
    group, size, keep = _groups(_components(n, pairs), keys, scores)
    return DedupResult(threshold, group, size, keep, pairs, "approximate" if approximate else "exact", recall,
                       sample, measured, note)


def _recall_note(recall: float | None, measured: int, queries: int, nprobe: int) -> str:
    if recall is None:
        return (f"approximate search (FAISS IVF-Flat, nprobe {nprobe}): recall not measurable, none of the "
                f"{queries:,} sampled queries has a near-duplicate")
    text = (f"approximate search (FAISS IVF-Flat, nprobe {nprobe}): recall {recall:.3f} of the {measured:,} "
            f"near-duplicate pairs of {queries:,} sampled queries")
    if recall < LOW_RECALL:
        text += " (low: some near-duplicates are missed; raise the exact limit to search exactly)"
    return text


# ----------------------------------------------------------------------------------------------------
# The embedding folder


@dataclass
class EmbeddingFolder:
    """The image embeddings and metadata of an embedding folder, all shards in sorted order."""

    path: Path
    names: list[str]
    embeddings: np.ndarray
    metadata: Any  # pyarrow.Table


def _shard_files(folder: Path, prefix: str, suffix: str) -> dict[str, Path]:
    return {p.name[len(prefix):-len(suffix)]: p for p in folder.glob(f"{prefix}*{suffix}") if not p.name.startswith(".")}


def _not_an_embedding_folder(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not an embedding folder of 'ldmclip embed' ({why}); make one with "
                     "ldmclip embed SHARDS --model ... --out DIR")


def _check_manifest(path: Path) -> None:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return  # clip-retrieval writes no manifest; its folders are read as they are
    try:
        found = json.loads(manifest.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        raise _not_an_embedding_folder(path, "its manifest.json cannot be read") from None
    if found != EMBEDDINGS_FORMAT:
        raise _not_an_embedding_folder(path, f"its manifest.json has format {found!r}")


def read_embedding_folder(path: str | os.PathLike) -> EmbeddingFolder:
    """Every ``img_emb/img_emb_NAME.npy`` and ``metadata/metadata_NAME.parquet`` of ``path``, in sorted NAME
    order, checked to line up (same shards, same rows); a folder that is not an embedding folder is one
    :class:`UserError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_dir():
        raise _not_an_embedding_folder(path, "no such folder")
    _check_manifest(path)
    check_finished(path)
    embeddings = _shard_files(path / IMG_EMB_DIR, "img_emb_", ".npy")
    metadata = _shard_files(path / METADATA_DIR, "metadata_", ".parquet")
    if not embeddings or not metadata:
        raise _not_an_embedding_folder(path, f"no {IMG_EMB_DIR}/img_emb_*.npy and {METADATA_DIR}/metadata_*.parquet files")
    if set(embeddings) != set(metadata):
        odd = sorted(set(embeddings) ^ set(metadata))
        raise UserError(f"{path}: shard(s) {', '.join(odd[:5])} have embeddings without metadata or metadata without "
                        "embeddings (an unfinished 'ldmclip embed'? rerun it to finish)")
    names = sorted(embeddings)
    arrays = [np.load(embeddings[name], mmap_mode="r") for name in names]
    tables = [pq.read_table(metadata[name]) for name in names]
    for name, array, table in zip(names, arrays, tables):
        if array.ndim != 2 or array.shape[1] != arrays[0].shape[1]:
            raise UserError(f"{embeddings[name]}: shape {array.shape}, expected [rows, {arrays[0].shape[1]}]")
        if array.shape[0] != table.num_rows:
            raise UserError(f"shard {name}: {array.shape[0]} embeddings but {table.num_rows} metadata rows; the two "
                            "files must hold the same samples in the same order")
        if "key" not in table.column_names:
            raise UserError(f"{metadata[name]} has no 'key' column")
    stacked = np.concatenate([np.asarray(a, dtype=np.float32) for a in arrays]) if arrays else np.zeros((0, 0), np.float32)
    return EmbeddingFolder(path, names, stacked, pa.concat_tables(tables, promote_options="default"))


def _keep_scores(table: Any, keep_by: str | None) -> np.ndarray | None:
    import pyarrow.types as types

    if keep_by is None:
        return None
    numeric = [f.name for f in table.schema if types.is_integer(f.type) or types.is_floating(f.type)]
    if keep_by not in numeric:
        raise UserError(f"cannot keep near-duplicates by {keep_by!r}: not a numeric metadata column; the numeric "
                        f"columns are {', '.join(numeric) or '(none)'}")
    return table.column(keep_by).to_numpy(zero_copy_only=False).astype(np.float64)


def dedup_folder(out_dir: str | os.PathLike, threshold: float, *, keep_by: str | None = "clip_score",
                 exact_limit: int = DEFAULT_EXACT_LIMIT, nprobe: int = DEFAULT_NPROBE,
                 progress: bool = False) -> DedupResult:
    """Near-duplicate groups of an embedding folder (``ldmclip embed --out DIR``), written to
    ``DIR/dedup/dedup.parquet`` and ``DIR/dedup/summary.json`` (atomically; a rerun writes the same bytes).

    ``keep_by``: the numeric metadata column whose highest value is kept in each group (``clip_score``, a
    head's column such as ``aesthetic``, or ``None`` for the smallest key)."""
    import pyarrow as pa

    threshold = _check_threshold(threshold)
    folder = read_embedding_folder(out_dir)
    keys = folder.metadata.column("key").to_pylist()
    scores = _keep_scores(folder.metadata, keep_by)
    if len(set(keys)) != len(keys):
        warnings.warn(f"{folder.path}: some keys repeat; dedup.parquet rows are in the folder's row order, "
                      "a join on key cannot tell repeated keys apart", stacklevel=2)
    result = find_near_duplicates(folder.embeddings, threshold, keys=keys, scores=scores, exact_limit=exact_limit,
                                  nprobe=nprobe, progress=progress)
    table = pa.table({"key": pa.array(keys, pa.string()), "dup_group": pa.array(result.group, pa.int64()),
                      "dup_group_size": pa.array(result.group_size, pa.int32()),
                      "dup_keep": pa.array(result.keep, pa.bool_())})
    write_parquet_atomic(folder.path / DEDUP_DIR / "dedup.parquet", table)
    summary = {**result.summary(), "keep_by": keep_by, "exact_limit": exact_limit, "shards": len(folder.names)}
    write_json_atomic(folder.path / DEDUP_DIR / "summary.json", summary, sort_keys=True)
    return result
