"""Issue 13's bad-input corpus (tests/corpus/corpus.py) through every command that reads user data,
each in a subprocess with a timeout: a hang fails the test instead of blocking the suite. Each test
asserts the exit status, the counts by reason the command reports, and that every good sample is used."""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import MODEL
from .corpus import NEWLINE_NAME, NON_UTF8_NAME, caption_of

SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT = 120  # seconds; each command takes 5-15 s here on a 2-core CPU


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    # the default 64 MiB image limit: the corpus's 100 MiB sparse file must be too_large
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "LDMCLIP_MAX_IMAGE_MB": ""}


def ldmclip(*args: str | os.PathLike, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``ldmclip ARGS`` in a fresh process; a run past ``timeout`` fails the test as a hang."""
    cmd = [sys.executable, "-m", "ldmclip", *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: `ldmclip {args[0]}` did not end within {timeout} s on the corpus")


def _ok(proc: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert proc.returncode == rc, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- index


@pytest.fixture(scope="module")
def index(corpus, saved_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    proc = ldmclip("index", corpus.images, "--out", out, "--model", saved_model, "--workers", "0",
                   "--batch-size", "4", "--quiet")
    _ok(proc)
    reasons = dict(r.split(" ") for r in proc.stdout.split("unreadable file(s): ")[1].splitlines()[0].split(", "))
    assert {r: int(n) for r, n in reasons.items()} == corpus.image_reasons
    # a rerun (which once failed on every try on a non-UTF-8 name) keeps what the first run made
    again = ldmclip("index", corpus.images, "--out", out, "--model", saved_model, "--workers", "0",
                    "--batch-size", "4", "--quiet")
    _ok(again)
    good = len(corpus.good_image_names)
    assert f"{good} of {good + sum(corpus.image_reasons.values())} images indexed" in again.stdout
    assert re.search(r"(\d+) chunk\(s\), \1 kept from an earlier run", again.stdout), again.stdout  # all chunks
    return out


def test_index_holds_exactly_the_good_images(corpus, index):
    from ldmclip.core.formats import name_to_text
    from ldmclip.search.index import SearchIndex

    loaded = SearchIndex.load(index)
    assert sorted(loaded.paths) == sorted(name_to_text(n) for n in corpus.good_image_names)
    for i in range(len(loaded)):  # each entry names the file it was made from, odd names included
        assert loaded.file(i).is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_serve_answers_search_and_images_with_odd_names(corpus, index, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ldmclip", "serve", str(index), "--port", str(port), "--device", "cpu"]
    log = open(tmp_path / "serve.log", "w+")  # a file, not a pipe: request logs can never fill it and block
    server = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = json.loads(_get(f"{base}/api/info"))
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not come up within 60 s:\n{(tmp_path / 'serve.log').read_text()}")
                time.sleep(0.3)
        assert info["images"] == len(corpus.good_image_names)
        assert info["skipped"] == corpus.image_reasons
        hits = json.loads(_get(f"{base}/api/search?" + urllib.parse.urlencode({"q": "a photo", "k": 50})))["results"]
        assert len(hits) == len(corpus.good_image_names)
        by_path = {hit["path"]: hit for hit in hits}
        for name in (NON_UTF8_NAME, NEWLINE_NAME, "cmyk.jpg"):
            from ldmclip.core.formats import name_to_text

            hit = by_path[name_to_text(name)]
            assert _get(base + hit["image"]) == (corpus.images / name).read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


# ----------------------------------------------------------------------------------------------- pack


def _shard_samples(folder: Path) -> dict[str, str]:
    """caption -> the source image named in the sample's JSON, over every shard pack wrote."""
    members: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                members[key][ext] = tar.extractfile(member).read()
    return {parts["txt"].decode(): json.loads(parts["json"])["image"] for parts in members.values()}


def test_pack_table_writes_exactly_the_good_rows(corpus, tmp_path):
    proc = ldmclip("pack", corpus.table, "--images", corpus.images, "--out", tmp_path / "out", "--workers", "0",
                   "--quiet")
    _ok(proc)
    expected = collections.Counter(corpus.table_reasons)
    # pack stores images without resizing them: a 1x20000 PNG is a valid 20,000-pixel image there
    # (training refuses it at its resized size); the large-header PNG is refused by both.
    expected["decompression_bomb"] -= 1
    captions = _shard_samples(tmp_path / "out")
    assert set(captions) == {*corpus.table_good.values(), "caption of bomb_1x20000.png"}
    line = next(line for line in proc.stdout.splitlines() if line.startswith("skipped "))
    counts = {r: int(n) for r, n in (item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))}
    assert counts == +expected


def test_pack_folder_writes_every_good_image_with_its_sidecar(corpus, tmp_path):
    proc = ldmclip("pack", corpus.images, "--out", tmp_path / "out", "--workers", "0", "--quiet")
    _ok(proc)
    from ldmclip.core.formats import name_to_text

    captions = _shard_samples(tmp_path / "out")
    used = [*corpus.good_image_names, "bomb_1x20000.png"]
    # each sample is its own image with its own caption; odd names are written as text (name_to_text)
    assert captions == {caption_of(n): name_to_text(n) for n in used}
    expected = collections.Counter(corpus.image_reasons)
    expected["decompression_bomb"] -= 1
    line = next(line for line in proc.stdout.splitlines() if line.startswith("skipped "))
    counts = {r: int(n) for r, n in (item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))}
    assert counts == +expected


# ----------------------------------------------------------------------------------------------- eval


