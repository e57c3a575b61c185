"""The shard writer and `ldmclip pack`: round trips, re-encoding, verification, atomic shards."""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from ldmclip.cli.pack import add_arguments as add_pack_arguments
from ldmclip.cli.pack import run as run_pack
from ldmclip.core.formats import text_to_name
from ldmclip.data import SampleStats, ShardDataset, dataset_size, write_shards

from .test_samples import bad_images, encode, good_images, rgb_image


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _pack(*argv):
    parser = argparse.ArgumentParser()
    add_pack_arguments(parser)
    return run_pack(parser.parse_args([str(a) for a in argv]))


def test_pack_csv_round_trip(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rows, jpeg_bytes = [], {}
    for i in range(7):
        name = f"img{i}.jpg"
        jpeg_bytes[name] = encode(rgb_image(seed=i), "JPEG", quality=80)
        (images / name).write_bytes(jpeg_bytes[name])
        rows.append((name, f"caption number {i}, with \u00fcnicode"))
    rows.append(("img0.jpg", "a second caption for image 0"))
    rows.append(("missing.jpg", "this file does not exist"))
    rows.append(("img1.jpg", ""))
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])

    out = tmp_path / "shards"
    assert _pack(table, out, "--image-root", images, "--per-shard", 3, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "wrote 8 samples in 3 shard(s)" in printed
    assert "skipped 2 sample(s): " in printed and "missing_file 1" in printed and "empty_caption 1" in printed

    shards = sorted(out.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {p.name: n for p, n in zip(shards, (3, 3, 2))}
    assert dataset_size(str(out / "shard-{00000..00002}.tar")) == 8
    assert not list(out.glob(".*partial")) and not list(out.glob(".*tmp"))

    # byte-identical JPEGs, equal captions, metadata next to them
    members = {}
    for shard in shards:
        members.update(_members(shard))
    good_rows = [r for r in rows if r[0] != "missing.jpg" and r[1]]
    for i, (name, caption) in enumerate(good_rows):
        key = f"{i:09d}"
        assert members[f"{key}.jpg"] == jpeg_bytes[name]
        assert members[f"{key}.txt"].decode() == caption
        assert json.loads(members[f"{key}.json"])["image"] == name

    read = {s.key: s for s in ShardDataset(str(out / "shard-{00000..00002}.tar"), None, shuffle_buffer=0) if s}
    assert [s.caption for s in read.values()] == [c for _, c in good_rows]
    assert all(s.image.size == (40, 30) for s in read.values())

    # a second pack into the same folder must not mix old and new shards silently
    with pytest.raises(ValueError, match="already holds 3 shard"):
        _pack(table, out, "--image-root", images, "--quiet")
    assert _pack(table, out, "--image-root", images, "--quiet", "--overwrite", "--per-shard", 100) == 0


def test_pack_with_split_file_and_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(rgb_image(seed=i), "PNG"))
    pq.write_table(pa.table({"path": ["0.png", "1.png", "2.png", "1.png"], "text": ["a", "b", "c", "d"]}),
                   tmp_path / "t.parquet")
    (tmp_path / "split.txt").write_text("1.png\n")
    out = tmp_path / "out"
    assert _pack(tmp_path / "t.parquet", out, "--image-column", "path", "--caption-column", "text",
                 "--split-file", tmp_path / "split.txt", "--prefix", "train", "--quiet") == 0
    members = _members(out / "train-00000.tar")
    assert sorted(members) == ["000000000.jpg", "000000000.json", "000000000.txt",
                               "000000001.jpg", "000000001.json", "000000001.txt"]
    assert Image.open(io.BytesIO(members["000000000.jpg"])).format == "JPEG"  # PNG re-encoded
    assert [members["000000000.txt"], members["000000001.txt"]] == [b"b", b"d"]


def test_pack_image_folder_with_sidecar_captions(tmp_path, capsys):
    src = tmp_path / "folder"
    (src / "nested").mkdir(parents=True)
    (src / "a.jpg").write_bytes(encode(rgb_image(seed=1), "JPEG"))
    (src / "a.txt").write_text("first caption\n")
    (src / "nested" / "b.webp").write_bytes(encode(rgb_image(seed=2), "WEBP"))
    (src / "nested" / "b.txt").write_text("second caption")
    (src / "c.png").write_bytes(encode(rgb_image(seed=3), "PNG"))  # no caption file
    (src / "d.jpg").write_bytes(b"broken")
    (src / "d.txt").write_text("broken image")
    out = tmp_path / "out"
    assert _pack(src, out, "--quiet", "--reencode", "never") == 0
    printed = capsys.readouterr().out
    assert "wrote 2 samples" in printed and "missing_caption 1" in printed and "not_an_image 1" in printed
    members = _members(out / "shard-00000.tar")
    assert members["000000000.txt"] == b"first caption"
    assert members["000000001.webp"] == (src / "nested" / "b.webp").read_bytes()  # never: bytes as they are
    assert json.loads(members["000000001.json"]) == {"image": "nested/b.webp"}


def test_pack_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        _pack(tmp_path / "none.csv", tmp_path / "out", "--quiet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        _pack(tmp_path / "empty", tmp_path / "out", "--quiet")
    (tmp_path / "t.csv").write_text("image,caption\nmissing.jpg,a caption\n")
    assert _pack(tmp_path / "t.csv", tmp_path / "out", "--quiet") == 1
    assert "wrote nothing" in capsys.readouterr().out


def test_verification_skips_bad_samples(tmp_path):
    items = [(None, data, f"caption {name}", None) for name, data in good_images().items()]
    items += [(None, data, "bad image", None) for data, _ in bad_images().values()]
    items += [(None, tmp_path / "missing.png", "x", None), (None, good_images()["png"], b"\xff\xfe", None),
              (None, good_images()["png"], None, None), (None, None, "no image", None)]
    stats = SampleStats()
    paths = write_shards(items, tmp_path / "out", max_per_shard=100, stats=stats)
    assert stats.good == len(good_images())
    assert stats.counts == collections.Counter(
        not_an_image=1, empty_file=1, truncated_image=1, missing_file=1, bad_caption_encoding=1,
        missing_caption=1, missing_image=1)
    members = _members(paths[0])
    jpgs = [n for n in members if n.endswith(".jpg")]
    assert len(jpgs) == len(good_images()) and len(members) == 2 * len(good_images())
    # the JPEG sources are kept byte for byte (CMYK and grayscale too), the rest re-encoded as RGB JPEG
    kinds = list(good_images())
    for i, kind in enumerate(kinds):
        data = members[f"{i:09d}.jpg"]
        if kind.endswith("jpeg"):
            assert data == good_images()[kind]
        else:
            assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_reencode_modes_and_max_size(tmp_path):
    big = encode(rgb_image(200, 100, seed=1), "JPEG")
    small = encode(rgb_image(40, 30, seed=2), "JPEG")
    png = encode(rgb_image(40, 30, seed=3), "PNG")
    items = [(1, big, "big", None), (2, small, "small", None), (3, png, "png", None)]

    def written(**kw):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        return _members(write_shards(items, out, **kw)[0])

    m = written(max_size=50)
    assert Image.open(io.BytesIO(m["000000001.jpg"])).size == (100, 50)  # shorter side -> 50
    assert m["000000002.jpg"] == small
    m = written(reencode="always", quality=50)
    assert m["000000002.jpg"] != small and Image.open(io.BytesIO(m["000000002.jpg"])).size == (40, 30)
    m = written(reencode="never")
    assert m["000000003.png"] == png and m["000000001.jpg"] == big
    with pytest.raises(ValueError, match="max_size"):
        write_shards(items, tmp_path / "x", reencode="never", max_size=10)
    with pytest.raises(ValueError, match="reencode"):
        write_shards(items, tmp_path / "x", reencode="sometimes")


def test_keys(tmp_path):
    jpeg = good_images()["rgb_jpeg"]
    m = _members(write_shards([(7, jpeg, "a", None), ("my_key-1", jpeg, "b", None)], tmp_path / "a")[0])
    assert set(m) == {"000000007.jpg", "000000007.txt", "my_key-1.jpg", "my_key-1.txt"}
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shards([("a.b", jpeg, "a", None)], tmp_path / "b")
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards([(1, jpeg, "a", None), (1, jpeg, "b", None)], tmp_path / "c")


def test_interrupted_write_leaves_no_half_shard(tmp_path):
    jpeg = good_images()["rgb_jpeg"]

    def items():
        for i in range(5):
            yield i, jpeg, f"caption {i}", None
        raise RuntimeError("crash while packing")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"):
        write_shards(items(), out, max_per_shard=2)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.tar", "shard-00001.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-00000.tar": 2, "shard-00001.tar": 2}
    assert len(_members(out / "shard-00001.tar")) == 4


def test_parallel_workers(tmp_path):
    items = [(None, encode(rgb_image(seed=i), "PNG"), f"caption {i}", {"i": i}) for i in range(12)]
    stats = SampleStats()
    paths = write_shards(items, tmp_path, max_per_shard=5, workers=2, stats=stats)
    assert [sum(1 for n in _members(p) if n.endswith(".txt")) for p in paths] == [5, 5, 2]
    m = _members(paths[2])
    assert m["000000011.txt"] == b"caption 11" and json.loads(m["000000011.json"]) == {"i": 11}
    assert stats.good == 12


_KILLED_PACK = """
import io, os, signal, sys
import numpy as np
from PIL import Image
from ldmclip.data import write_shards

rng = np.random.default_rng(0)
def jpeg():  # noise: ~100 KB, more than a file buffer, so the killed shard has bytes on disk
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()

def items():
    for i in range(5):
        yield i, jpeg(), f"caption {i}", None
    os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the second shard: no cleanup runs

write_shards(items(), sys.argv[1], max_per_shard=3)
"""


def test_a_killed_pack_leaves_no_half_shard_under_a_final_name(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _KILLED_PACK, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    # the finished shard is complete; the one being written exists only under its temporary name
    assert names == [".shard-00001.tar.tmp", "shard-00000.tar"]
    assert (out / ".shard-00001.tar.tmp").stat().st_size > 0
    assert sorted(_members(out / "shard-00000.tar")) == [f"00000000{i}.{e}" for i in range(3) for e in ("jpg", "txt")]
    # the rerun removes the leftover
    jpeg = good_images()["rgb_jpeg"]
    write_shards([(i, jpeg, f"caption {i}", None) for i in range(4)], out, max_per_shard=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.tar", "shard-00001.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-00000.tar": 3, "shard-00001.tar": 1}


def test_pack_folder_with_odd_names_links_and_a_loop(tmp_path, capsys):
    """A Latin-1 name once aborted pack after the shards before it (the sample JSON); now it and a name with a
    newline are packed as good samples, their JSON ``image`` leads back to the file, a folder link loop
    adds nothing and a dangling link is counted."""
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    names = [os.fsdecode(b"caf\xe9.jpg"), "new\nline.jpg", "sub/plain.jpg"]
    for seed, name in enumerate(names):
        (src / name).write_bytes(encode(rgb_image(seed=seed), "JPEG"))
        (src / name).with_suffix(".txt").write_text(f"caption {seed}")
    (src / "sub" / "uplink").symlink_to("..")
    (src / "gone.jpg").symlink_to("nowhere.jpg")
    (src / "gone.txt").write_text("its image is gone")
    out = tmp_path / "out"
    assert _pack(src, out, "--quiet", "--per-shard", 1) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples in 3 shard(s)" in printed and "missing_file 1" in printed
    packed = {}
    for shard in sorted(out.glob("*.tar")):
        members = _members(shard)
        meta = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
        packed[text_to_name(meta["image"])] = next(v for k, v in members.items() if k.endswith(".jpg"))
    assert packed == {name: (src / name).read_bytes() for name in names}
    assert json.loads((out / "sizes.json").read_text()) == {f"shard-0000{i}.tar": 1 for i in range(3)}
