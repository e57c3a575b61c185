"""Decoding, bad-sample accounting and collation shared by the ldmclip datasets.

The image builders here are reused by the shard, table and writer tests."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmclip.data import Batch, ImageTextCollator, Sample, SampleStats, decode_caption, decode_image
from ldmclip.core import reading
from ldmclip.data.samples import (MAX_CAPTION_CHARS, BadSample, apply_transform, drain_pending, load_sample,
                                  record_bad)
from ldmclip.tokenizer import build_tokenizer
from ldmclip.transforms import PreprocessConfig, image_transform

SIZE = 32


def rgb_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def good_images() -> dict[str, bytes]:
    """Encoded images of every kind a real dataset holds, all decodable."""
    rgb = rgb_image()
    sixteen = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16))
    assert sixteen.mode == "I;16"
    return {
        "rgb_jpeg": encode(rgb, "JPEG", quality=90),
        "png": encode(rgb_image(seed=1), "PNG"),
        "gray_jpeg": encode(rgb_image(seed=2).convert("L"), "JPEG"),
        "cmyk_jpeg": encode(rgb_image(seed=3).convert("CMYK"), "JPEG"),
        "rgba_png": encode(rgb_image(seed=4).convert("RGBA"), "PNG"),
        "png16": encode(sixteen, "PNG"),
        "palette_png": encode(rgb_image(seed=5).convert("P"), "PNG"),
        "webp": encode(rgb_image(seed=6), "WEBP"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Encoded bytes that must be rejected, with the reason expected."""
    jpeg = encode(rgb_image(seed=7), "JPEG")
    return {
        "corrupt": (b"this is not an image at all", "not_an_image"),
        "zero_byte": (b"", "empty_file"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 3], "truncated_image"),
    }


@pytest.fixture
def transform():
    return image_transform(PreprocessConfig(image_size=SIZE), is_train=False)


