"""ldmclip.transforms against OpenCLIP 3.3.0's image preprocessing (torchvision on PIL images)."""

from __future__ import annotations

import ast
import io
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import shared_data_dir
from ldmclip.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    EvalTransform,
    PreprocessConfig,
    TrainTransform,
    image_transform,
    load_image,
)

TOL = 1e-6
SIZES = [(225, 301), (37, 500), (1000, 13), (224, 224), (1, 1)]  # (width, height)


def _flickr_jpegs(n: int) -> list[Path]:
    root = shared_data_dir()
    d = root / "flickr8k" / "images" if root is not None else None
    if d is None or not d.is_dir():
        pytest.skip("flickr8k images not found (set LDMCLIP_DATA)")
    files = sorted(d.glob("*.jpg"))[:n]
    if not files:
        pytest.skip(f"no JPEGs in {d}")
    return files


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """Random-pixel image of the given (pseudo-)mode."""
    rng = np.random.default_rng(zlib.crc32(f"{mode}-{width}-{height}-{seed}".encode()))
    hw = (height, width)

    def u8(*extra):
        return rng.integers(0, 256, hw + extra, dtype=np.uint8)

    if mode == "RGB":
        return Image.fromarray(u8(3), "RGB")
    if mode == "RGBA":
        return Image.fromarray(u8(4), "RGBA")
    if mode == "L":
        return Image.fromarray(u8(), "L")
    if mode == "LA":
        return Image.fromarray(u8(2), "LA")
    if mode in ("P", "P+transparency"):
        im = Image.fromarray(u8(), "L").convert("P")
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            im.info["transparency"] = 7
        return im
    if mode == "PA":
        return Image.fromarray(u8(4), "RGBA").convert("PA")
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), u8(4).tobytes())
    if mode == "I;16":
        return Image.frombytes("I;16", (width, height), rng.integers(0, 65536, hw).astype("<u2").tobytes())
    if mode == "I;16B":
        return Image.frombytes("I;16B", (width, height), rng.integers(0, 65536, hw).astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-500, 70000, hw, dtype=np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.normal(128, 120, hw).astype(np.float32), "F")
    if mode == "1":
        return Image.fromarray(u8() > 127).convert("1")
    if mode == "La":
        return Image.fromarray(u8(2), "LA").convert("La")
    raise AssertionError(mode)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # The reference (torchvision) runs small tensor ops per image; on a busy 2-core machine the intra-op
    # thread pool makes each call tens of ms slower. Results do not depend on the thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


def _assert_same(ref: torch.Tensor, out: torch.Tensor, size: int = 224) -> None:
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, size, size)
    assert ref.shape == out.shape
    diff = (ref - out).abs().max().item()
    assert diff <= TOL, diff


# ----------------------------------------------------------------------------------------------------
# Eval transform == OpenCLIP eval preprocess
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
@pytest.mark.parametrize("norm", ["openai", "half"])
def test_eval_matches_openclip(open_clip, mode, size, norm):
    img = make_image(mode, *size)
    if norm == "openai":
        ref = open_clip.image_transform(224, is_train=False)
        ours = EvalTransform(224)
    else:
        ref = open_clip.image_transform(224, is_train=False, mean=0.5, std=0.5)
        ours = EvalTransform(224, mean=(0.5,) * 3, std=(0.5,) * 3)
    _assert_same(ref(img.copy()), ours(img))


@pytest.mark.parametrize("size", [(225, 301), (37, 500), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["LA", "P+transparency", "PA", "I;16B", "I", "F", "1"])
def test_eval_matches_openclip_other_modes(open_clip, mode, size):
    img = make_image(mode, *size)
    _assert_same(open_clip.image_transform(224, is_train=False)(img.copy()), EvalTransform(224)(img))


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("mode,size", [("RGB", (225, 301)), ("RGBA", (500, 37)), ("P", (100, 60)),
                                       ("L", (3, 2)), ("I;16", (224, 224)), ("F", (61, 33))])
def test_eval_resize_modes_match_openclip(open_clip, resize_mode, interpolation, mode, size):
    img = make_image(mode, *size)
    fill = 255 if resize_mode == "longest" else 0
    ref = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode, interpolation=interpolation,
                                    fill_color=fill)
    ours = EvalTransform(224, resize_mode=resize_mode, interpolation=interpolation, fill_color=fill)
    _assert_same(ref(img.copy()), ours(img))


