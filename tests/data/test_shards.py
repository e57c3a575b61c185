"""webdataset shards: reading back what the writer wrote, bad members, truncated shards, splitting
across DataLoader workers and nodes, shuffling per epoch, resampling."""

from __future__ import annotations

import collections
import io
import itertools
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from ldmclip.data import (Batch, SampleStats, ShardDataset, dataset_size, expand_urls, make_dataloader,
                          make_shard_pipeline, write_shards)
from ldmclip.core.errors import UserError
from ldmclip.data.samples import drain_pending
from ldmclip.data.shards import ShardStallError
from ldmclip.tokenizer import build_tokenizer
from ldmclip.transforms import PreprocessConfig, image_transform

from .test_samples import bad_images, encode, good_images, rgb_image

SIZE = 32
PER_SHARD = 5


def _items():
    """20 samples: 14 good (every image mode) and 6 bad, spread over 4 shards of 5."""
    good = list(good_images().items()) + [(f"rgb_{i}", encode(rgb_image(seed=10 + i), "JPEG")) for i in range(6)]
    jpeg = good_images()["rgb_jpeg"]
    bad = [(name, data, f"caption of {name}", reason) for name, (data, reason) in bad_images().items()]
    bad += [
        ("bad_utf8", jpeg, b"caf\xe9 \xff", "bad_caption_encoding"),
        ("empty_caption", jpeg, "   ", "empty_caption"),
        ("no_caption", jpeg, None, "missing_caption"),
    ]
    items, expected_good, expected_bad = [], {}, collections.Counter()
    g, b = iter(good), iter(bad)
    for i in range(20):
        key = i
        if i % 3 == 2 and len(expected_bad) < len(bad):
            name, data, caption, reason = next(b)
            expected_bad[reason] += 1
        else:
            name, data = next(g)
            caption = f"a picture number {i} ({name})"
            expected_good[f"{key:09d}"] = caption
        items.append((key, data, caption, {"name": name} if i % 2 else None))
    assert len(expected_good) == 14 and sum(expected_bad.values()) == 6
    return items, expected_good, expected_bad


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    items, expected_good, expected_bad = _items()
    paths = write_shards(items, root, max_per_shard=PER_SHARD, reencode="never", verify=False)
    assert [p.name for p in paths] == [f"shard-{i:05d}.tar" for i in range(4)]

    # A fifth shard, cut in the middle of a member: only its complete samples can come out.
    extra = [(100 + i, encode(rgb_image(seed=50 + i), "JPEG"), f"extra caption {i}", None) for i in range(6)]
    (cut_dir := root / "cut").mkdir()
    [full] = write_shards(extra, cut_dir, prefix="truncated", max_per_shard=10)
    data = full.read_bytes()
    cut = len(data) // 2
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    ends = collections.defaultdict(int)
    for m in members:
        ends[m.name.split(".")[0]] = max(ends[m.name.split(".")[0]], m.offset_data + m.size)
    complete = {key: f"extra caption {int(key) - 100}" for key, end in ends.items() if end <= cut}
    assert 0 < len(complete) < len(extra)
    truncated = root / "truncated-00000.tar"
    truncated.write_bytes(data[:cut])
    return {
        "root": root,
        "pattern": str(root / "shard-{00000..00003}.tar"),
        "truncated": str(truncated),
        "good": expected_good,
        "bad": expected_bad,
        "truncated_good": complete,
    }


@pytest.fixture
def transform():
    return image_transform(PreprocessConfig(image_size=SIZE), is_train=True, seed=0)


def _read_all(loader):
    keys, captions, stats = [], {}, SampleStats()
    for batch in loader:
        assert batch.images.shape[1:] == (3, SIZE, SIZE) and batch.images.dtype == torch.float32
        assert batch.tokens.shape == (len(batch), 77)
        keys.extend(batch.keys)
        captions.update(zip(batch.keys, batch.captions))
        stats.update(batch)
    return keys, captions, stats