@pytest.mark.parametrize("kind", sorted(good_images()))
def test_every_image_mode_decodes_to_rgb_tensor(kind, transform):
    data = good_images()[kind]
    img = decode_image(data)
    out = apply_transform(img, transform)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the decoded image keeps its mode; the ldmclip transform converts after cropping, like OpenCLIP
    expected = transform(Image.open(io.BytesIO(data)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_other_transforms_get_rgb_images():
    seen = []
    img = decode_image(good_images()["cmyk_jpeg"])
    assert img.mode == "CMYK"
    apply_transform(img, lambda im: seen.append(im.mode))
    assert seen == ["RGB"]
    assert apply_transform(decode_image(good_images()["png16"]), None).mode == "RGB"


@pytest.mark.parametrize("kind", sorted(bad_images()))
def test_bad_image_bytes_raise_with_reason(kind):
    data, reason = bad_images()[kind]
    with pytest.raises(BadSample) as info:
        decode_image(data)
    assert info.value.reason == reason


def test_bad_image_paths(tmp_path):
    with pytest.raises(BadSample) as info:
        decode_image(tmp_path / "nope.jpg")
    assert info.value.reason == "missing_file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadSample) as info:
        decode_image(tmp_path / "empty.jpg")
    assert info.value.reason == "empty_file"


def test_decompression_bomb_is_a_bad_sample(monkeypatch):
    data = encode(rgb_image(64, 64), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # 4096 px > limit (warning zone)
    with pytest.raises(BadSample) as info:
        decode_image(data)
    assert info.value.reason == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16 * 16)  # > 2x limit: PIL raises an error itself
    with pytest.raises(BadSample) as info:
        decode_image(data)
    assert info.value.reason == "decompression_bomb"


@pytest.mark.parametrize("value, reason", [
    (None, "missing_caption"),
    (b"\xff\xfe caption", "bad_caption_encoding"),
    ("caf\udce9", "bad_caption_encoding"),  # a non-UTF-8 byte read with errors="surrogateescape"
    ("", "empty_caption"),
    (" \t\n", "empty_caption"),
])
def test_bad_captions(value, reason):
    with pytest.raises(BadSample) as info:
        decode_caption(value)
    assert info.value.reason == reason


def test_good_captions():
    assert decode_caption(b"  a dog\n") == "a dog"
    assert decode_caption("\ufeffun caf\u00e9") == "un caf\u00e9"
    assert decode_caption("caf\u00e9".encode()) == "caf\u00e9"


def test_load_sample_counts_reasons(transform):
    stats = SampleStats()
    good = good_images()["rgb_jpeg"]
    s = load_sample(good, "a photo", "k1", transform, stats)
    assert isinstance(s, Sample) and s.key == "k1" and s.caption == "a photo"
    assert load_sample(good, None, "k2", transform, stats) is None
    assert load_sample(b"", "x", "k3", transform, stats) is None
    assert load_sample(None, "x", "k4", transform, stats) is None
    assert stats.seen == 4 and stats.good == 1 and stats.skipped == 3
    assert stats.counts == collections.Counter(missing_caption=1, empty_file=1, missing_image=1)
    assert drain_pending() == stats.counts
    assert drain_pending() == collections.Counter()


def test_transform_errors_are_counted():
    stats = SampleStats()

    def broken(img):
        raise RuntimeError("boom")

    assert load_sample(good_images()["png"], "x", "k", broken, stats) is None
    assert stats.counts == {"transform_error": 1}


def test_collator_batches_and_reports_skipped(transform):
    tokenizer = build_tokenizer()
    collate = ImageTextCollator(tokenizer)
    img = transform(rgb_image())
    record_bad("empty_caption")
    record_bad("not_an_image")
    batch = collate([Sample(img, "a cat", "000001"), None, (img, "a dog"), None])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.tokens.shape == (2, 77) and batch.tokens.dtype == torch.long
    torch.testing.assert_close(batch.tokens, tokenizer(["a cat", "a dog"]))
    assert batch.captions == ["a cat", "a dog"] and batch.keys == ["000001", ""]
    assert batch.skipped == collections.Counter(empty_caption=1, not_an_image=1)

    # all bad: an empty batch of the right shapes, still carrying the reasons
    record_bad("missing_file")
    empty = collate([None, None])
    assert len(empty) == 0 and empty.images.shape == (0, 3, SIZE, SIZE) and empty.tokens.shape == (0, 77)
    assert empty.skipped == {"missing_file": 1}

    stats = SampleStats().update(batch).update(empty)
    assert stats.seen == 5 and stats.skipped == 3 and stats.good == 2
    assert "missing_file 1" in stats.summary()
    assert stats.as_dict()["reasons"] == {"empty_caption": 1, "missing_file": 1, "not_an_image": 1}


def test_collator_without_tokenizer_and_empty_first_batch():
    collate = ImageTextCollator(None, image_size=SIZE)
    empty = collate([None])
    assert empty.images.shape == (0, 3, SIZE, SIZE) and empty.tokens is None
    batch = collate([Sample(torch.zeros(3, SIZE, SIZE), "x", "k")])
    assert batch.tokens is None and batch.images.shape == (1, 3, SIZE, SIZE)
    moved = batch.to("cpu")
    assert moved.images.shape == batch.images.shape and moved.keys == ["k"]


def _deferred_pair(is_train: bool):
    kwargs = {"seed": 5} if is_train else {}
    plain = image_transform(PreprocessConfig(image_size=SIZE), is_train=is_train, **kwargs)
    deferred = image_transform(PreprocessConfig(image_size=SIZE), is_train=is_train, defer_normalize=True, **kwargs)
    return plain, deferred


@pytest.mark.parametrize("is_train", [False, True])
def test_deferred_normalisation_gives_the_same_batch_bit_for_bit(is_train):
    plain, deferred = _deferred_pair(is_train)
    images = [rgb_image(40 + i, 30 + 2 * i, seed=i).convert(mode) for i, mode in enumerate(["RGB", "L", "P", "RGBA"])]
    rgbs = [deferred(img) for img in images]
    assert all(isinstance(r, Image.Image) and r.mode == "RGB" and r.size == (SIZE, SIZE) for r in rgbs)
    expected = ImageTextCollator(None)([Sample(plain(img), "x") for img in images]).images
    batch = ImageTextCollator(None, normalizer=deferred.normalizer)([Sample(r, "x") for r in rgbs]).images
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(batch, expected)


def _first_batch(loader):
    batch = next(iter(loader))
    return batch.images.clone(), batch.captions


def test_deferred_normalisation_through_dataloader_workers():
    from ldmclip.data import make_dataloader

    class Images(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Sample(self.transform(rgb_image(50, 40, seed=i)), f"caption {i}", str(i))

    plain, deferred = _deferred_pair(False)
    expected, captions = _first_batch(make_dataloader(Images(plain), None, 6))
    for workers in (0, 1):
        images, got = _first_batch(make_dataloader(Images(deferred), None, 6, num_workers=workers))
        assert torch.equal(images, expected) and got == captions, workers


def test_pil_samples_without_a_normalizer_or_of_mixed_sizes_are_refused():
    with pytest.raises(TypeError, match="normalizer=transform.normalizer"):
        ImageTextCollator(None)([Sample(rgb_image(), "x")])
    _, deferred = _deferred_pair(False)
    collate = ImageTextCollator(None, normalizer=deferred.normalizer)
    with pytest.raises(ValueError, match="different sizes"):
        collate([Sample(rgb_image(8, 8), "x"), Sample(rgb_image(9, 8), "y")])


def test_shard_level_reasons_do_not_count_as_samples():
    stats = SampleStats()
    stats.record("truncated_shard")
    stats.record("empty_file")
    assert stats.seen == 1 and stats.skipped == 1 and stats.counts["truncated_shard"] == 1


# ----------------------------------------------------------------------------------------------------
# One sample never costs the job, its memory or its time (issue 13)
# ----------------------------------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[2] / "src"

# Run in a child: a FIFO blocks open() for good, and the old code spent GBs on these files. The child
# reports what each entry point did, how long it took and its peak RSS (VmHWM).
_CHILD = r"""
import json, sys, time
from ldmclip.data.samples import SampleStats, decode_image, load_sample, BadSample
from ldmclip.transforms import PreprocessConfig, image_transform, load_image

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

folder = sys.argv[1]
out = {"baseline_kb": rss_kb("VmRSS"), "samples": {}, "decode": {}, "load_image": {}}
stats = SampleStats()
for is_train in (False, True):
    transform = image_transform(PreprocessConfig(image_size=224), is_train=is_train)
    for name in sys.argv[2:]:
        start = time.monotonic()
        sample = load_sample(f"{folder}/{name}", "a caption", name, transform, stats)
        out["samples"][f"{name}/{is_train}"] = [sample is not None, time.monotonic() - start]
for name in sys.argv[2:]:
    try:  # what the search index and ldmclip pack call (no target size; the transform comes later)
        decode_image(f"{folder}/{name}").close()
        out["decode"][name] = "ok"
    except BadSample as bad:
        out["decode"][name] = bad.reason
    try:
        load_image(f"{folder}/{name}", 224).close()
        out["load_image"][name] = "ok"
    except Exception as e:
        out["load_image"][name] = type(e).__name__
out["reasons"] = dict(stats.counts)
out["peak_kb"] = rss_kb("VmHWM")
print(json.dumps(out))
"""


def _strip_png() -> bytes:
    """The 157-byte 1x20000 PNG that cost 4.6 GB and 16 s to resize to 224 px."""
    return encode(Image.new("RGB", (1, 20000)), "PNG")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    os.mkfifo(folder / "fifo.jpg")
    with open(folder / "sparse.jpg", "wb") as f:
        f.truncate(2 * 2**30)  # 2 GiB, sparse: costs no disk, but read() would cost 2 GiB of memory
    (folder / "strip.png").write_bytes(_strip_png())
    (folder / "dir.jpg").mkdir()
    (folder / "good.jpg").write_bytes(good_images()["rgb_jpeg"])
    names = ["fifo.jpg", "sparse.jpg", "strip.png", "dir.jpg", "good.jpg"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("LDMCLIP_MAX_IMAGE_MB", None)
    try:  # generous: it only runs out when open() blocks (the child needs seconds to import torch)
        done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), *names], env=env, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the hostile files hung (open() blocked on the FIFO?)")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fifo_directory_huge_file_and_strip_are_counted_by_reason(hostile_run):
    # each file, once with the eval and once with the train transform
    assert hostile_run["reasons"] == {"not_a_file": 4, "too_large": 2, "decompression_bomb": 2}
    assert hostile_run["samples"]["good.jpg/False"][0] and hostile_run["samples"]["good.jpg/True"][0]
    assert hostile_run["decode"] == {"fifo.jpg": "not_a_file", "sparse.jpg": "too_large", "dir.jpg": "not_a_file",
                                     "strip.png": "ok", "good.jpg": "ok"}  # the strip: apply_transform refuses it
    assert hostile_run["load_image"] == {"fifo.jpg": "NotARegularFile", "sparse.jpg": "FileTooLarge",
                                         "dir.jpg": "NotARegularFile", "strip.png": "ValueError", "good.jpg": "ok"}


def test_hostile_files_cost_neither_time_nor_memory(hostile_run):
    for name, (_, seconds) in hostile_run["samples"].items():
        assert seconds < 2, f"{name} took {seconds:.1f} s"
    peak, baseline = hostile_run["peak_kb"] * 1024, hostile_run["baseline_kb"] * 1024
    assert peak < 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert peak - baseline < 256 * 2**20, f"loading took {(peak - baseline) / 2**20:.0f} MiB over the imports"


def test_apply_transform_counts_the_resize_of_a_strip(transform):
    img = decode_image(_strip_png())  # decoding it is cheap; resizing it to the model's size is not
    with pytest.raises(BadSample) as info:
        apply_transform(img, image_transform(PreprocessConfig(image_size=224)))
    assert info.value.reason == "decompression_bomb" and "aspect ratio" in info.value.detail
    with pytest.raises(BadSample) as info:
        decode_image(_strip_png(), target_size=224)  # refused before decoding
    assert info.value.reason == "decompression_bomb"


def test_aspect_ratio_and_resized_pixels_limits(monkeypatch):
    ok = encode(Image.new("RGB", (2, 200)), "PNG")  # 100:1, the limit
    assert apply_transform(decode_image(ok, target_size=SIZE), image_transform(PreprocessConfig(image_size=SIZE))
                           ).shape == (3, SIZE, SIZE)
    with pytest.raises(BadSample) as info:
        decode_image(encode(Image.new("RGB", (2, 201)), "PNG"), target_size=SIZE)
    assert info.value.reason == "decompression_bomb"
    # the pixel limit applies to the resized result: 32 * 32 * 100 pixels > 50,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(BadSample) as info:
        decode_image(ok, target_size=SIZE)
    assert info.value.reason == "decompression_bomb" and "resizing" in info.value.detail
    decode_image(ok).close()  # without a target size only the decoded pixels count


def test_big_jpeg_over_the_pixel_limit_decodes_small(monkeypatch):
    data = encode(rgb_image(256, 192), "JPEG", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 128 * 96)  # 4x over: Image.open refuses it outright
    img = decode_image(data, target_size=SIZE)
    assert img.size == (128, 96) and img.mode == "RGB"
    with pytest.raises(BadSample) as info:  # no libjpeg scale keeps the short side >= 100 under the limit
        decode_image(data, target_size=100)
    assert info.value.reason == "decompression_bomb"
    with pytest.raises(BadSample) as info:  # PNG has no reduced-scale decoding
        decode_image(encode(rgb_image(256, 192), "PNG"), target_size=SIZE)
    assert info.value.reason == "decompression_bomb"


def test_byte_limit_applies_to_paths_and_bytes(tmp_path, monkeypatch):
    data = good_images()["png"]
    (tmp_path / "a.png").write_bytes(data)
    monkeypatch.setattr(reading, "MAX_IMAGE_BYTES", len(data) - 1)
    for source in (tmp_path / "a.png", data):
        with pytest.raises(BadSample) as info:
            decode_image(source)
        assert info.value.reason == "too_large"
    monkeypatch.setattr(reading, "MAX_IMAGE_BYTES", len(data))
    decode_image(tmp_path / "a.png").close()
    assert reading.read_regular_file(tmp_path / "a.png", None) == data


@pytest.mark.parametrize("kind", sorted(good_images()))
def test_normal_images_are_bit_identical_at_the_target_size(kind, transform):
    data = good_images()[kind]
    out = load_sample(data, "a caption", "k", transform).image
    torch.testing.assert_close(out, transform(Image.open(io.BytesIO(data))), rtol=0, atol=0)


def test_caption_length_limit():
    assert decode_caption("a" * MAX_CAPTION_CHARS) == "a" * MAX_CAPTION_CHARS
    for value in ("a" * (MAX_CAPTION_CHARS + 1), b"b" * (MAX_CAPTION_CHARS + 1)):
        with pytest.raises(BadSample) as info:
            decode_caption(value)
        assert info.value.reason == "caption_too_long"


def test_image_byte_limit_from_the_environment(monkeypatch):
    for value, limit in (("", 64 * 2**20), ("0.5", 2**19), ("none", None)):
        monkeypatch.setenv("LDMCLIP_MAX_IMAGE_MB", value)
        assert reading._limit_from_env() == limit
    monkeypatch.setenv("LDMCLIP_MAX_IMAGE_MB", "64MB")
    with pytest.raises(ValueError, match="LDMCLIP_MAX_IMAGE_MB must be a number"):
        reading._limit_from_env()


def test_every_dataloader_worker_dies_with_its_command():
    # eval, index and the other map-style loaders: a killed command leaves no worker behind (as train's).
    from ldmclip.data.samples import exit_with_parent, make_dataloader

    loader = make_dataloader([1, 2, 3], None, 2, num_workers=1)
    assert loader.worker_init_fn is exit_with_parent
