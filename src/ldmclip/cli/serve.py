"""``ldmclip serve``: a local web page (and a JSON API) to search an index."""

from __future__ import annotations

import argparse
import importlib.util

from ..core.errors import UserError
from .search import add_engine_arguments, open_engine

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run"]

HELP = "a local web page to search an index"
DESCRIPTION = ("Serve a small web page (and a JSON API) to search an index: a search box, a grid of results with "
               "scores; click a result to find similar images. Listens on 127.0.0.1 by default.")
EPILOG = """examples:
  ldmclip serve photos.index                       then open http://127.0.0.1:8000/
  ldmclip serve photos.index --port 8080 --search approximate

JSON API: /api/search?q=TEXT&k=N, /api/similar?id=ID&k=N, /api/info; images: /image/ID, /thumb/ID.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1 lets only this machine in)")
    parser.add_argument("--port", type=int, default=8000, help="port")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if importlib.util.find_spec("flask") is None:
        raise UserError("ldmclip serve needs Flask: pip install flask")
    from ..search.server import serve

    serve(open_engine(args), args.host, args.port)
    return 0