def test_eval_other_size(open_clip):
    img = make_image("RGB", 500, 333)
    ref = open_clip.image_transform(336, is_train=False, mean=0.5, std=0.5, resize_mode="longest")
    ours = EvalTransform(336, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="longest")
    _assert_same(ref(img), ours(img), size=336)


def test_eval_real_jpeg(open_clip):
    ref = open_clip.image_transform(160, is_train=False)
    ours = EvalTransform(160)
    for path in _flickr_jpegs(3):
        img = load_image(path)
        with Image.open(path) as direct:
            direct.load()
            assert img.mode == direct.mode and np.array_equal(np.asarray(img), np.asarray(direct))
        _assert_same(ref(img), ours(img), size=160)
        # crop of a wide view: resize + crop both do something
        wide = img.crop((0, 30, img.width, img.height - 30))
        _assert_same(ref(wide), ours(wide), size=160)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_eval_unconvertible_mode_raises_like_openclip(open_clip, resize_mode):
    img = make_image("La", 40, 30)  # PIL cannot convert La -> RGB
    with pytest.raises(Exception):  # noqa: B017 - whatever the reference raises; ours must be ValueError
        open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)(img.copy())
    with pytest.raises(ValueError, match="mode 'La'"):
        EvalTransform(224, resize_mode=resize_mode)(img)


def test_eval_degenerate_sizes_raise(open_clip):
    thin = make_image("RGB", 500, 1)  # 'longest' scales the short side to round(0.45) == 0
    with pytest.raises(Exception):  # noqa: B017 - whatever the reference raises; ours must be ValueError
        open_clip.image_transform(224, is_train=False, resize_mode="longest")(thin)
    with pytest.raises(ValueError, match="empty"):
        EvalTransform(224, resize_mode="longest")(thin)
    # the other modes handle it
    for mode in ("shortest", "squash"):
        _assert_same(open_clip.image_transform(224, is_train=False, resize_mode=mode)(thin),
                     EvalTransform(224, resize_mode=mode)(thin))
    for mode in ("shortest", "longest", "squash"):
        with pytest.raises(ValueError, match="empty image"):
            EvalTransform(224, resize_mode=mode)(Image.new("RGB", (0, 10)))
    with pytest.raises(TypeError):
        EvalTransform(224)(np.zeros((10, 10, 3), np.uint8))


def test_eval_does_not_modify_input():
    img = make_image("RGBA", 50, 70)
    before = np.asarray(img).copy()
    EvalTransform(32)(img)
    assert img.mode == "RGBA" and np.array_equal(np.asarray(img), before)


def test_no_torchvision_import():
    import ldmclip.transforms as module

    src = Path(module.__file__).read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "torchvision" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "torchvision"
    assert "importlib" not in src and "__import__" not in src


# ----------------------------------------------------------------------------------------------------
# Train transform
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,side", [("RGB", 301), ("RGBA", 224), ("P", 50), ("I;16", 97)])
def test_train_full_crop_equals_eval(mode, side):
    img = make_image(mode, side, side)
    train = TrainTransform(224, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=123)
    expected = EvalTransform(224)(img)
    for _ in range(2):
        assert torch.equal(train(img), expected)


def test_train_seeded_is_deterministic():
    img = make_image("RGB", 400, 300)
    a = TrainTransform(64, scale=(0.08, 1.0), seed=7)
    b = TrainTransform(64, scale=(0.08, 1.0), seed=7)
    outs_a = [a(img) for _ in range(4)]
    outs_b = [b(img) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[1])  # the stream advances
    c = TrainTransform(64, scale=(0.08, 1.0), generator=torch.Generator().manual_seed(7))
    assert torch.equal(c(img), outs_a[0])
    d = TrainTransform(64, scale=(0.08, 1.0), seed=8)
    assert not torch.equal(d(img), outs_a[0])
    with pytest.raises(ValueError):
        TrainTransform(64, seed=1, generator=torch.Generator())


