"""Nearest neighbours of query vectors among the index embeddings: exact or approximate.

All vectors have unit length, so the cosine similarity is the inner product. Exact search is one matrix
product and a top-k: a few milliseconds per query up to hundreds of thousands of images on a CPU, and
it is the reference. Above a size threshold (and when FAISS is installed: ``pip install faiss-cpu``)
an HNSW graph (``faiss.IndexHNSWFlat``, inner-product metric) answers in well under a millisecond at
any size; it can miss true neighbours, so its recall@k against exact search is measured on sample
queries every time it is built, and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..core.ann import faiss_available

__all__ = ["ExactSearch", "HnswSearch", "Searcher", "SearchMode", "make_searcher", "recall_at_k",
           "measure_recall", "faiss_available", "DEFAULT_ANN_THRESHOLD"]

DEFAULT_ANN_THRESHOLD = 200_000   # below it exact search is fast enough, and has no build time
RECALL_QUERIES = 200              # sample queries for the recall measurement
RECALL_K = 10


class Searcher(Protocol):
    kind: str          # "exact" or "approximate"
    note: str          # one line for people: what is used and why, with the measured recall

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ExactSearch:
    """Inner products with every embedding, then the top k."""

    kind = "exact"

    def __init__(self, embeddings: torch.Tensor, note: str = "exact search (matrix product)") -> None:
        self.embeddings = embeddings.float()
        self.note = note

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, ids)``, both ``[Q, min(k, N)]``, best first."""
        k = min(k, self.embeddings.shape[0])
        scores = queries.float() @ self.embeddings.T
        return torch.topk(scores, k, dim=1)


class HnswSearch:
    """FAISS HNSW graph over the embeddings (inner product)."""

    kind = "approximate"

    def __init__(self, embeddings: torch.Tensor, m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 cache: Path | None = None) -> None:
        import faiss

        vectors = np.ascontiguousarray(embeddings.float().numpy())
        self.ef_search = ef_search
        self.index = _load_cached(cache, vectors, m, ef_construction)
        if self.index is None:
            self.index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.add(vectors)
            _save_cached(cache, self.index, vectors, m, ef_construction)
        self.recall: float | None = None
        self.note = "approximate search (FAISS HNSW)"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        k = min(k, self.index.ntotal)
        # The graph search keeps ef candidates; at least a few times k, or deep results get worse. Passed
        # per call (not set on the index): the web server searches from several threads at once.
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, 4 * k))
        scores, ids = self.index.search(np.ascontiguousarray(queries.float().numpy()), k, params=params)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()


def _cache_key(vectors: np.ndarray, m: int, ef_construction: int) -> str:
    digest = hashlib.sha256(f"{vectors.shape}|{m}|{ef_construction}|".encode())
    digest.update(vectors.tobytes())
    return digest.hexdigest()


def _load_cached(cache: Path | None, vectors: np.ndarray, m: int, ef_construction: int):
    """A graph saved by an earlier run for exactly these vectors and settings (building one for a million
    images takes minutes), or ``None``."""
    import faiss

    if cache is None:
        return None
    try:
        saved = json.loads((cache / "hnsw.json").read_text(encoding="utf-8"))
        if saved.get("key") != _cache_key(vectors, m, ef_construction):
            return None
        return faiss.read_index(str(cache / "hnsw.faiss"))
    except Exception:  # noqa: BLE001 - no cache, or a damaged one: build again
        return None


def _save_cached(cache: Path | None, index, vectors: np.ndarray, m: int, ef_construction: int) -> None:
    import faiss

    if cache is None:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        temp = cache / ".hnsw.faiss.tmp"
        faiss.write_index(index, str(temp))
        os.replace(temp, cache / "hnsw.faiss")
        key = {"key": _cache_key(vectors, m, ef_construction)}
        (cache / ".hnsw.json.tmp").write_text(json.dumps(key), encoding="utf-8")
        os.replace(cache / ".hnsw.json.tmp", cache / "hnsw.json")
    except OSError:  # a read-only index folder: search works, the graph is rebuilt next time
        pass


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over queries of |found ∩ truth| / k, for two ``[Q, k]`` id tensors."""
    if found.numel() == 0:
        return 1.0
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)]
    return sum(hits) / truth.numel()


def measure_recall(approximate: Searcher, exact: ExactSearch, k: int = RECALL_K, queries: int = RECALL_QUERIES,
                   seed: int = 0) -> float:
    """Recall@k of ``approximate`` against ``exact`` on sample queries: indexed vectors, slightly perturbed
    so each query is not trivially its own nearest neighbour (queries look like the data, as real ones do)."""
    embeddings = exact.embeddings
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(embeddings.shape[0], generator=generator)[:queries]
    noise = torch.randn(len(picks), embeddings.shape[1], generator=generator) * 0.5 / embeddings.shape[1] ** 0.5
    sample = torch.nn.functional.normalize(embeddings[picks] + noise, dim=1)
    return recall_at_k(approximate.search(sample, k)[1], exact.search(sample, k)[1])


SearchMode = str  # "auto" | "exact" | "approximate"


@dataclass
class _Choice:
    kind: str
    reason: str


def _choose(n: int, mode: SearchMode, threshold: int) -> _Choice:
    if mode not in ("auto", "exact", "approximate"):
        raise ValueError(f"search mode must be auto, exact or approximate, got {mode!r}")
    if mode == "exact" or (mode == "auto" and n < threshold):
        reason = "" if mode == "exact" else f"under the {threshold:,}-image threshold for approximate search"
        return _Choice("exact", reason)
    if not faiss_available():
        return _Choice("exact", "FAISS is not installed (pip install faiss-cpu) for approximate search")
    return _Choice("approximate", "")


def make_searcher(embeddings: torch.Tensor, mode: SearchMode = "auto", threshold: int = DEFAULT_ANN_THRESHOLD,
                  cache: Path | None = None, recall_k: int = RECALL_K) -> Searcher:
    """Exact search, or an HNSW graph (with its measured recall@``recall_k`` in ``recall`` and ``note``)
    when ``mode`` is ``approximate``, or ``auto`` with at least ``threshold`` embeddings."""
    exact = ExactSearch(embeddings)
    choice = _choose(embeddings.shape[0], mode, threshold)
    if choice.kind == "exact" or embeddings.shape[0] == 0:
        if choice.reason:
            exact.note = f"exact search (matrix product): {choice.reason}"
        return exact
    approximate = HnswSearch(embeddings, cache=cache)
    approximate.recall = measure_recall(approximate, exact, k=recall_k)
    approximate.recall_k = recall_k
    approximate.note = (f"approximate search (FAISS HNSW): recall@{recall_k} {approximate.recall:.3f} against "
                        f"exact search on {min(RECALL_QUERIES, embeddings.shape[0])} sample queries")
    return approximate
