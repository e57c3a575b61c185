"""CaptionTable over CSV / TSV / parquet files, split files, clear errors, and Flickr8k when present."""

from __future__ import annotations

import collections
import csv

import pytest
import torch

from ldmclip.data import CaptionTable, SampleStats, make_dataloader
from ldmclip.data.table import table_columns
from ldmclip.tokenizer import build_tokenizer
from ldmclip.transforms import PreprocessConfig, image_transform

from .test_samples import encode, good_images, rgb_image

SIZE = 32


@pytest.fixture
def transform():
    return image_transform(PreprocessConfig(image_size=SIZE), is_train=False)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(good_images()["rgb_jpeg"])
    (root / "b.png").write_bytes(good_images()["rgba_png"])
    (root / "sub" / "c.jpg").write_bytes(good_images()["cmyk_jpeg"])
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "zero.jpg").write_bytes(b"")
    return root


# (image, caption) rows; the expected outcome is good or a reason
ROWS = [
    ("a.jpg", "a red square", None),
    ("a.jpg", "the same image, second caption", None),
    ("b.png", 'a "quoted" caption, with a comma', None),
    ("sub/c.jpg", "a cmyk photo", None),
    ("broken.jpg", "broken image", "not_an_image"),
    ("zero.jpg", "zero bytes", "empty_file"),
    ("missing.jpg", "no such file", "missing_file"),
    ("a.jpg", "   ", "empty_caption"),
]


def _write_delimited(path, sep, rows=ROWS, header=("image", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        for image, caption, _ in rows:
            writer.writerow([image, caption])
    return path


def _write_parquet(path, rows=ROWS, extra_null=False):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = [r[0] for r in rows]
    captions = [r[1] for r in rows]
    if extra_null:
        images.append("a.jpg")
        captions.append(None)
    pq.write_table(pa.table({"image": images, "caption": captions, "other": list(range(len(images)))}), path)
    return path


def _check_table(table):
    assert len(table) == len(ROWS)
    good = {}
    for i in range(len(table)):
        sample = table[i]
        if sample is None:
            continue
        assert sample.image.shape == (3, SIZE, SIZE) and sample.image.dtype == torch.float32
        good[i] = sample.caption
    expected = {i: r[1] for i, r in enumerate(ROWS) if r[2] is None}
    assert good == expected
    reasons = collections.Counter(r[2] for r in ROWS if r[2])
    assert table.stats.counts == reasons
    assert table.stats.seen == len(ROWS)
    assert table[0].key == "a.jpg#0" and table[3].key == "sub/c.jpg#3"


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, image_root, transform, suffix, sep):
    path = _write_delimited(tmp_path / f"captions{suffix}", sep)
    _check_table(CaptionTable(path, image_root, transform))


def test_parquet(tmp_path, image_root, transform):
    path = _write_parquet(tmp_path / "captions.parquet")
    _check_table(CaptionTable(path, image_root, transform))
    with_null = CaptionTable(_write_parquet(tmp_path / "null.parquet", extra_null=True), image_root, transform)
    assert with_null[len(ROWS)] is None and with_null.stats.counts == {"missing_caption": 1}


def test_custom_columns_sep_and_default_root(tmp_path, transform):
    (tmp_path / "x.jpg").write_bytes(encode(rgb_image(), "JPEG"))
    path = tmp_path / "list.txt"
    path.write_text("file|text|extra\nx.jpg|a caption|1\n")
    table = CaptionTable(path, None, transform, image_column="file", caption_column="text", sep="|")
    assert len(table) == 1 and table[0].caption == "a caption"  # images relative to the table's folder


def test_non_utf8_caption_is_a_bad_row(tmp_path, image_root, transform):
    path = tmp_path / "latin1.csv"
    path.write_bytes("image,caption\na.jpg,caf\u00e9 ok\na.jpg,caf".encode() + b"\xe9 latin-1\n")
    table = CaptionTable(path, image_root, transform)
    assert table[0].caption == "caf\u00e9 ok"
    assert table[1] is None and table.stats.counts == {"bad_caption_encoding": 1}
    assert table.caption_error(1) == "bad_caption_encoding" and table.captions[1] == ""


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_an_overlong_caption_is_one_counted_row_not_an_unreadable_table(tmp_path, image_root, transform, suffix,
                                                                         sep):
    default = csv.field_size_limit(131_072)  # the csv module's default, whatever an earlier test set
    try:
        rows = [("a.jpg", "a dog", None), ("a.jpg", "x" * 200_000, "caption_too_long"), ("b.png", "a cat", None)]
        path = _write_delimited(tmp_path / f"long{suffix}", sep, rows=rows)
        table = CaptionTable(path, image_root, transform)
        assert [table[i] is not None for i in range(3)] == [True, False, True]
        assert table.caption_error(1) == "caption_too_long"
        assert table.stats.counts == {"caption_too_long": 1} and table[2].caption == "a cat"
        (tmp_path / f"wide{suffix}").write_text("image" + sep + "c" * 200_000 + "\n")
        assert table_columns(tmp_path / f"wide{suffix}") == ["image", "c" * 200_000]
    finally:
        csv.field_size_limit(default)


def test_split_file(tmp_path, image_root, transform):
    path = _write_delimited(tmp_path / "captions.csv", ",")
    split = tmp_path / "split.txt"
    split.write_text("# comment\na.jpg\n\n./sub/c.jpg\n")
    table = CaptionTable(path, image_root, transform, split_file=split)
    assert [table.names[i] for i in range(len(table))] == ["a.jpg", "a.jpg", "sub/c.jpg", "a.jpg"]
    assert table.rows == [0, 1, 3, 7]
    assert table.grouped() == [(str(image_root / "a.jpg"), [0, 1]),  # row 7 (index 3) has an empty caption
                               (str(image_root / "sub/c.jpg"), [2])]
    images = table.image_dataset()
    assert len(images) == 2 and images[1].image.shape == (3, SIZE, SIZE) and images[1].caption == ""


def test_dataloader_with_workers(tmp_path, image_root, transform):
    table = CaptionTable(_write_delimited(tmp_path / "captions.csv", ","), image_root, transform)
    loader = make_dataloader(table, build_tokenizer(), batch_size=3, num_workers=2, shuffle=True, seed=0)
    stats, captions = SampleStats(), []
    for batch in loader:
        stats.update(batch)
        captions += batch.captions
        assert batch.tokens.shape == (len(batch), 77)
    assert sorted(captions) == sorted(r[1] for r in ROWS if r[2] is None)
    assert stats.counts == collections.Counter(r[2] for r in ROWS if r[2]) and stats.seen == len(ROWS)


# -- clear errors ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CaptionTable(tmp_path / "nope.csv", tmp_path)
    path = _write_delimited(tmp_path / "c.csv", ",")
    with pytest.raises(FileNotFoundError, match="image root folder not found: .*no_images"):
        CaptionTable(path, tmp_path / "no_images")


def test_missing_columns_lists_the_columns_found(tmp_path):
    path = _write_delimited(tmp_path / "c.csv", ",", header=("filepath", "title"))
    with pytest.raises(ValueError, match=r"'image', 'caption' not found; the columns are: 'filepath', 'title'"):
        CaptionTable(path, tmp_path)
    with pytest.raises(ValueError, match="'text' not found"):
        CaptionTable(path, tmp_path, image_column="filepath", caption_column="text")
    parquet = _write_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"'text' not found; the columns are: 'image', 'caption', 'other'"):
        CaptionTable(parquet, tmp_path, caption_column="text")


