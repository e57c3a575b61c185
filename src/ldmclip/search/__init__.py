"""Text → image search over a folder of images: an embedding index (``index``), exact or approximate
nearest neighbours (``neighbors``), queries (``engine``), a local web page (``server``) and the
``ldmclip index`` / ``search`` / ``serve`` commands (``cli``)."""

from .engine import Hit, QueryError, SearchEngine
from .index import IndexMismatchError, SearchIndex, SearchIndexError, build_index, find_images, model_identity
from .neighbors import ExactSearch, HnswSearch, make_searcher, measure_recall, recall_at_k

__all__ = ["Hit", "QueryError", "SearchEngine", "IndexMismatchError", "SearchIndex", "SearchIndexError",
           "build_index", "find_images", "model_identity", "ExactSearch", "HnswSearch", "make_searcher",
           "measure_recall", "recall_at_k"]
