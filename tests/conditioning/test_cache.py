"""The text-embedding cache: values equal the conditioner's, deduplication, resuming, crash safety
(SIGKILL at random moments, then a restart, gives byte-identical files), refusing to mix setups, every
kind of bad input, and the reader (random access, Dataset, join with image samples)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ldmclip
from tests.conditioning.conftest import TINY_MODEL, tiny_tower
from ldmclip.cli import main
from ldmclip.conditioning import TextConditioner, TextEmbeddingCache, build_text_cache
from ldmclip.conditioning.cache import CACHE_DTYPES, CacheMismatchError
from ldmclip.data import CaptionTable, Sample

MODEL = TINY_MODEL



def _text_file(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(cond, source, out, **kw):
    kw.setdefault("precision", "fp32")
    return build_text_cache(cond, source, out, **kw)


CAPTIONS = [f"a photo of {n} {thing}" for n in ("one", "two", "three") for thing in ("cat", "dog", "red car")]


# ----------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_cached_values_equal_the_conditioner(tmp_path, sdxl, dtype, tol):
    src = _text_file(tmp_path / "captions.txt", CAPTIONS)
    report = _build(sdxl, src, tmp_path / "cache", dtype=dtype, batch_size=4, shard_size=5)
    assert report.counts["keys"] == len(CAPTIONS) and not report.failed
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert len(cache) == len(CAPTIONS) and set(cache.keys()) == {str(i + 1) for i in range(len(CAPTIONS))}
    with torch.inference_mode():
        ref = sdxl(CAPTIONS)
        empty = sdxl.empty_prompt()
    for i in range(len(CAPTIONS)):
        item = cache[str(i + 1)]
        assert item["hidden"].dtype == CACHE_DTYPES[dtype]
        assert item["hidden"].shape == ref.hidden.shape[1:] and item["pooled"].shape == ref.pooled.shape[1:]
        torch.testing.assert_close(item["hidden"].float(), ref.hidden[i], rtol=tol, atol=tol)
        torch.testing.assert_close(item["pooled"].float(), ref.pooled[i], rtol=tol, atol=tol)
    stored_empty = cache.empty_prompt()
    torch.testing.assert_close(stored_empty["hidden"].float(), empty.hidden[0], rtol=tol, atol=tol)
    torch.testing.assert_close(stored_empty["pooled"].float(), empty.pooled[0], rtol=tol, atol=tol)
    manifest = cache.manifest
    assert manifest["identity"] == json.loads(json.dumps(sdxl.identity()))
    assert manifest["preset"] == "sdxl" and manifest["dtype"] == dtype and manifest["ldmclip_version"]
    assert manifest["hidden_shape"] == list(ref.hidden.shape[1:]) and manifest["pooled_dim"] == ref.pooled.shape[1]
    assert manifest["shards"] == ["captions-00000", "captions-00001"]
    assert manifest["totals"]["keys"] == len(CAPTIONS)
    # batched access
    batch = cache.get_batch(["1", "3"])
    assert batch["hidden"].shape == (2, *ref.hidden.shape[1:])
    assert torch.equal(batch["hidden"][1], cache["3"]["hidden"])


def test_sd2_cache_has_no_pooled(tmp_path, sd2):
    _build(sd2, _text_file(tmp_path / "c.txt", CAPTIONS[:3]), tmp_path / "cache")
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert not cache.has_pooled and set(cache["1"]) == {"hidden"} and set(cache.empty_prompt()) == {"hidden"}
    with safe_open(str(tmp_path / "cache" / "shards" / "c-00000.safetensors"), "pt") as f:
        assert set(f.keys()) == {"hidden"}


def test_identical_captions_are_encoded_once_per_shard(tmp_path, sdxl):
    lines = ["a cat", "a dog", "a cat", "  a cat  ", "a dog", "a bird"]
    report = _build(sdxl, _text_file(tmp_path / "d.txt", lines), tmp_path / "cache", batch_size=2)
    assert report.counts["keys"] == 6 and report.counts["unique"] == 3
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert [cache.location(k)[1] for k in "123456"] == [0, 1, 0, 0, 1, 2]
    with safe_open(str(tmp_path / "cache" / "shards" / "d-00000.safetensors"), "pt") as f:
        assert f.get_slice("hidden").get_shape()[0] == 3
    assert torch.equal(cache["1"]["hidden"], cache["4"]["hidden"])


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def test_table_keys_are_the_caption_table_keys(tmp_path, sdxl):
    csv = tmp_path / "captions.csv"
    csv.write_text("image,caption\na.jpg,a red cat\na.jpg,a small cat\nb.jpg,\nb.jpg,a dog\n", encoding="utf-8")
    report = _build(sdxl, csv, tmp_path / "cache", shard_size=3)
    assert report.counts["skipped"] == {"empty_caption": 1}
    table = CaptionTable(csv)
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert sorted(cache.keys()) == sorted(table.key(i) for i in (0, 1, 3))
    assert cache.location(table.key(3)) == ("captions-00001", 0)


def test_key_column_duplicates_first_wins(tmp_path, sdxl):
    csv = tmp_path / "t.csv"
    csv.write_text("id,caption\nx,first caption\ny,other\nx,second caption\n", encoding="utf-8")
    report = _build(sdxl, csv, tmp_path / "cache", key_column="id")
    assert report.counts["skipped"] == {"duplicate_key": 1}
    cache = TextEmbeddingCache(tmp_path / "cache")
    with torch.inference_mode():
        first = sdxl(["first caption"]).hidden[0]
    torch.testing.assert_close(cache["x"]["hidden"].float(), first, rtol=2e-3, atol=2e-3)


def test_parquet_input(tmp_path, sdxl):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["k1", "k2"], "text": ["a cat", "a dog"]}), tmp_path / "t.parquet")
    _build(sdxl, tmp_path / "t.parquet", tmp_path / "cache", key_column="key", caption_column="text")
    assert sorted(TextEmbeddingCache(tmp_path / "cache").keys()) == ["k1", "k2"]


def test_bad_captions_in_a_text_file(tmp_path, sdxl):
    long = " ".join(["word"] * 200)
    special = "a cat <end_of_text> and <start_of_text> a dog"
    lines = [b"a cat", b"", b"   \t ", b"caf\xe9 \xff", long.encode(), special.encode(), b"x" * 30_000]
    report = _build(sdxl, _text_file(tmp_path / "bad.txt", lines), tmp_path / "cache")
    counts = report.counts
    assert counts["records"] == 7 and counts["keys"] == 4
    assert counts["skipped"] == {"empty_caption": 2, "bad_caption_encoding": 1}
    assert counts["truncated"] == 2 and counts["special_token_text"] == 1
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert sorted(cache.keys()) == ["1", "5", "6", "7"]
    with torch.inference_mode():
        ref = sdxl([long, special])
    # long captions are cut the way the conditioner cuts them; special-token text is encoded as it does
    torch.testing.assert_close(cache["5"]["hidden"].float(), ref.hidden[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cache["6"]["hidden"].float(), ref.hidden[1], rtol=2e-3, atol=2e-3)
    assert cache.manifest["totals"]["skipped"] == {"bad_caption_encoding": 1, "empty_caption": 2}


def test_bad_webdataset_shards(tmp_path, sdxl):
    jpg = b"\xff\xd8\xff not really an image: never read"
    _tar(tmp_path / "00000.tar", [
        ("k1.jpg", jpg), ("k1.txt", b"a cat"),
        ("k2.jpg", jpg),                               # no caption
        ("k3.jpg", jpg), ("k3.txt", b"\xff\xfe bad"),  # not UTF-8
        ("k4.jpg", jpg), ("k4.txt", b"  "),            # whitespace
        ("k5.txt", b"a dog"), ("k5.json", b"{}"),      # caption without image: cached (images are not read)
        ("k1.txt", b"a duplicate key"),                # the same key again, later in the shard
    ])
    good = _tar(tmp_path / "00001.tar", [(f"m{i}.txt", f"caption {i}".encode()) for i in range(4)])
    data = good.read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: 512 * 3 + 100])  # cut in the middle of the 2nd member
    report = _build(sdxl, str(tmp_path / "{00000..00002}.tar"), tmp_path / "cache")
    assert not report.failed
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert cache.shard_names == ["00000", "00001", "00002"]
    assert sorted(k for k in cache if k.startswith("k")) == ["k1", "k5"]
    assert cache.location("m0") == ("00001", 0)
    skipped = report.counts["skipped"]
    assert skipped == {"missing_caption": 1, "bad_caption_encoding": 1, "empty_caption": 1, "duplicate_key": 1,
                       "truncated_shard": 1}
    with torch.inference_mode():
        ref = sdxl(["a cat"]).hidden[0]
    torch.testing.assert_close(cache["k1"]["hidden"].float(), ref, rtol=2e-3, atol=2e-3)  # the first k1 won
    # the truncated shard keeps its complete samples
    with safe_open(str(tmp_path / "cache" / "shards" / "00002.safetensors"), "pt") as f:
        kept = json.loads(f.metadata()["ldmclip"])["keys"]
    assert kept == ["m0"]


def test_an_unreadable_shard_is_left_for_a_rerun(tmp_path, sdxl):
    _tar(tmp_path / "00000.tar", [("a.txt", b"a cat")])
    source = [str(tmp_path / "00000.tar"), f"pipe:cat {tmp_path / 'late.tar'}"]
    report = _build(sdxl, source, tmp_path / "cache")
    assert list(report.failed) == ["late"] and report.written == ["00000"]
    assert "rerun" in report.summary()
    _tar(tmp_path / "late.tar", [("b.txt", b"a dog")])
    report = _build(sdxl, source, tmp_path / "cache")
    assert report.written == ["late"] and report.already_done == ["00000"] and not report.failed
    assert sorted(TextEmbeddingCache(tmp_path / "cache").keys()) == ["a", "b"]


@pytest.mark.parametrize("bad", ["zero-bytes", "random-bytes", "cut-in-first-member"])
def test_a_shard_that_fails_as_a_whole_is_retried_and_ends_in_the_same_cache(tmp_path, sd2, bad):
    def shard(folder: Path, name: str, n: int) -> Path:
        folder.mkdir(exist_ok=True)
        return _tar(folder / f"{name}.tar", [(f"{name}-{i}.txt", f"caption {name} {i}".encode()) for i in range(n)])

    good, broken = tmp_path / "good", tmp_path / "broken"
    for name in ("00000", "00001"):
        shard(good, name, 3)
    shard(broken, "00000", 3)
    damaged = {"zero-bytes": b"", "random-bytes": random.Random(0).randbytes(3000),
               "cut-in-first-member": (good / "00001.tar").read_bytes()[:300]}[bad]
    (broken / "00001.tar").write_bytes(damaged)
    out = tmp_path / "cache"
    report = _build(sd2, str(broken / "{00000..00001}.tar"), out)
    assert report.written == ["00000"] and list(report.failed) == ["00001"]
    assert not (out / "shards" / "00001.safetensors").exists()  # nothing recorded as done: a rerun retries it
    assert "rerun" in report.summary()
    again = _build(sd2, str(broken / "{00000..00001}.tar"), out)  # still broken: still not cached
    assert again.written == [] and list(again.failed) == ["00001"]
    (broken / "00001.tar").write_bytes((good / "00001.tar").read_bytes())  # the shard is fixed
    fixed = _build(sd2, str(broken / "{00000..00001}.tar"), out)
    assert fixed.written == ["00001"] and fixed.already_done == ["00000"] and not fixed.failed
    _build(sd2, str(good / "{00000..00001}.tar"), tmp_path / "uninterrupted")
    assert _tree(out) == _tree(tmp_path / "uninterrupted")


# ----------------------------------------------------------------------------------------------------
# resuming, crash safety, refusing to mix
# ----------------------------------------------------------------------------------------------------

def test_resume_skips_finished_shards_and_rebuilds_missing_ones_identically(tmp_path, sdxl):
    src = _text_file(tmp_path / "r.txt", CAPTIONS)
    out = tmp_path / "cache"
    first = _build(sdxl, src, out, shard_size=3)
    assert first.written == ["r-00000", "r-00001", "r-00002"]
    before = _tree(out)
    again = _build(sdxl, src, out, shard_size=3)
    assert again.written == [] and again.already_done == first.written and _tree(out) == before
    (out / "shards" / "r-00001.safetensors").unlink()
    (out / "shards" / ".r-00002.safetensors.tmp").write_bytes(b"half a file")  # what a SIGKILL leaves
    third = _build(sdxl, src, out, shard_size=3)
    assert third.written == ["r-00001"]
    assert _tree(out) == before


def test_an_interrupted_write_leaves_no_visible_shard(tmp_path, sdxl, monkeypatch):
    from ldmclip.core.files import atomic_write
    from ldmclip.data.store import ChunkStore

    src = _text_file(tmp_path / "i.txt", CAPTIONS)
    reference = tmp_path / "reference"
    _build(sdxl, src, reference, shard_size=3)
    real = ChunkStore.write_tensors
    calls = []

    def crash_on_second_shard(store, path, tensors, meta):
        calls.append(path.name)
        if len(calls) == 3:  # empty prompt, shard 0, then die while writing shard 1
            def write_half(temp):
                temp.write_bytes(b"partial")
                raise KeyboardInterrupt
            atomic_write(path, write_half)
        real(store, path, tensors, meta)

    monkeypatch.setattr(ChunkStore, "write_tensors", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(sdxl, src, tmp_path / "cache", shard_size=3)
    monkeypatch.setattr(ChunkStore, "write_tensors", real)
    assert calls == ["empty_prompt.safetensors", "i-00000.safetensors", "i-00001.safetensors"]
    files = _tree(tmp_path / "cache")
    assert sorted(files) == ["empty_prompt.safetensors", "manifest.json", "shards/i-00000.safetensors"]
    assert TextEmbeddingCache(tmp_path / "cache").keys() == {"1", "2", "3"}
    _build(sdxl, src, tmp_path / "cache", shard_size=3)
    assert _tree(tmp_path / "cache") == _tree(reference)


def test_refuses_to_mix_presets_models_dtypes_and_inputs(tmp_path, sdxl, sd2):
    src = _text_file(tmp_path / "m.txt", CAPTIONS[:4])
    out = tmp_path / "cache"
    _build(sdxl, src, out, shard_size=2)
    with pytest.raises(CacheMismatchError, match="preset"):
        _build(sd2, src, out, shard_size=2)
    with pytest.raises(CacheMismatchError, match="dtype"):
        _build(sdxl, src, out, shard_size=2, dtype="bf16")
    tok = ldmclip.get_tokenizer(MODEL)
    other = TextConditioner.from_preset("sdxl", tiny_tower(1), tok, model_2=tiny_tower(3), tokenizer_2=tok).eval()
    with pytest.raises(CacheMismatchError, match="towers"):
        _build(other, src, out, shard_size=2)
    with pytest.raises(CacheMismatchError, match="shard-size"):
        _build(sdxl, src, out, shard_size=3)
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        _build(sdxl, src, tmp_path / "unrelated")
    # nothing was changed by the refused runs
    assert TextEmbeddingCache(out).manifest["dtype"] == "fp16" and len(TextEmbeddingCache(out)) == 4


def test_ranks_split_the_shards_and_make_the_same_cache(tmp_path, sdxl):
    src = _text_file(tmp_path / "p.txt", CAPTIONS)
    _build(sdxl, src, tmp_path / "single", shard_size=2)
    # Rank 1 of 2 runs once rank 0 has prepared the folder (what the first barrier ensures); rank 0
    # rewrites the manifest after both are done (the second barrier).
    barriers = []

    def barrier():
        barriers.append(1)
        if len(barriers) == 1:
            _build(sdxl, src, tmp_path / "multi", shard_size=2, rank=1, world_size=2, barrier=lambda: None)

    rank0 = _build(sdxl, src, tmp_path / "multi", shard_size=2, rank=0, world_size=2, barrier=barrier)
    assert len(barriers) == 2
    assert rank0.written == ["p-00000", "p-00002", "p-00004"] and rank0.other_ranks == 2
    assert _tree(tmp_path / "multi") == _tree(tmp_path / "single")


# ----------------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------------

def test_dataset_and_dataloader(tmp_path, sdxl):
    _build(sdxl, _text_file(tmp_path / "l.txt", CAPTIONS), tmp_path / "cache", shard_size=4)
    cache = TextEmbeddingCache(tmp_path / "cache")
    dataset = cache.dataset()
    assert len(dataset) == len(CAPTIONS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 1]
    assert batches[0]["hidden"].shape == (4, *cache["1"]["hidden"].shape)
    assert torch.equal(batches[2]["hidden"][0], cache[batches[2]["key"][0]]["hidden"])
    assert "key" not in cache.empty_prompt()
    with pytest.raises(KeyError):
        cache["no such key"]


def test_join_adds_embeddings_to_image_samples(tmp_path, sdxl):
    _build(sdxl, _text_file(tmp_path / "j.txt", CAPTIONS[:3]), tmp_path / "cache")
    cache = TextEmbeddingCache(tmp_path / "cache")
    image = torch.zeros(3, 8, 8)
    samples = [Sample(image, "a", "1"), None, {"__key__": "2", "jpg": image}, Sample(image, "b", "404"),
               Sample(image, "c", "3")]
    joined = cache.join(samples)
    out = list(joined)
    assert [o.get("key", o.get("__key__")) for o in out] == ["1", "2", "3"]
    assert set(out[0]) == {"key", "image", "caption", "hidden", "pooled"}
    assert set(out[1]) == {"__key__", "jpg", "hidden", "pooled"}
    assert torch.equal(out[2]["hidden"], cache["3"]["hidden"])
    assert joined.stats == {"joined": 3, "missing_key": 1, "bad_sample": 1}
    with_empty = cache.join(samples, missing="empty")
    out = list(with_empty)
    assert torch.equal(out[2]["hidden"], cache.empty_prompt()["hidden"]) and with_empty.stats["empty_prompt"] == 1
    only_tuples = [s for s in samples if isinstance(s, Sample)]
    batch = torch.utils.data.default_collate(list(cache.join(only_tuples)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["hidden"].shape[0] == 2
    with pytest.raises(KeyError, match="404"):
        list(cache.join(samples, missing="error"))


def test_a_folder_as_input_is_a_clear_error(tmp_path, sd2):
    from ldmclip.core.errors import UserError

    (tmp_path / "shards").mkdir()
    with pytest.raises(UserError, match=r"is a folder: give its webdataset shards"):
        _build(sd2, tmp_path / "shards", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextEmbeddingCache(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="cache-text"):
        TextEmbeddingCache(tmp_path)


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------

CLI = ["--preset", "sdxl", "--model", MODEL, "--model-2", MODEL, "--precision", "fp32", "--quiet"]


def test_cli_needs_weights_or_random_init(tmp_path, capsys):
    src = _text_file(tmp_path / "c.txt", CAPTIONS[:2])
    assert main(["cache-text", str(src), "--out", str(tmp_path / "cache"), *CLI]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert main(["cache-text", str(src), "--out", str(tmp_path / "cache"), *CLI, "--random-init"]) == 0
    out = capsys.readouterr().out
    assert "captions 2 read, 2 cached, 2 unique" in out and "cache: 1 shard(s), 2 keys" in out
    assert len(TextEmbeddingCache(tmp_path / "cache")) == 2


@pytest.mark.parametrize("preset, second", [("sd3", True), ("flux", False)])
def test_cli_caches_the_sd3_and_flux_presets(tmp_path, capsys, preset, second):
    src = _text_file(tmp_path / "c.txt", CAPTIONS[:2])
    options = ["--preset", preset, "--model", MODEL, *(["--model-2", MODEL] if second else []),
               "--precision", "fp32", "--quiet", "--random-init"]
    assert main(["cache-text", str(src), "--out", str(tmp_path / "cache"), *options]) == 0
    torch.manual_seed(0)  # what --random-init builds
    cond = TextConditioner.from_pretrained(preset, MODEL, model_2=MODEL if second else None)
    with torch.inference_mode():
        ref = cond(CAPTIONS[:2])
    cache = TextEmbeddingCache(tmp_path / "cache")
    # sd3: both towers' pooled projections (64 + 64); flux: the unprojected pooled state (width 64)
    assert cache.preset == preset and cache.manifest["pooled_dim"] == (128 if second else 64) == ref.pooled.shape[1]
    assert cache.manifest["identity"] == json.loads(json.dumps(cond.identity()))
    for i in range(2):
        torch.testing.assert_close(cache[str(i + 1)]["pooled"].float(), ref.pooled[i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(cache[str(i + 1)]["hidden"].float(), ref.hidden[i], rtol=2e-3, atol=2e-3)
    if not second:
        capsys.readouterr()
        assert main(["cache-text", str(src), "--out", str(tmp_path / "other"), *options, "--model-2", MODEL]) == 2
        assert "two-encoder presets (sdxl and sd3), not flux" in capsys.readouterr().err


KILL_CLI = ["--preset", "sd2", "--model", MODEL, "--precision", "fp32", "--quiet", "--random-init",
            "--shard-size", "2", "--batch-size", "2"]


def _one_thread_main(argv: list[str]) -> int:
    """``ldmclip ...`` in this process with one thread, like the subprocesses (OMP_NUM_THREADS=1), so
    that both compute with the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_gives_an_identical_cache(tmp_path):
    # 20 shards of 10 captions: each shard takes several milliseconds, so a kill after at most 14 shards
    # lands while work is left (with 2-caption shards the last run could finish before its SIGKILL)
    cli = [*KILL_CLI, "--shard-size", "10"]  # (the last --shard-size wins)
    captions = [f"caption number {i} of a {['cat', 'dog', 'car'][i % 3]}" for i in range(200)]
    src = _text_file(tmp_path / "k.txt", captions)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert _one_thread_main(["cache-text", str(src), "--out", str(reference), *cli]) == 0
    assert len(list((reference / "shards").iterdir())) == 20

    rng = random.Random(1234)
    kills, seen = 0, []
    shards = out / "shards"
    for _ in range(3):
        done = len(list(shards.glob("*.safetensors"))) if shards.is_dir() else 0
        target = rng.randint(done, min(done + 7, 14))  # kill after this many shards, at a random moment
        command = [sys.executable, "-m", "ldmclip", "cache-text", str(src), "--out", str(out), *cli]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and \
                (not shards.is_dir() or len(list(shards.glob("*.safetensors"))) < target):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))  # somewhere inside the next shard's encoding or writing
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        seen.append(len(list(shards.glob("*.safetensors"))))
        # whatever is visible is complete: the manifest parses, every shard opens with its index
        if (out / "manifest.json").exists():
            cache = TextEmbeddingCache(out)
            for key in cache:
                cache[key]
    assert kills >= 2 and seen[-1] < 20, f"the runs finished before they could be killed ({seen} shards)"
    assert _one_thread_main(["cache-text", str(src), "--out", str(out), *cli]) == 0
    assert _tree(out) == _tree(reference)