def test_brace_expansion(shards):
    urls = expand_urls(shards["pattern"])
    assert [Path(u).name for u in urls] == [f"shard-{i:05d}.tar" for i in range(4)]
    assert expand_urls(urls[:2]) == urls[:2]
    assert expand_urls(f"{urls[0]}::{urls[1]}") == urls[:2]
    assert ShardDataset(shards["pattern"]).urls == urls
    assert dataset_size(shards["pattern"]) == 20  # from the sizes.json the writer wrote


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_good_sample_once_bad_ones_counted(shards, transform, num_workers):
    urls = expand_urls(shards["pattern"]) + [shards["truncated"]]
    dataset = make_shard_pipeline(urls, transform, shuffle_buffer=7, seed=3)
    loader = make_dataloader(dataset, build_tokenizer(), batch_size=4, num_workers=num_workers)
    keys, captions, stats = _read_all(loader)

    expected = {**shards["good"], **{f"{int(k):09d}": c for k, c in shards["truncated_good"].items()}}
    assert sorted(keys) == sorted(expected), "every good sample exactly once"
    assert captions == expected
    assert stats.counts == shards["bad"] + collections.Counter(truncated_shard=1)
    assert stats.good == len(expected) and stats.seen == len(expected) + 6


def test_file_order_without_shuffle(shards, transform):
    dataset = ShardDataset(shards["pattern"], transform, shuffle_buffer=0)
    samples = list(dataset)
    # 20 samples, then one more None: the end-of-stream marker that hands the pending reasons to a
    # collator (the stream ends after bad samples were recorded)
    assert len(samples) == 21 and samples[-1] is None
    assert [s.key for s in samples if s is not None] == list(shards["good"])
    assert dataset.stats.counts == shards["bad"]
    first = samples[0]
    assert first.image.shape == (3, SIZE, SIZE) and first.caption == shards["good"][first.key]


def test_truncated_shard_keeps_complete_samples(shards, transform):
    dataset = ShardDataset(shards["truncated"], None, shuffle_buffer=0)
    samples = [s for s in dataset if s is not None]
    assert {s.key: s.caption for s in samples} == {f"{int(k):09d}": c for k, c in shards["truncated_good"].items()}
    assert samples[0].image.mode == "RGB"
    assert dataset.stats.counts == {"truncated_shard": 1}


def test_unreadable_shards_are_counted(shards, tmp_path):
    urls = [str(tmp_path / "missing.tar"), expand_urls(shards["pattern"])[0]]
    dataset = ShardDataset(urls, None, shuffle_buffer=0)
    good = [s for s in dataset if s is not None]
    assert len(good) > 0 and dataset.stats.counts["shard_unreadable"] == 1
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 100)
    dataset = ShardDataset([str(garbage)], None, shuffle_buffer=0)
    # the only shard gives nothing: a stream that cannot be used at all stops, naming it
    with pytest.raises(ShardStallError, match=f"{garbage}: not a tar file"):
        list(dataset)
    assert sum(dataset.stats.counts.values()) == 1


def test_pipe_urls(shards):
    url = "pipe:cat " + expand_urls(shards["pattern"])[0]
    keys = [s.key for s in ShardDataset(url, None, shuffle_buffer=0) if s is not None]
    assert keys == [k for k in shards["good"] if int(k) < PER_SHARD]


def _keys(dataset):
    return [s.key for s in dataset if s is not None]


def test_shuffling_is_deterministic_per_epoch(shards):
    dataset = ShardDataset(shards["pattern"], None, shuffle_buffer=8, seed=1)
    first = _keys(dataset)
    assert _keys(dataset) == first
    assert sorted(first) == sorted(shards["good"]) and first != list(shards["good"])
    dataset.set_epoch(1)
    second = _keys(dataset)
    assert sorted(second) == sorted(first) and second != first
    assert _keys(ShardDataset(shards["pattern"], None, shuffle_buffer=8, seed=1, epoch=1)) == second


