"""``ldmclip serve``: a small local web page over a search index (Flask).

Routes:

* ``/``                              the page: a search box and a grid of results (``templates/``, ``static/``)
* ``/api/search?q=TEXT&k=N``         text → image search
* ``/api/similar?id=ID&k=N``         images like indexed image ``ID`` (or ``path=REL``, an indexed path)
* ``/api/info``                      the index, the model, exact or approximate search and its recall
* ``/image/ID``, ``/thumb/ID``       the image of index entry ``ID`` (the thumbnail: at most 256 px)

Files are only ever found by index id: a request names no path on disk, so nothing outside the index
can be served. Every bad request gets a 4xx status with a JSON ``{"error": message}``; an unexpected
failure gets a 500 with a message, and the server keeps running.
"""

from __future__ import annotations

import io
import logging
import re
import time
import zlib
from typing import Any

from ..core.formats import name_bytes, name_to_text
from .engine import QueryError, SearchEngine

__all__ = ["create_app", "serve", "MAX_K", "THUMBNAIL_PX"]

MAX_K = 500          # results per request; more would make a page no one scrolls through
DEFAULT_K = 24
THUMBNAIL_PX = 256

logger = logging.getLogger("ldmclip.search")


def create_app(engine: SearchEngine):
    """The Flask application serving ``engine`` (use ``app.test_client()`` in tests)."""
    from flask import Flask, abort, jsonify, render_template, request, send_file
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__)  # templates/ and static/ next to this module (package data)
    app.json.ensure_ascii = False

    class BadRequest(Exception):
        def __init__(self, message: str, status: int = 400) -> None:
            super().__init__(message)
            self.status = status

    def get_k() -> int:
        raw = request.args.get("k", str(DEFAULT_K))
        try:
            k = int(raw)
        except ValueError:
            raise BadRequest(f"k must be a whole number, got {raw[:40]!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be between 1 and {MAX_K}, got {k}")
        return k

    def answer(query: dict[str, Any], search) -> Any:
        started = time.perf_counter()
        hits = search()
        return jsonify({**query, "results": [{**hit.as_dict(), "image": f"/image/{hit.id}",
                                              "thumbnail": f"/thumb/{hit.id}"} for hit in hits],
                        "search": engine.searcher.kind, "ms": round(1000 * (time.perf_counter() - started), 1)})

    def entry_id(raw: str) -> int:
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(f"id must be a whole number, got {raw[:40]!r}") from None

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        return jsonify({"error": str(error)}), error.status

    @app.errorhandler(QueryError)
    def bad_query(error: QueryError):
        return jsonify({"error": str(error)}), 400

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify({"error": error.description or error.name}), error.code

    @app.errorhandler(Exception)
    def unexpected(error: Exception):  # the server stays up; the message says what happened
        logger.exception("request failed")
        return jsonify({"error": f"internal error: {type(error).__name__}: {error}"}), 500

    @app.get("/")
    def page():
        info = engine.info()
        return render_template("search.html", info=info, max_k=MAX_K, default_k=DEFAULT_K)

    @app.get("/api/info")
    def api_info():
        return jsonify(engine.info())

    @app.get("/api/search")
    def api_search():
        query = request.args.get("q")
        if query is None:
            raise BadRequest("missing the query: /api/search?q=a+dog+on+the+beach")
        k = get_k()
        return answer({"query": query, "k": k}, lambda: engine.search_text(query, k))

    @app.get("/api/similar")
    def api_similar():
        k = get_k()
        if "id" in request.args:
            image_id = entry_id(request.args["id"])
        elif "path" in request.args:
            # Only a path the index holds is accepted; it is looked up, never opened.
            found = engine.index.id_of(request.args["path"])
            if found is None:
                raise BadRequest("no such image in the index", 404)
            image_id = found
        else:
            raise BadRequest("missing the image: /api/similar?id=ID (or path=PATH, a path in the index)")
        if not 0 <= image_id < len(engine.index):
            raise BadRequest(f"no image with id {image_id} in the index", 404)
        return answer({"id": image_id, "path": engine.index.paths[image_id], "k": k},
                      lambda: engine.similar(image_id, k))

    def indexed_file(image_id: int):
        if not 0 <= image_id < len(engine.index):
            abort(404, description=f"no image with id {image_id} in the index")
        path = engine.index.file(image_id)
        if not path.is_file():
            abort(404, description=f"image {image_id} ({engine.index.paths[image_id]}) is no longer on disk")
        return path

    @app.get("/image/<int:image_id>")
    def image(image_id: int):
        path = indexed_file(image_id)
        # Any name on disk can be served: the one in the Content-Disposition header is text without control
        # characters (a header refuses a newline), and the ETag is made here from the name's bytes
        # (werkzeug's own encodes the name as UTF-8, which fails for one that is not).
        shown = re.sub(r"[\x00-\x1f\x7f]", "_", name_to_text(path.name))
        try:
            st = path.stat()
        except OSError:  # removed since indexed_file looked
            abort(404, description=f"image {image_id} ({engine.index.paths[image_id]}) is no longer on disk")
        etag = f"{st.st_mtime_ns}-{st.st_size}-{zlib.adler32(name_bytes(path)):08x}"
        return send_file(path, download_name=shown, etag=etag, max_age=3600)

    @app.get("/thumb/<int:image_id>")
    def thumbnail(image_id: int):
        from PIL import Image, ImageOps

        path = indexed_file(image_id)
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEGs decode at reduced size: fast
                img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, "JPEG", quality=85)
        except (OSError, ValueError, Image.DecompressionBombError):
            abort(404, description=f"image {image_id} ({engine.index.paths[image_id]}) cannot be read")
        buffer.seek(0)
        return send_file(buffer, mimetype="image/jpeg", max_age=3600)

    return app


def serve(engine: SearchEngine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page until Ctrl-C, on several threads (thumbnails load in parallel)."""
    from werkzeug.serving import make_server

    server = make_server(host, port, create_app(engine), threaded=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown  # an IPv6 address in a URL needs brackets
    print(f"ldmclip serve: {len(engine.index):,} images, {engine.searcher.note}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}: anyone who can reach this machine can search and see the images")
    print(f"open http://{shown}:{server.port}/ in a browser (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