@pytest.mark.slow
def test_torchrun_with_two_ranks_makes_the_same_cache(tmp_path):
    src = _text_file(tmp_path / "t.txt", CAPTIONS)
    assert _one_thread_main(["cache-text", str(src), "--out", str(tmp_path / "single"), *KILL_CLI]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldmclip", "cache-text", str(src), "--out", str(tmp_path / "ranks"), *KILL_CLI]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1] wrote 2 shard(s)" in done.stdout and "[rank 0] wrote 3 shard(s)" in done.stdout
    assert _tree(tmp_path / "ranks") == _tree(tmp_path / "single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_srun_alone_splits_the_inputs_across_ranks(tmp_path):
    """Under SLURM's variables alone (srun, no torchrun), each process is its own rank: the ranks share
    the input chunks and together make the single-process cache (issue 12: each encoded everything)."""
    src = _text_file(tmp_path / "s.txt", CAPTIONS)  # 9 captions, 5 chunks of 2: ranks 0 and 1 get 0,2,4 / 1,3
    assert _one_thread_main(["cache-text", str(src), "--out", str(tmp_path / "single"), *KILL_CLI]) == 0
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "TORCHELASTIC_RUN_ID")
    base = {k: v for k, v in os.environ.items() if k not in torchrun and not k.startswith("SLURM")}
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1",
                MASTER_PORT=str(_free_port()))
    command = [sys.executable, "-m", "ldmclip", "cache-text", str(src), "--out", str(tmp_path / "ranks"), *KILL_CLI]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
                 for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    # each rank read and encoded only its own chunks: together every caption once, no chunk twice
    assert "[rank 0] wrote 3 shard(s)" in outputs[0][0] and "captions 5 read, 5 cached" in outputs[0][0]
    assert "[rank 1] wrote 2 shard(s)" in outputs[1][0] and "captions 4 read, 4 cached" in outputs[1][0]
    assert "on 2 ranks" in outputs[0][1]
    assert _tree(tmp_path / "ranks") == _tree(tmp_path / "single")
