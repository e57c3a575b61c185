"""Decoding, bad-sample accounting and collation shared by the ldmclip datasets.

The image builders here are reused by the shard, table and writer tests."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ldmclip.data import Batch, ImageTextCollator, Sample, SampleStats, decode_caption, decode_image
from ldmclip.data.samples import BadSample, apply_transform, drain_pending, load_sample, record_bad
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
