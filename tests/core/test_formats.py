from pathlib import Path

import pytest

from ldmclip.core.formats import (IMAGE_SUFFIXES, TABLE_SUFFIXES, carries_weights, input_kind, is_image_file, is_shards,
                                  is_table)


@pytest.mark.parametrize("name", ["a.csv", "a.tsv", "a.tab", "A.TAB", "a.parquet", "x/y.pq"])
def test_every_table_suffix_is_a_table(name):
    assert is_table(name) and input_kind(name) == "table"


@pytest.mark.parametrize("spec", ["shards/00000.tar", "s/{00000..00009}.tar", "pipe:curl -s http://h/a.tar",
                                  "s3://bucket/a.tar.gz", "a.tar::b.tar", "https://host/shard"])
def test_shard_specs_are_shards(spec):
    assert is_shards(spec) and input_kind(spec) == "shards"


def test_folders_and_caption_files(tmp_path: Path):
    assert input_kind(tmp_path) == "folder"
    assert input_kind(tmp_path / "captions.txt") == "text"
    assert not is_shards("captions.txt") and not is_table("captions.txt")


def test_image_files_by_suffix():
    assert all(is_image_file(f"x{suffix.upper()}") for suffix in IMAGE_SUFFIXES)
    assert not is_image_file("x.txt") and not is_image_file("x.jpg.json")
    assert set(TABLE_SUFFIXES).isdisjoint(IMAGE_SUFFIXES)


def test_names_that_carry_their_weights():
    assert carries_weights("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    assert carries_weights("local-dir:/tmp/model")
    assert not carries_weights("ViT-L-14") and not carries_weights("my/config.json")