def test_train_matches_openclip_with_global_rng(open_clip):
    ref = open_clip.image_transform(96, is_train=True)
    ours = TrainTransform(96)  # generator=None: global torch RNG, like torchvision
    for k, (w, h) in enumerate([(225, 301), (37, 500), (96, 96), (640, 480)]):
        img = make_image("RGBA", w, h)
        torch.manual_seed(k)
        r = ref(img)
        torch.manual_seed(k)
        o = ours(img)
        assert torch.equal(r, o)


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (0.5, 0.5)])
@pytest.mark.parametrize("wh", [(300, 400), (640, 480), (224, 224), (50, 61)])
def test_train_crop_params_in_range(scale, wh):
    width, height = wh
    t = TrainTransform(224, scale=scale, seed=0)
    ratio = t.ratio
    for _ in range(300):
        top, left, h, w = t.get_params(width, height)
        assert 0 < h <= height and 0 < w <= width
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # w, h are rounded from the sampled area/aspect; allow half a pixel each way.
        area = width * height
        assert scale[0] * area - (w + h) / 2 - 1 <= w * h <= scale[1] * area + (w + h) / 2 + 1
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]


def test_train_fallback_center_crop():
    # 1000x13: no random box fits, so torchvision's fallback (centre crop at the max ratio) is used.
    t = TrainTransform(224, seed=0)
    assert t.get_params(1000, 13) == (0, (1000 - 17) // 2, 13, 17)
    assert t.get_params(13, 1000) == ((1000 - 17) // 2, 0, 17, 13)
    out = t(make_image("L", 1000, 13))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_train_reseeds_per_dataloader_worker(monkeypatch):
    img = make_image("RGB", 300, 200)
    t = TrainTransform(32, scale=(0.08, 1.0), seed=3)
    main = TrainTransform(32, scale=(0.08, 1.0), seed=3)(img)
    outs = []
    for worker_seed in (100, 101):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda s=worker_seed: SimpleNamespace(seed=s))
        outs.append(t(img))
    assert not torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], main)


def test_train_mode_conversion_after_crop():
    img = make_image("CMYK", 80, 90)
    out = TrainTransform(48, seed=0)(img)
    assert out.shape == (3, 48, 48) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------
# Config and factory
# ----------------------------------------------------------------------------------------------------

def test_constants_match_openclip(open_clip):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    assert OPENAI_MEAN == OPENAI_DATASET_MEAN and OPENAI_STD == OPENAI_DATASET_STD


def test_config_dict_roundtrip_with_openclip(open_clip):
    from dataclasses import asdict
    from open_clip.transform import PreprocessCfg

    ours = PreprocessConfig()
    d = ours.to_dict()
    assert d == {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(PreprocessCfg()).items()}
    assert PreprocessConfig.from_dict(json.loads(json.dumps(d))) == ours
    assert PreprocessConfig.from_dict(asdict(PreprocessCfg())) == ours
    PreprocessCfg(**d)  # accepted by OpenCLIP

    custom = PreprocessConfig(image_size=336, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                              resize_mode="squash", fill_color=10)
    assert PreprocessConfig.from_dict(custom.to_dict()) == custom
    # what push_to_hf_hub writes (no size) and pretrained-tag cfgs with extra keys
    hub = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}
    assert PreprocessConfig.from_dict(hub) == PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3,
                                                               resize_mode="squash")
    assert PreprocessConfig.from_dict({"url": "", "hf_hub": "x/y", "size": [384, 384], "mean": None}) == \
        PreprocessConfig(image_size=384)