def test_eval_zeroshot_and_retrieval_count_by_reason_and_use_every_good_image(corpus, saved_model, tmp_path):
    out = tmp_path / "eval.json"
    proc = ldmclip("eval", "--model", saved_model, "--zeroshot", corpus.classes, "--retrieval", corpus.table,
                   "--images", corpus.images, "--workers", "0", "--batch-size", "4", "--quiet", "--json", out)
    _ok(proc)
    result = json.loads(out.read_text())
    zs = result["zeroshot"]
    # dog/uplink -> .. is not followed: each image is counted once, under its own class
    assert zs["num_images"] == sum(len(v) for v in corpus.class_images.values())
    assert zs["num_classes"] == len(corpus.class_images)
    from ldmclip.core.formats import name_to_text

    assert set(zs["per_class_accuracy"]) == {name_to_text(c) for c in corpus.class_images}
    assert zs["excluded_classes"]["names"] == ["broken"]
    assert zs["skipped"]["reasons"] == corpus.class_reasons
    rows = [sum(row) for row in zs["confusion_matrix"]]
    assert rows == [len(corpus.class_images[c]) for c in sorted(corpus.class_images)]
    rt = result["retrieval"]
    assert rt["num_images"] == rt["num_captions"] == len(corpus.table_good)
    image_reasons = {r: n for r, n in corpus.table_reasons.items() if "caption" not in r}
    assert rt["skipped"]["reasons"] == image_reasons
    # rows whose caption is unusable are left out before any image is read, counted by their reason
    assert rt["captions_skipped"] == {r: n for r, n in corpus.table_reasons.items() if "caption" in r}


def test_eval_retrieval_on_shards(corpus, saved_model, tmp_path):
    out = tmp_path / "eval.json"
    proc = ldmclip("eval", "--model", saved_model, "--retrieval", corpus.shard_pattern, "--workers", "0",
                   "--quiet", "--json", out)
    _ok(proc)
    rt = json.loads(out.read_text())["retrieval"]
    assert rt["num_images"] == len(corpus.shard_good)
    assert rt["skipped"]["reasons"] == {**corpus.shard_reasons, "truncated_shard": len(corpus.bad_shards)}


# ---------------------------------------------------------------------------------------------- train


def _train(tmp_path: Path, *args: str | os.PathLike, workers: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "run"
    proc = ldmclip("train", "--model", MODEL, "--workers", str(workers), "--eval-every", "0", "--save-every", "0",
                   "--quiet", "--out", out, *args)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return proc, summary


def test_train_on_the_table_uses_every_good_row(corpus, tmp_path):
    rows = sum(corpus.table_reasons.values()) + len(corpus.table_good)
    # one batch of every row: each bad row is counted once, each good one trained on. One worker
    # process (the default): the FIFO is met there, and the counts travel back from it.
    proc, summary = _train(tmp_path, "--data", corpus.table, "--images", corpus.images, "--steps", "1",
                           "--batch-size", str(rows), workers=1)
    _ok(proc)
    assert summary["steps"] == 1
    assert summary["samples"] == len(corpus.table_good)
    assert summary["skipped"] == corpus.table_reasons


def test_train_on_the_shards_trains_past_the_bad_ones(corpus, tmp_path):
    proc, summary = _train(tmp_path, "--data", corpus.shard_pattern, "--steps", "2", "--batch-size", "4")
    _ok(proc)
    # a batch of 4 samples holds fewer good ones where bad ones fell in it; a step needs 2
    assert summary["steps"] == 2 and 4 <= summary["samples"] <= 8
    # resampled shards are read again and again: every reason is one the corpus holds
    assert set(summary["skipped"]) <= {*corpus.shard_reasons, "truncated_shard"}
    assert summary["skipped"].get("truncated_shard", 0) >= 1


def test_train_on_only_bad_shards_stops_naming_them(corpus, tmp_path):
    bad = str(corpus.shards / "{00001..00003}.tar")
    proc, _ = _train(tmp_path, "--data", bad, "--steps", "2", "--batch-size", "4")
    _ok(proc, rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldmclip train: error:"), proc.stderr
    assert all(name.removesuffix(".tar") in lines[0] for name in corpus.bad_shards), lines[0]


# ----------------------------------------------------------------------------------------- cache-text


def _cache_text(source, out: Path) -> subprocess.CompletedProcess:
    return ldmclip("cache-text", source, "--preset", "sd1", "--model", MODEL, "--random-init", "--out", out,
                   "--batch-size", "4", "--quiet")


def test_cache_text_on_shards_caches_every_good_caption_and_leaves_bad_shards_for_a_rerun(corpus, tmp_path):
    from ldmclip.conditioning.cache_reader import TextEmbeddingCache

    out = tmp_path / "cache"
    proc = _cache_text(corpus.shard_pattern, out)
    _ok(proc, rc=1)  # not all done: the exit status says so
    assert sorted(TextEmbeddingCache(out)) == sorted(corpus.shard_captions)
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    caption_reasons = {r: n for r, n in corpus.shard_reasons.items() if r in
                       ("missing_caption", "empty_caption", "duplicate_key")}
    assert totals["skipped"] == caption_reasons
    for name in corpus.bad_shards:
        assert name.removesuffix(".tar") in proc.stdout
    assert "rerun the same command to retry them" in proc.stdout


def test_cache_text_on_a_caption_file(corpus, tmp_path):
    from ldmclip.conditioning.cache_reader import TextEmbeddingCache

    out = tmp_path / "cache"
    _ok(_cache_text(corpus.captions_txt, out))
    cache = TextEmbeddingCache(out)
    lines = corpus.captions_txt.read_text().splitlines()
    assert sorted(lines[int(key) - 1] for key in cache) == sorted(corpus.text_good)
    assert json.loads((out / "manifest.json").read_text())["totals"]["skipped"] == corpus.text_reasons
