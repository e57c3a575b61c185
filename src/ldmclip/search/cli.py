"""``ldmclip index``, ``ldmclip search`` and ``ldmclip serve``: text → image search over a folder of images."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ..core.formats import carries_weights
from ..core.precision import PRECISIONS
from ..data.samples import default_workers
from .neighbors import DEFAULT_ANN_THRESHOLD

__all__ = ["add_index_arguments", "run_index", "add_search_arguments", "run_search", "add_serve_arguments",
           "run_serve", "INDEX_EPILOG", "SEARCH_EPILOG", "SERVE_EPILOG"]

INDEX_EPILOG = """examples:
  ldmclip index photos/ --model ViT-B-32 --pretrained vit-b-32.safetensors --out photos.index
  ldmclip index photos/ --model local-dir:runs/flickr8k/final --out photos.index

Rerun the same command to continue after a crash or Ctrl-C, or to bring the index up to date after
adding, changing or removing images: finished chunks whose files did not change are kept.
"""

SEARCH_EPILOG = """examples:
  ldmclip search photos.index "a dog running on the beach" -k 10
  ldmclip search photos.index photos/holiday/001.jpg          images like this one
"""

SERVE_EPILOG = """examples:
  ldmclip serve photos.index                       then open http://127.0.0.1:8000/
  ldmclip serve photos.index --port 8080 --search approximate

JSON API: /api/search?q=TEXT&k=N, /api/similar?id=ID&k=N, /api/info; images: /image/ID, /thumb/ID.
"""


def _absolute(spec: str | None) -> str | None:
    """A model name or weights spec that will still load from another working directory."""
    from ..core.formats import HF_HUB_PREFIX, LOCAL_DIR_PREFIX

    if spec is None or spec.startswith(HF_HUB_PREFIX):
        return spec
    if spec.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + str(Path(spec[len(LOCAL_DIR_PREFIX):]).expanduser().resolve())
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="an index folder made by `ldmclip index`")
    parser.add_argument("--model", default=None,
                        help="load the model from here instead of where the index says (it must be the same model)")
    parser.add_argument("--pretrained", default=None, help="weights for --model (see `ldmclip index --help`)")
    parser.add_argument("--images", metavar="ROOT", default=None,
                        help="the indexed image folder, if it moved since the index was built")
    parser.add_argument("--search", default="auto", choices=("auto", "exact", "approximate"),
                        help="'exact': a matrix product with every embedding; 'approximate': a FAISS HNSW graph "
                             "(pip install faiss-cpu), with its recall against exact search measured and shown; "
                             "'auto': approximate from --ann-threshold images up (default: %(default)s)")
    parser.add_argument("--ann-threshold", type=int, default=DEFAULT_ANN_THRESHOLD, metavar="N",
                        help="index size from which 'auto' searches approximately (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def _open_engine(args: argparse.Namespace):
    from .engine import SearchEngine

    return SearchEngine.open(args.index, args.model, args.pretrained, images=args.images, device=args.device,
                             mode=args.search, threshold=args.ann_threshold)


# ---------------------------------------------------------------------------------------------------
# ldmclip index


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ldmclip index``."""
    parser.add_argument("images", metavar="DIR", help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, metavar="INDEX", help="index folder to create (or to continue)")
    parser.add_argument("--model", required=True,
                        help="model name: a packaged config, a JSON config, 'hf-hub:org/repo' or 'local-dir:PATH'")
    parser.add_argument("--pretrained", default=None,
                        help="weights: a file (.safetensors/.bin/.pt), a checkpoint folder or 'hf-hub:org/repo' "
                             "(needed unless the model name carries weights: local-dir: or hf-hub:)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="images per stored chunk; a rerun redoes at most the unfinished chunk "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="stored embedding type; float16 halves the size and changes scores by about 1e-3 "
                             "(default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="'auto': bf16 autocast on GPUs and on CPUs with AMX/AVX512-bf16, else fp32 "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="image-decoding worker processes (default: %(default)s)")


def run_index(args: argparse.Namespace) -> int:
    """Run ``ldmclip index``."""
    from ..core.devices import resolve_device
    from ..registry import create_model_and_transforms
    from ..core.precision import autocast, resolve_precision
    from .index import build_index, find_images, model_identity

    if args.batch_size < 1 or args.chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be at least 1")
    if args.workers < 0:
        raise ValueError("--workers must be 0 or more")
    if args.pretrained is None and not carries_weights(args.model):
        # Random weights differ on every load, so such an index could never be searched.
        raise ValueError(f"--pretrained is needed: {args.model!r} names only a config, and an index made with "
                         "random weights cannot be searched (the weights would differ next time)")
    if not find_images(args.images):  # before the (slow) model load: a wrong folder fails at once
        raise ValueError(f"no image files under {args.images}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    name, pretrained = _absolute(args.model), _absolute(args.pretrained)
    model, _, transform = create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    result = build_index(model, transform, args.images, args.out, identity=model_identity(model, name, pretrained),
                         batch_size=args.batch_size, chunk_size=args.chunk_size, dtype=args.dtype, device=device,
                         workers=args.workers, autocast=lambda: autocast(precision, device))
    print(f"ldmclip index: {result.images:,} of {result.files:,} images indexed into {result.out} "
          f"({result.embed_dim}-d {args.dtype}, {result.chunks} chunk(s), {result.chunks_reused} kept from an "
          f"earlier run, {result.seconds:.1f} s)")
    if result.skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in result.skipped.items())
        print(f"  skipped {sum(result.skipped.values()):,} unreadable file(s): {reasons}")
        for path, reason in result.skipped_files[:10]:
            print(f"    {path}: {reason}")
        if len(result.skipped_files) > 10:
            print(f"    … and {len(result.skipped_files) - 10:,} more")
    if not result.images:
        raise ValueError(f"none of the {result.files:,} image files under {args.images} could be read")
    print(f"search it: ldmclip search {result.out} \"a photo of ...\"   or   ldmclip serve {result.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# ldmclip search


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ldmclip search``."""
    _add_engine_arguments(parser)
    parser.add_argument("query", metavar="QUERY",
                        help="text describing the images to find, or the path of an image (finds similar images)")
    parser.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run_search(args: argparse.Namespace) -> int:
    """Run ``ldmclip search``: ranked paths and scores."""
    if args.k < 1:
        raise ValueError("-k must be at least 1")
    engine = _open_engine(args)
    is_image = Path(args.query).is_file()
    hits = engine.search_image(args.query, args.k) if is_image else engine.search_text(args.query, args.k)
    if args.json:
        print(json.dumps({"query": args.query, "kind": "image" if is_image else "text", "search": engine.searcher.kind,
                          "note": engine.searcher.note, "recall": getattr(engine.searcher, "recall", None),
                          "image_root": str(engine.index.root), "results": [h.as_dict() for h in hits]},
                         ensure_ascii=False, indent=1))
        return 0
    kind = "image" if is_image else "text"
    print(f"{len(hits)} nearest of {len(engine.index):,} images to the {kind} {args.query!r} "
          f"({engine.searcher.note})")
    print(f"{'rank':>4}  {'score':>6}  path")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>6.3f}  {engine.index.root / hit.path}")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------------
# ldmclip serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ldmclip serve``."""
    _add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the default lets only this machine in (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    """Run ``ldmclip serve`` until Ctrl-C."""
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if importlib.util.find_spec("flask") is None:
        raise RuntimeError("ldmclip serve needs Flask: pip install flask")
    serve(_open_engine(args), args.host, args.port)
    return 0
