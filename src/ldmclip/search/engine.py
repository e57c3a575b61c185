"""Queries against an index: text → image, image → image, and "more like this indexed image"."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.samples import BadSample, apply_transform, decode_image
from ..core.devices import resolve_device
from ..core.errors import UserError
from ..core.formats import name_to_text
from .index import SearchIndex, check_same_model, model_identity
from .neighbors import DEFAULT_ANN_THRESHOLD, Searcher, make_searcher

__all__ = ["Hit", "QueryError", "SearchEngine", "MAX_QUERY_CHARS"]

MAX_QUERY_CHARS = 1000  # CLIP reads at most 77 tokens; a longer "query" is a mistake, not a search


class QueryError(UserError):
    """A query that cannot be searched (empty, no readable tokens, an unreadable image...)."""


@dataclass
class Hit:
    rank: int
    id: int
    path: str      # relative to the index's image root
    score: float   # cosine similarity

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchEngine:
    """An index, the model that built it and a searcher (exact or approximate)."""

    def __init__(self, index: SearchIndex, model: Any, tokenizer: Any, transform: Any, searcher: Searcher,
                 device: torch.device | str = "cpu") -> None:
        self.index, self.model, self.tokenizer, self.transform = index, model, tokenizer, transform
        self.searcher, self.device = searcher, torch.device(device)
        # One query at a time through the model: the web server answers requests on several threads.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index: str | os.PathLike, model: str | None = None, pretrained: str | None = None, *,
             images: str | os.PathLike | None = None, device: str | None = None, mode: str = "auto",
             threshold: int = DEFAULT_ANN_THRESHOLD) -> "SearchEngine":
        """Load the index at ``index`` and its model (by default the one named in the index manifest;
        ``model``/``pretrained`` load another copy of it, e.g. after moving the weights). An index built
        by a different model is refused with :class:`~ldmclip.search.index.IndexMismatchError`."""
        from ..registry import create_model_and_transforms, get_tokenizer

        loaded = SearchIndex.load(index, images=images)
        stored = loaded.identity
        name = model or stored["name"]
        weights = pretrained if (pretrained or model) else stored.get("pretrained")
        dev = resolve_device(device)
        net, _, transform = create_model_and_transforms(name, pretrained=weights, device=dev)
        net.eval()
        check_same_model(stored, model_identity(net, name, weights), f"the index {index}")
        searcher = make_searcher(loaded.embeddings, mode, threshold, cache=Path(index) / "ann")
        return cls(loaded, net, get_tokenizer(name), transform, searcher, dev)

    # -------------------------------------------------------------------------------------------------
    # Encoding queries

    @torch.inference_mode()
    def encode_text(self, query: str) -> torch.Tensor:
        """The unit text embedding ``[1, D]`` of ``query``; :class:`QueryError` when there is nothing to encode."""
        if not isinstance(query, str) or not query.strip():
            raise QueryError("the query is empty: type a few words describing the image you want")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"the query is {len(query):,} characters long; at most {MAX_QUERY_CHARS:,} "
                             "(CLIP reads only its first 77 tokens anyway)")
        tokens = self.tokenizer([query])
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None and tokens.shape[1] > 1 and int(tokens[0, 1]) == eot:
            # Only start- and end-of-text: control characters, unknown symbols and the like.
            raise QueryError(f"the query {query[:80]!r} has no words the tokenizer can read")
        with self._lock:
            features = self.model.encode_text(tokens.to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_image(self, image: str | os.PathLike | bytes) -> torch.Tensor:
        """The unit image embedding ``[1, D]`` of an image file (or its bytes)."""
        try:
            pixels = apply_transform(decode_image(image if isinstance(image, bytes) else os.fspath(image)),
                                     self.transform)
        except BadSample as bad:
            raise QueryError(f"cannot read the query image ({bad})") from None
        with self._lock:
            features = self.model.encode_image(pixels.unsqueeze(0).to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    # -------------------------------------------------------------------------------------------------
    # Searching

    def _hits(self, query: torch.Tensor, k: int) -> list[Hit]:
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        scores, ids = self.searcher.search(query, k)
        hits = []
        for score, i in zip(scores[0].tolist(), ids[0].tolist()):
            if i >= 0:  # FAISS pads with -1 when it finds fewer than k
                hits.append(Hit(len(hits) + 1, int(i), self.index.paths[i], float(score)))
        return hits

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` indexed images closest to the text ``query``."""
        return self._hits(self.encode_text(query), k)

    def search_image(self, image: str | os.PathLike | bytes, k: int = 10) -> list[Hit]:
        """The ``k`` indexed images closest to an image file (or its bytes)."""
        return self._hits(self.encode_image(image), k)

    def similar(self, image_id: int, k: int = 10) -> list[Hit]:
        """The ``k`` indexed images closest to indexed image ``image_id`` (itself first), from its stored
        embedding: nothing is read from disk."""
        if not 0 <= image_id < len(self.index):
            raise QueryError(f"no image with id {image_id} in the index (ids go from 0 to {len(self.index) - 1})")
        return self._hits(self.index.embeddings[image_id:image_id + 1], k)

    def info(self) -> dict[str, Any]:
        """What is loaded, for people (``ldmclip serve`` shows it; ``/api/info`` returns it)."""
        identity = self.index.identity
        return {"index": str(self.index.path), "images": len(self.index), "image_root": name_to_text(self.index.root),
                "model": identity.get("name"), "pretrained": identity.get("pretrained"),
                "skipped": self.index.manifest.get("skipped", {}), "search": self.searcher.kind,
                "search_note": self.searcher.note, "recall": getattr(self.searcher, "recall", None)}
