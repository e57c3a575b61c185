"""The web server's JSON API and files, through Flask's test client: results, bad requests, traversal."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

pytest.importorskip("flask")

from ldmclip.core.formats import name_to_text  # noqa: E402
from ldmclip.search import SearchEngine  # noqa: E402
from ldmclip.search.server import create_app  # noqa: E402

from .conftest import add_odd_names, build, make_images  # noqa: E402


@pytest.fixture(scope="module")
def engine(built_index, tmp_path_factory) -> SearchEngine:
    # A private copy of the images: one test deletes a file.
    images = shutil.copytree(built_index.parent / "images", tmp_path_factory.mktemp("served") / "images")
    return SearchEngine.open(built_index, images=images)


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine)
    app.testing = False  # errors must be answered the way a real server answers them
    return app.test_client()


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and b'id="query"' in page.data and b"8 images" in page.data
    assert client.get("/static/search.js").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["images"] == 8 and info["search"] == "exact"


def test_search_and_similar(client, engine):
    data = client.get("/api/search", query_string={"q": "a green disc", "k": 4}).get_json()
    assert data["query"] == "a green disc" and len(data["results"]) == 4
    assert [r["id"] for r in data["results"]] == [h.id for h in engine.search_text("a green disc", 4)]
    first = data["results"][0]
    assert first["image"] == f"/image/{first['id']}" and first["thumbnail"] == f"/thumb/{first['id']}"
    similar = client.get(f"/api/similar?id={first['id']}&k=3").get_json()
    assert similar["results"][0]["id"] == first["id"] and similar["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    by_path = client.get("/api/similar", query_string={"path": first["path"], "k": 3}).get_json()
    assert by_path["results"] == similar["results"]
    assert len(client.get("/api/search?q=disc&k=500").get_json()["results"]) == 8  # k above the index size


def test_images_are_served_by_index_id_only(client, engine):
    response = client.get("/image/2")
    assert response.status_code == 200 and response.data == engine.index.file(2).read_bytes()
    thumb = client.get("/thumb/2")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.data)).size[0] <= 256
    secret = engine.index.root.parent / "secret.txt"
    secret.write_text("top secret")
    for url in ["/image/8", "/image/-1", "/image/99999999999999999999", "/image/red/0.png", "/image/../secret.txt",
                "/image/..%2fsecret.txt", "/image/%2e%2e/secret.txt", "/thumb/8", "/thumb/abc",
                "/static/../search/index.py", "/static/..%2f..%2fcli.py", "/static/%2e%2e/%2e%2e/secret.txt",
                "/../secret.txt", "/api/similar?path=../secret.txt", "/api/similar?path=/etc/passwd"]:
        response = client.get(url)
        assert response.status_code in (400, 404), url
        assert b"top secret" not in response.data and b"import" not in response.data, url
        assert response.is_json and response.get_json()["error"], url


@pytest.mark.parametrize("url, status, message", [
    ("/api/search", 400, "missing the query"),
    ("/api/search?q=", 400, "empty"),
    ("/api/search?q=%20%20", 400, "empty"),
    ("/api/search?q=%01%02", 400, "no words the tokenizer can read"),
    ("/api/search?q=" + "a" * 3000, 400, "characters long"),
    ("/api/search?q=dog&k=ten", 400, "k must be a whole number"),
    ("/api/search?q=dog&k=0", 400, "k must be between 1 and 500"),
    ("/api/search?q=dog&k=100000", 400, "k must be between 1 and 500"),
    ("/api/search?q=%ff%fe", 200, None),  # invalid UTF-8 arrives as U+FFFD, which CLIP's BPE encodes as bytes
    ("/api/similar", 400, "missing the image"),
    ("/api/similar?id=x", 400, "id must be a whole number"),
    ("/api/similar?id=-3", 404, "no image with id -3"),
    ("/api/similar?id=8", 404, "no image with id 8"),
    ("/api/similar?path=nope.png", 404, "no such image"),
    ("/api/nothing", 404, ""),
])
def test_bad_requests_get_a_message_not_a_crash(client, url, status, message):
    response = client.get(url)
    assert response.status_code == status
    if message is not None:
        assert message in response.get_json()["error"]


def test_wrong_method_and_unexpected_errors_answer_json(client, engine, monkeypatch):
    assert client.post("/api/search?q=dog").status_code == 405

    def broken(query, k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "search_text", broken)
    response = client.get("/api/search?q=dog")
    assert response.status_code == 500 and "disk on fire" in response.get_json()["error"]
    monkeypatch.undo()
    assert client.get("/api/search?q=dog").status_code == 200  # still serving


def test_an_image_removed_from_disk_is_a_404(client, engine):
    engine.index.file(7).unlink()
    for url in ("/image/7", "/thumb/7"):
        response = client.get(url)
        assert response.status_code == 404 and "no longer on disk" in response.get_json()["error"]


def test_serve_command_listens_on_localhost_and_answers(built_index):
    import json
    import re
    import subprocess
    import sys
    import urllib.request

    process = subprocess.Popen([sys.executable, "-m", "ldmclip", "serve", str(built_index), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:  # the model loads first; the URL line comes when it listens
            lines.append(line)
            if "open http" in line:
                break
        url = re.search(r"http://127\.0\.0\.1:\d+/", "".join(lines))
        assert url, "".join(lines)
        assert "8 images, exact search" in "".join(lines)
        with urllib.request.urlopen(url.group(0) + "api/search?q=a%20red%20disc&k=2", timeout=30) as response:
            assert len(json.load(response)["results"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_files_with_a_newline_or_a_non_utf8_name_are_served(tmp_path, model_name):
    """``/image/ID`` once answered 500 for these (a newline in a header; werkzeug's ETag encodes the name
    as UTF-8). The JSON shows the names as text (``\\xNN`` for a byte that is not UTF-8)."""
    images = make_images(tmp_path / "images", per_colour=1)
    odd = add_odd_names(images)
    build(model_name, images, tmp_path / "index")
    engine = SearchEngine.open(tmp_path / "index")
    app = create_app(engine)
    app.testing = False
    client = app.test_client()
    paths = [r["path"] for r in client.get("/api/search?q=a+disc&k=10").get_json()["results"]]
    assert sorted(paths) == sorted(engine.index.paths) and "red/caf\\xe9.png" in paths and "green/new\nline.png" in paths
    for name in odd:
        image_id = engine.index.id_of(name_to_text(name))
        response = client.get(f"/image/{image_id}")
        assert response.status_code == 200 and response.data == (images / name).read_bytes()
        assert response.mimetype == "image/png" and "\n" not in response.headers["Content-Disposition"]
        assert client.get(f"/image/{image_id}", headers={"If-None-Match": response.headers["ETag"]}).status_code == 304
        assert client.get(f"/thumb/{image_id}").status_code == 200
        similar = client.get("/api/similar", query_string={"path": name_to_text(name), "k": 1}).get_json()
        assert similar["id"] == image_id and similar["path"] == name_to_text(name)  # the copy ties with its source


def test_an_image_root_whose_name_is_not_utf8_is_shown_as_text(tmp_path, model_name):
    import os

    images = make_images(tmp_path / os.fsdecode(b"photos-\xe9t\xe9"), per_colour=1)
    build(model_name, images, tmp_path / "index")
    client = create_app(SearchEngine.open(tmp_path / "index")).test_client()
    info = client.get("/api/info")
    assert info.status_code == 200
    assert info.get_json()["image_root"].endswith("photos-\\xe9t\\xe9")
