"""``ldmclip search``: the indexed images closest to a text (or to an image); also the options that
``search`` and ``serve`` share (an index, optionally another model or image root, the search mode)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.formats import name_to_text
from ..search.neighbors import DEFAULT_ANN_THRESHOLD
from .common import add_device_option, add_image_root_option, add_json_option, write_json_output

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "add_engine_arguments", "open_engine"]

HELP = "find the indexed images closest to a text (or to an image)"
DESCRIPTION = ("Print the indexed images closest to a text query, or to an image when the query is the path of "
               "an image file, ranked, with their cosine similarity.")
EPILOG = """examples:
  ldmclip search photos.index "a dog running on the beach" -k 10
  ldmclip search photos.index photos/holiday/001.jpg          images like this one
  ldmclip search photos.index "a red car" --json -           the results as JSON
"""


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that opens an index (``search``, ``serve``)."""
    parser.add_argument("index", metavar="INDEX", help="an index folder made by `ldmclip index`")
    parser.add_argument("--model", default=None,
                        help="load the model from here instead of where the index says (it must be the same model)")
    parser.add_argument("--pretrained", default=None, help="weights for --model (see `ldmclip index --help`)")
    add_image_root_option(parser, "the indexed image folder, if it moved since the index was built")
    parser.add_argument("--search", default="auto", choices=("auto", "exact", "approximate"),
                        help="'exact': a matrix product with every embedding; 'approximate': a FAISS HNSW graph "
                             "(pip install faiss-cpu), with its recall against exact search measured and shown; "
                             "'auto': approximate from --ann-threshold images up")
    parser.add_argument("--ann-threshold", type=int, default=DEFAULT_ANN_THRESHOLD, metavar="N",
                        help="index size from which 'auto' searches approximately")
    add_device_option(parser)


def open_engine(args: argparse.Namespace) -> Any:
    from ..search.engine import SearchEngine

    return SearchEngine.open(args.index, args.model, args.pretrained, images=args.images, device=args.device,
                             mode=args.search, threshold=args.ann_threshold)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("query", metavar="QUERY",
                        help="text describing the images to find, or the path of an image (finds similar images)")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    # A bare --json (the old flag) prints to standard output.
    add_json_option(parser, "write the results as JSON to this file ('-' or no value: standard output)",
                    optional_value=True)


def run(args: argparse.Namespace) -> int:
    """Ranked paths and scores (or JSON)."""
    if args.k < 1:
        raise UserError("-k must be at least 1")
    engine = open_engine(args)
    is_image = Path(args.query).is_file()
    hits = engine.search_image(args.query, args.k) if is_image else engine.search_text(args.query, args.k)
    kind = "image" if is_image else "text"
    if args.json:
        write_json_output(args.json, {
            "query": args.query, "kind": kind, "search": engine.searcher.kind, "note": engine.searcher.note,
            "recall": getattr(engine.searcher, "recall", None), "image_root": name_to_text(engine.index.root),
            "results": [h.as_dict() for h in hits]})
        return 0
    print(f"{len(hits)} nearest of {len(engine.index):,} images to the {kind} {args.query!r} "
          f"({engine.searcher.note})")
    print(f"{'rank':>4}  {'score':>6}  path")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>6.3f}  {engine.index.root / hit.path}")
    sys.stdout.flush()
    return 0