@pytest.mark.parametrize("bad", [{"size": [224, 256]}, {"interpolation": "lanczos"}, {"resize_mode": "crop"},
                                 {"mean": [0.1, 0.2]}, {"mode": "L"}, {"std": [0, 1, 1]}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict(bad)


def test_factory(open_clip):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="longest",
                           fill_color=128)
    ev = image_transform(cfg, is_train=False)
    assert isinstance(ev, EvalTransform) and ev.resize_mode == "longest"
    img = make_image("P", 120, 45)
    _assert_same(image_transform_v2(PreprocessCfg(**cfg.to_dict()), is_train=False)(img), ev(img), size=64)
    tr = image_transform(cfg, is_train=True, seed=0)
    assert isinstance(tr, TrainTransform) and tr.scale == (0.9, 1.0) and tr.interpolation == "bicubic"
    assert tr(img).shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------

def _jpeg_bytes(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_load_image_exact_by_default(tmp_path):
    data = _jpeg_bytes(1200, 900)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for src in (data, path, str(path)):
        img = load_image(src, 224)
        assert img.size == (1200, 900) and np.array_equal(np.asarray(img), ref)


def test_load_image_fast_draft():
    data = _jpeg_bytes(1200, 900)
    fast = load_image(data, 224, fast=True)
    assert fast.mode == "RGB" and fast.size == (300, 225)  # 1/4 scale, both sides still >= 224
    exact = EvalTransform(224)(load_image(data))
    approx = EvalTransform(224)(fast)
    assert (approx - exact).abs().mean().item() < 0.05
    # not at least 2x larger than needed: decoded at full size
    assert load_image(_jpeg_bytes(400, 300), 224, fast=True).size == (400, 300)
    # PNG: no draft
    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(buf, format="PNG")
    assert load_image(buf.getvalue(), 224, fast=True).size == (1000, 1000)


def test_load_image_fast_real_jpeg():
    path = _flickr_jpegs(1)[0]
    full = load_image(path)
    fast = load_image(path, 64, fast=True)
    assert min(fast.size) >= 64 and fast.size[0] <= full.size[0]
    if min(full.size) >= 128:
        assert fast.size[0] < full.size[0]


def test_load_image_decompression_bomb(monkeypatch):
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, format="PNG")
    data = buf.getvalue()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: PIL warns -> ValueError
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 > 2 * 700: PIL raises -> ValueError
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(data).size == (40, 40)
    with pytest.raises(TypeError):
        load_image(12345)


@pytest.mark.parametrize("mean, std", [((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                                       ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.1, 0.7, 0.3), (0.9, 0.05, 1.7))])
def test_normalisation_equals_torchvision_ops_for_every_uint8_value(mean, std):
    from ldmclip.transforms import _Normalize

    v = np.arange(256)
    pixels = np.stack([v, 255 - v, (7 * v) % 256], -1)[None]  # each channel takes all 256 values
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    chw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    # torchvision's ToTensor + Normalize, written out
    expected = chw.to(torch.float32).div(255).sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))
    assert torch.equal(_Normalize(mean, std)(img), expected)


def test_load_image_checks_the_file_before_reading_it(tmp_path, monkeypatch):
    from ldmclip.core import reading

    (tmp_path / "folder.jpg").mkdir()  # a FIFO is the same case (tests/data/test_samples.py, in a child)
    with pytest.raises(reading.NotARegularFile, match="folder.jpg is a directory"):
        load_image(tmp_path / "folder.jpg")
    data = _jpeg_bytes(40, 30)
    (tmp_path / "a.jpg").write_bytes(data)
    monkeypatch.setattr(reading, "MAX_IMAGE_BYTES", len(data) - 1)
    with pytest.raises(reading.FileTooLarge, match="a.jpg holds"):
        load_image(tmp_path / "a.jpg")
    with pytest.raises(reading.FileTooLarge):
        load_image(data)
    monkeypatch.setattr(reading, "MAX_IMAGE_BYTES", None)
    assert load_image(tmp_path / "a.jpg").size == (40, 30)


def test_load_image_refuses_an_absurd_resize_before_decoding():
    from ldmclip.transforms import MAX_ASPECT_RATIO, resize_problem

    buf = io.BytesIO()
    Image.new("L", (1, 20000)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (1, 20000)  # no target size: nothing is resized
    with pytest.raises(ValueError, match="decompression bomb.*aspect ratio of 20000:1"):
        load_image(buf.getvalue(), 224)
    assert resize_problem(MAX_ASPECT_RATIO, 1, 224) is None
    assert "aspect ratio" in resize_problem(MAX_ASPECT_RATIO + 1, 1, 224)
    assert resize_problem(20000, 1, None) is None