def test_empty_tables(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        CaptionTable(tmp_path / "empty.csv", tmp_path)
    (tmp_path / "header.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="no rows"):
        CaptionTable(tmp_path / "header.csv", tmp_path)
    _write_parquet(tmp_path / "empty.parquet", rows=[])
    with pytest.raises(ValueError, match="no rows"):
        CaptionTable(tmp_path / "empty.parquet", tmp_path)


def test_split_file_errors(tmp_path, image_root):
    path = _write_delimited(tmp_path / "captions.csv", ",")
    split = tmp_path / "split.txt"
    split.write_text("other.jpg\nthird.jpg\n")
    with pytest.raises(ValueError, match=r"none of the 2 images listed in split file .* 'other.jpg'.* 'a.jpg'"):
        CaptionTable(path, image_root, split_file=split)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        CaptionTable(path, image_root, split_file=tmp_path / "missing.txt")


def test_unknown_suffix_and_bad_parquet(tmp_path):
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown table format"):
        CaptionTable(tmp_path / "t.json", tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        CaptionTable(tmp_path / "bad.parquet", tmp_path)


# -- Flickr8k (skipped when the data is absent) ------------------------------------------------------------

def test_flickr8k_splits(flickr8k, transform):
    train = CaptionTable(flickr8k / "captions.csv", flickr8k / "images", transform, split_file=flickr8k / "train.txt")
    test = CaptionTable(flickr8k / "captions.csv", flickr8k / "images", transform, split_file=flickr8k / "test.txt")
    assert len(train) == 30000 and len(test) == 5000
    paths, groups = zip(*test.grouped())
    assert len(paths) == 1000 and all(len(g) == 5 for g in groups)
    assert not set(paths) & {path for path, _ in train.grouped()}
    sample = test[groups[0][0]]
    assert sample.image.shape == (3, SIZE, SIZE) and sample.caption == test.captions[groups[0][0]]