def test_set_epoch_reaches_persistent_workers(shards):
    dataset = ShardDataset(shards["pattern"], None, shuffle_buffer=8, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, persistent_workers=True,
                                         collate_fn=_keys_only)

    def epoch_keys(epoch):
        dataset.set_epoch(epoch)
        return [k for batch in loader for k in batch.keys]

    e0, e1, e0_again = epoch_keys(0), epoch_keys(1), epoch_keys(0)
    assert sorted(e0) == sorted(e1) == sorted(shards["good"])
    assert e0 != e1 and e0 == e0_again


def _keys_only(samples):
    """Collate for PIL samples (no tensors): only the keys matter."""
    good = [s for s in samples if s is not None]
    return Batch(torch.empty(0), None, [s.caption for s in good], drain_pending(), [s.key for s in good])


def test_split_by_node(shards):
    parts = [_keys(ShardDataset(shards["pattern"], None, shuffle_buffer=4, rank=r, world_size=2)) for r in range(2)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(shards["good"])
    with pytest.raises(ValueError, match="both rank and world_size"):
        ShardDataset(shards["pattern"], rank=0)


def test_shards_for_worker_partition(shards):
    dataset = ShardDataset(shards["pattern"], shuffle_buffer=100, rank=1, world_size=2)
    node1 = dataset.shards_for_worker(0, 1, epoch=3)
    per_worker = [dataset.shards_for_worker(w, 2, epoch=3) for w in range(2)]
    assert sorted(per_worker[0] + per_worker[1]) == sorted(node1) and len(node1) == 2


def test_resampled_mode_is_endless(shards):
    dataset = ShardDataset(shards["pattern"], None, resampled=True, shuffle_buffer=4, seed=2)
    drawn = [s for s in itertools.islice(iter(dataset), 60)]
    keys = [s.key for s in drawn if s is not None]
    assert len(drawn) == 60 and set(keys) <= set(shards["good"]) and len(keys) > len(set(keys))
    assert [s.key if s else None for s in itertools.islice(iter(dataset), 60)] == [
        s.key if s else None for s in drawn]


def test_too_few_shards_warns(shards):
    dataset = ShardDataset(expand_urls(shards["pattern"])[0], None, shuffle_buffer=0, rank=0, world_size=2)
    with pytest.warns(UserWarning, match="some readers get no data"):
        list(dataset)


# ---------------------------------------------------------------------------------------------------
# streams that give nothing stop; duplicate keys


@pytest.fixture
def unreadable(tmp_path):
    """Four shards, none readable: missing, zero bytes, random bytes, a tar holding no sample."""
    (tmp_path / "s1.tar").write_bytes(b"")
    (tmp_path / "s2.tar").write_bytes(os.urandom(3000))
    (tmp_path / "s3.tar").write_bytes(b"\0" * 1024)  # an empty tar archive
    return [str(tmp_path / f"s{i}.tar") for i in range(4)]


PROBLEMS = {0: "not found", 1: "empty file (0 bytes)", 2: "not a tar file", 3: "no complete image-caption sample"}


def _assert_names_every_shard(message, urls):
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("no usable image-caption sample from the webdataset shards")
    for i, url in enumerate(urls):
        assert f"{url}: {PROBLEMS[i]}" in message


def test_a_stream_from_unreadable_shards_stops_naming_them(unreadable):
    for resampled in (False, True):
        # (resampled, the old code drew shards forever; a bound on attempts keeps this test from hanging there)
        dataset = ShardDataset(unreadable, None, shuffle_buffer=4, resampled=resampled, stall_attempts=1000)
        with pytest.raises(ShardStallError) as caught:
            list(dataset)
        assert isinstance(caught.value, UserError)
        _assert_names_every_shard(str(caught.value), unreadable)
        assert "4 of the 4 shards tried" in str(caught.value)


def test_a_stall_in_a_dataloader_worker_reaches_the_main_process_as_the_same_one_line(unreadable):
    dataset = ShardDataset(unreadable, None, shuffle_buffer=4, resampled=True, stall_attempts=1000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=_keys_only)
    with pytest.raises(ShardStallError) as caught:
        list(loader)
    _assert_names_every_shard(str(caught.value), unreadable)


def test_the_stall_bounds_attempts_time_and_the_shards_it_names(tmp_path):
    missing = [str(tmp_path / f"missing-{i}.tar") for i in range(8)]
    with pytest.raises(ShardStallError, match=r"in 3 shard attempt\(s\) in a row"):
        list(ShardDataset(missing, None, shuffle_buffer=0, resampled=True, stall_attempts=3))
    with pytest.raises(ShardStallError, match=r"in 1 shard attempt\(s\) in a row"):
        list(ShardDataset(missing, None, shuffle_buffer=0, resampled=True, stall_seconds=0))
    with pytest.raises(ShardStallError) as caught:
        list(ShardDataset(missing, None, shuffle_buffer=0))
    message = str(caught.value)
    assert message.count("not found") == 5 and message.endswith("and 3 more. Check the shard pattern and the files")


def test_missing_shards_among_good_ones_are_counted_not_fatal(shards, tmp_path):
    urls = expand_urls(shards["pattern"])[:1] + [str(tmp_path / f"missing-{i}.tar") for i in range(3)]
    dataset = ShardDataset(urls, None, shuffle_buffer=0, resampled=True, seed=4)
    drawn = [s for s in itertools.islice(iter(dataset), 40) if s is not None]
    assert len(drawn) > 20 and dataset.stats.counts["shard_unreadable"] > 0
    # without resampling, the stream reads the good shard and ends
    assert len([s for s in ShardDataset(urls, None, shuffle_buffer=0) if s is not None]) > 0


def test_a_fifo_named_like_a_shard_is_not_opened(tmp_path):
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    # (the old code blocked in open(); a writer that gives up after a few seconds keeps a test of it
    # from hanging: it opens the FIFO only if a reader waits on it, and then closes it at once)
    def release() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.05)

    writer = threading.Thread(target=release, daemon=True)
    writer.start()
    dataset = ShardDataset([str(fifo)], None, shuffle_buffer=0)
    with pytest.raises(ShardStallError, match="fifo.tar: not a regular file"):
        list(dataset)
    assert dataset.stats.counts == {"shard_unreadable": 1}
    writer.join()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_duplicate_keys_are_counted_and_only_the_first_is_used(tmp_path):
    jpeg = encode(rgb_image(seed=1), "JPEG")
    shard = tmp_path / "dups.tar"
    _tar(shard, [("a.jpg", jpeg), ("a.txt", b"first a"), ("b.jpg", jpeg), ("b.txt", b"only b"),
                 ("a.jpg", jpeg), ("a.txt", b"second a"),       # the key again, later in the shard
                 ("b.jpg", jpeg), ("b.txt", b"second b"),       # and right after the first b (below)
                 ("c.jpg", jpeg), ("c.txt", b"only c"), ("c.jpg", jpeg), ("c.txt", b"second c")])
    dataset = ShardDataset(str(shard), None, shuffle_buffer=0)
    samples = [s for s in dataset if s is not None]
    assert [(s.key, s.caption) for s in samples] == [("a", "first a"), ("b", "only b"), ("c", "only c")]
    assert dataset.stats.counts == {"duplicate_key": 3}
    assert dataset.stats.seen == 6 and dataset.stats.good == 3
    # and through a DataLoader's batches, as the trainer counts them
    loader = make_dataloader(ShardDataset(str(shard), image_transform(PreprocessConfig(image_size=SIZE)),
                                          shuffle_buffer=0), build_tokenizer(), batch_size=2)
    keys, captions, stats = _read_all(loader)
    assert keys == ["a", "b", "c"] and stats.counts == {"duplicate_key": 3}
