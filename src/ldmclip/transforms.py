"""CLIP image preprocessing with PIL, numpy and torch only (no torchvision).

The evaluation transform reproduces OpenCLIP 3.3.0's ``image_transform(size, is_train=False, ...)``
(torchvision ``Resize`` -> ``CenterCrop`` -> ``convert('RGB')`` -> ``ToTensor`` -> ``Normalize`` on a PIL
image) operation by operation, so its output is bit-identical for every PIL mode that OpenCLIP accepts:

* the output size of the resize uses torchvision's arithmetic (``int(size * long / short)`` for the long
  side, Python's ``round`` for ``resize_mode='longest'``), the resize itself is ``PIL.Image.resize`` on the
  image in its original mode (torchvision's PIL path always antialiases; PIL resizes ``RGBA``/``LA`` in
  premultiplied alpha and modes ``P``/``1`` with nearest neighbour), and it is skipped when the size does
  not change, as torchvision skips it;
* the centre crop offset is ``int(round((in - out) / 2))`` (round half to even), with torchvision's
  zero padding (OpenCLIP's ``fill_color`` in ``'longest'`` mode) when the image is smaller than the crop;
* the image is converted to RGB only *after* resizing and cropping, as OpenCLIP does (this matters: an
  ``RGBA`` image is resized with its alpha, a ``P`` image is resized on palette indices);
* ``/255`` and the normalisation give torchvision's float32 values exactly (the same correctly rounded
  float32 divide and subtract, in the same order, done in numpy per colour plane).

The training transform is torchvision's ``RandomResizedCrop`` (``get_params``: 10 attempts, then a
centre-crop fallback) followed by the same RGB conversion, ``/255`` and normalisation. It draws its random
numbers with the same torch calls as torchvision, so with ``generator=None`` it consumes the global torch
RNG exactly like OpenCLIP's training transform and gives the same crops for the same seed.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps, JpegImagePlugin

from .core import reading

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "PreprocessConfig",
    "EvalTransform",
    "TrainTransform",
    "image_transform",
    "load_image",
    "resize_problem",
    "MAX_ASPECT_RATIO",
]

# Normalisation constants, under OpenCLIP's names too (open_clip/constants.py): OpenAI's CLIP data, ImageNet,
# and Inception-style [-1, 1].
OPENAI_MEAN = OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}
_RESIZE_MODES = ("shortest", "longest", "squash")

# Keys of OpenCLIP's ``PreprocessCfg`` (the ``preprocess_cfg`` entry of ``open_clip_config.json``).
_OPENCLIP_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3  # OpenCLIP accepts a scalar mean/std and repeats it
    try:
        out = tuple(float(v) for v in value)
    except TypeError as e:
        raise ValueError(f"{name} must be a number or a sequence of 3 numbers, got {value!r}") from e
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(out)}: {value!r}")
    return out  # type: ignore[return-value]


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, (list, tuple)):
        if len(image_size) == 1:
            image_size = image_size[0]
        elif len(image_size) == 2 and image_size[0] == image_size[1]:
            image_size = image_size[0]
        else:
            raise ValueError(f"only square image sizes are supported, got {tuple(image_size)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    return interpolation


def _check_resize_mode(resize_mode: str) -> str:
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
    return resize_mode


@dataclass
class PreprocessConfig:
    """Image preprocessing settings, serialised with OpenCLIP's ``preprocess_cfg`` key names.

    ``fill_color`` is the padding value of ``resize_mode='longest'`` (OpenCLIP's ``fill_color``).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        self.image_size = _check_size(self.image_size)
        self.mean = _three_floats("mean", self.mean)
        self.std = _three_floats("std", self.std)
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain zeros, got {self.std}")
        self.interpolation = _check_interpolation(self.interpolation)
        self.resize_mode = _check_resize_mode(self.resize_mode)
        if isinstance(self.fill_color, bool) or not isinstance(self.fill_color, (int, np.integer)):
            raise ValueError(f"fill_color must be an int, got {self.fill_color!r}")
        self.fill_color = int(self.fill_color)

    def to_dict(self) -> dict[str, Any]:
        """OpenCLIP ``PreprocessCfg`` dict (``size``, ``mode``, ``mean``, ``std``, ``interpolation``,
        ``resize_mode``, ``fill_color``); JSON-serialisable."""
        return {
            "size": self.image_size,
            "mode": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        """Build from an OpenCLIP ``preprocess_cfg`` dict (or a pretrained-tag cfg dict).

        Like OpenCLIP's ``merge_preprocess_dict``, keys that are not preprocessing keys (``url``,
        ``hf_hub``, ...) are ignored and ``None`` values keep the default. ``image_size`` is accepted as
        an alias of ``size``. ``size`` may be an int or a square ``[n, n]``.
        """
        kw: dict[str, Any] = {}
        size = d.get("size")
        if size is None:
            size = d.get("image_size")
        if size is not None:
            kw["image_size"] = size
        mode = d.get("mode")
        if mode is not None and mode != "RGB":
            raise ValueError(f"only mode='RGB' is supported (as in OpenCLIP), got {mode!r}")
        for key in ("mean", "std", "interpolation", "resize_mode", "fill_color"):
            if d.get(key) is not None:
                kw[key] = d[key]
        return cls(**kw)


# ----------------------------------------------------------------------------------------------------
# PIL building blocks (same arithmetic as torchvision's PIL path)
# ----------------------------------------------------------------------------------------------------

def _check_image(img: Any) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"cannot preprocess an empty image (size {w}x{h})")
    return img


def _resize(img: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    """torchvision ``F.resize(pil, [h, w])``: no-op when the size is unchanged, else ``PIL.resize``."""
    if (img.height, img.width) == (height, width):
        return img
    if height <= 0 or width <= 0:
        raise ValueError(
            f"resizing a {img.width}x{img.height} image gives an empty {width}x{height} image "
            "(aspect ratio too extreme)")
    return img.resize((width, height), resample)


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for an int size; returns (h, w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def _pad(img: Image.Image, ltrb: tuple[int, int, int, int], fill: int | float) -> Image.Image:
    """torchvision ``F.pad(pil, ltrb, fill, 'constant')``."""
    channels = len(img.getbands())
    value: Any = fill
    if channels > 1:
        value = (fill,) * channels
    if img.mode != "F":
        value = tuple(int(v) for v in value) if isinstance(value, tuple) else int(value)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=ltrb, fill=value)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=ltrb, fill=value)


def _center_crop(img: Image.Image, size: int, fill: int | float = 0) -> Image.Image:
    """torchvision ``F.center_crop`` / OpenCLIP ``center_crop_or_pad`` for a square crop."""
    width, height = img.size
    if size > width or size > height:
        ltrb = (
            (size - width) // 2 if size > width else 0,
            (size - height) // 2 if size > height else 0,
            (size - width + 1) // 2 if size > width else 0,
            (size - height + 1) // 2 if size > height else 0,
        )
        img = _pad(img, ltrb, fill)
        width, height = img.size
        if width == size and height == size:
            return img
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {img.mode!r} to RGB: {e}") from e


class _Normalize:
    """``ToTensor`` + ``Normalize`` for an RGB uint8 PIL image, in numpy on the image's own planes.

    torchvision computes ``x.to(float32).div(255).sub_(mean).div_(std)``; numpy's float32 divide and
    subtract are the same correctly rounded IEEE operations in the same order, so the result is
    bit-identical (tested on all 256 values of each channel) without running torch kernels (or their
    intra-op thread pool) per image. Working per PIL band (contiguous planes) is ~2x faster than a
    per-value lookup table or strided HWC views.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = _three_floats("mean", mean)
        self.std = _three_floats("std", std)
        # float32 constants, as torchvision's torch.as_tensor(mean, dtype=float32)
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        if bool((self._std == 0).any()):
            raise ValueError(f"std evaluated to zero in float32: {self.std}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out = np.empty((3, img.height, img.width), dtype=np.float32)
        self.into(img, out)
        return torch.from_numpy(out)

    def into(self, img: Image.Image, out: np.ndarray) -> None:
        """Write the normalised ``img`` into ``out`` (float32 ``[3, H, W]``, e.g. one image of a batch)."""
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
        for c, band in enumerate(img.split()):
            plane = out[c]  # one plane at a time: it stays in cache for the three passes
            np.divide(np.asarray(band), np.float32(255), out=plane, dtype=np.float32)
            plane -= self._mean[c]
            plane /= self._std[c]


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------

class _CLIPTransform:
    """What both transforms share: ``resize_and_crop`` (defined by each) -> RGB -> tensor -> normalise.

    With ``defer_normalize = True`` the transform stops at the RGB ``S x S`` PIL image and
    ``ImageTextCollator(normalizer=transform.normalizer)`` normalises a whole batch straight into
    one tensor: no float32 copy per image and no stacking copy (the same values, bit for bit).
    """

    _normalize: _Normalize
    defer_normalize: bool = False

    @property
    def normalizer(self) -> _Normalize:
        """The ``ToTensor`` + ``Normalize`` step, with ``into(img, out)`` to fill a batch slot."""
        return self._normalize

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        raise NotImplementedError

    @property
    def mean(self) -> tuple[float, float, float]:
        return self._normalize.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self._normalize.std

    def __call__(self, img: Image.Image) -> torch.Tensor | Image.Image:
        rgb = _to_rgb(self.resize_and_crop(img))
        return rgb if self.defer_normalize else self._normalize(rgb)


class EvalTransform(_CLIPTransform):
    """Deterministic CLIP preprocessing: PIL image (any mode) -> float32 tensor ``[3, S, S]``.

    Equal to OpenCLIP's ``image_transform(image_size, is_train=False, mean=..., std=...,
    resize_mode=..., interpolation=..., fill_color=...)``.

    resize_mode:
        ``'shortest'``: resize the shorter side to ``image_size`` then centre crop;
        ``'longest'``: resize the longer side to ``image_size`` then centre pad with ``fill_color``;
        ``'squash'``: resize to ``image_size x image_size`` ignoring the aspect ratio.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        fill_color: int = 0,
    ) -> None:
        self.image_size = _check_size(image_size)
        self.interpolation = _check_interpolation(interpolation)
        self.resize_mode = _check_resize_mode(resize_mode)
        self.fill_color = fill_color
        self._resample = _INTERPOLATIONS[self.interpolation]
        self._normalize = _Normalize(mean, std)

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: PIL image in its original mode -> ``S x S`` PIL image, same mode."""
        img = _check_image(img)
        size = self.image_size
        if self.resize_mode == "shortest":
            new_h, new_w = _shortest_side_size(img.width, img.height, size)
            img = _resize(img, new_h, new_w, self._resample)
            return _center_crop(img, size, fill=0)
        if self.resize_mode == "longest":
            # OpenCLIP ResizeKeepRatio(longest=1): scale by the larger of h/S, w/S, Python round().
            ratio = max(img.height / size, img.width / size)
            new_h, new_w = round(img.height / ratio), round(img.width / ratio)
            img = _resize(img, new_h, new_w, self._resample)
            return _center_crop(img, size, fill=self.fill_color)
        return _resize(img, size, size, self._resample)  # squash

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"interpolation={self.interpolation!r}, resize_mode={self.resize_mode!r}, "
                f"fill_color={self.fill_color})")


class TrainTransform(_CLIPTransform):
    """CLIP training augmentation: ``RandomResizedCrop`` -> RGB -> tensor -> normalise.

    The crop parameters follow torchvision's ``RandomResizedCrop.get_params`` (10 attempts with a random
    area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a centre-crop fallback)
    and are drawn with the same torch calls, from ``generator``:

    * ``generator=None`` and ``seed=None``: the global torch RNG, exactly as OpenCLIP/torchvision do
      (``torch.manual_seed`` reproduces OpenCLIP's crops; DataLoader seeds it per worker);
    * ``seed=n`` or ``generator=g``: a private ``torch.Generator``. Inside a DataLoader worker a private
      generator is replaced by one seeded from the generator's initial seed and the worker's seed, so
      workers do not all produce the same crops.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: str = "bicubic",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        self.image_size = _check_size(image_size)
        scale = (float(scale[0]), float(scale[1]))
        ratio = (float(ratio[0]), float(ratio[1]))
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}")
        self.scale = scale
        self.ratio = ratio
        self.interpolation = _check_interpolation(interpolation)
        self._resample = _INTERPOLATIONS[self.interpolation]
        self._normalize = _Normalize(mean, std)
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator
        self._log_ratio = torch.log(torch.tensor(self.ratio))  # float32, as torchvision
        self._worker_key: int | None = None
        self._worker_generator: torch.Generator | None = None
        self._sample_generator: torch.Generator | None = None

    def seed_sample(self, sample_seed: int) -> None:
        """Draw the next crop from a generator seeded by ``sample_seed`` (with the transform's own seed)
        instead of the running stream: a stream that knows each sample's position (webdataset shards, on
        an exact resume) then crops a sample the same however many came before it in this process."""
        base = self.generator.initial_seed() if self.generator is not None else 0
        self._sample_generator = torch.Generator().manual_seed((base * 1_000_003 + int(sample_seed)) % (2 ** 63))

    def _rng(self) -> torch.Generator | None:
        if self._sample_generator is not None:
            return self._sample_generator
        if self.generator is None:
            return None
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.generator
        if self._worker_key != info.seed or self._worker_generator is None:
            seed = (self.generator.initial_seed() * 1_000_003 + info.seed) % (2 ** 63)
            self._worker_generator = torch.Generator().manual_seed(seed)
            self._worker_key = info.seed
        return self._worker_generator

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Crop box ``(top, left, height, width)`` for an image of ``width x height``."""
        if width <= 0 or height <= 0:
            raise ValueError(f"cannot crop an empty image (size {width}x{height})")
        g = self._rng()
        area = height * width
        lo, hi = self._log_ratio[0], self._log_ratio[1]
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """Random crop + resize to ``S x S``; PIL image in its original mode."""
        img = _check_image(img)
        top, left, h, w = self.get_params(img.width, img.height)
        img = img.crop((left, top, left + w, top + h))
        return _resize(img, self.image_size, self.image_size, self._resample)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


def image_transform(
    image_size: PreprocessConfig | int | tuple[int, int] | None = None,
    is_train: bool = False,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    resize_mode: str | None = None,
    interpolation: str | None = None,
    fill_color: int = 0,
    aug_cfg: Mapping[str, Any] | Any | None = None,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    generator: torch.Generator | None = None,
    seed: int | None = None,
    defer_normalize: bool = False,
) -> EvalTransform | TrainTransform:
    """The transform OpenCLIP builds, in either of its two forms:

    * ``image_transform(cfg: PreprocessConfig, is_train)``: OpenCLIP's ``image_transform_v2(cfg, is_train)``;
    * ``image_transform(image_size, is_train, mean=None, std=None, resize_mode=None, interpolation=None,
      fill_color=0, aug_cfg=None)``: OpenCLIP's ``image_transform`` (``None`` means OpenAI's mean/std,
      bicubic, ``'shortest'``). Of ``aug_cfg`` (a dict or an object with those attributes) only ``scale``
      is implemented; any other augmentation it sets is refused rather than silently left out.

    Training, like OpenCLIP, always crops with bicubic interpolation and ignores ``resize_mode`` and
    ``interpolation``; ``scale``/``generator``/``seed`` only apply to training. ``defer_normalize``:
    return RGB PIL images and normalise in ``ImageTextCollator`` (see ``_CLIPTransform``).
    """
    if isinstance(image_size, PreprocessConfig) or image_size is None:
        cfg = image_size if image_size is not None else PreprocessConfig()
    else:
        cfg = PreprocessConfig.from_dict({"size": image_size, "mean": mean, "std": std, "resize_mode": resize_mode,
                                          "interpolation": interpolation, "fill_color": fill_color})
        scale = _aug_scale(aug_cfg, scale)
    transform: EvalTransform | TrainTransform
    if is_train:
        transform = TrainTransform(cfg.image_size, cfg.mean, cfg.std, scale=scale, interpolation="bicubic",
                                   generator=generator, seed=seed)
    else:
        transform = EvalTransform(cfg.image_size, cfg.mean, cfg.std, interpolation=cfg.interpolation,
                                  resize_mode=cfg.resize_mode, fill_color=cfg.fill_color)
    transform.defer_normalize = defer_normalize
    return transform


# OpenCLIP ``AugmentationCfg`` fields beyond ``scale`` (timm's augmentations, colour jitter, grey scale)
_UNSUPPORTED_AUGMENTATIONS = ("ratio", "color_jitter", "re_prob", "re_count", "use_timm", "color_jitter_prob",
                              "gray_scale_prob")


def _aug_scale(aug_cfg: Mapping[str, Any] | Any | None, default: tuple[float, float]) -> tuple[float, float]:
    """The crop ``scale`` of an OpenCLIP ``aug_cfg``; a clear error for the augmentations not implemented."""
    if aug_cfg is None:
        return default
    values = dict(aug_cfg) if isinstance(aug_cfg, Mapping) else vars(aug_cfg)
    used = [key for key in _UNSUPPORTED_AUGMENTATIONS if values.get(key)]
    unknown = sorted(set(values) - {"scale", *_UNSUPPORTED_AUGMENTATIONS})
    if used or unknown:
        raise ValueError(f"aug_cfg: only 'scale' is implemented (RandomResizedCrop), got {used + unknown}")
    return tuple(values["scale"]) if values.get("scale") is not None else default


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------

# Longer side / shorter side above which an image is refused: resizing its short side to the model's
# size makes a strip of tens of millions of pixels (a 165-byte 1x20000 PNG at 224 px: 4.6 GB, 16 s)
# of which the centre crop keeps a sliver. Real panoramas and banners stay well under 1:20.
MAX_ASPECT_RATIO = 100


def resize_problem(width: int, height: int, target_size: int | None) -> str | None:
    """Why an image of ``width x height`` must not be resized to ``target_size`` (a decompression bomb
    counted at the size it will be used), or ``None`` when it is fine (always with no ``target_size``).

    The bound is the shortest-side resize of ``EvalTransform`` (the largest result of every mode): it
    holds ``S * S * long / short`` pixels, which must stay under ``PIL.Image.MAX_IMAGE_PIXELS``; and the
    aspect ratio must stay under ``MAX_ASPECT_RATIO``.
    """
    if target_size is None:
        return None
    short, long = sorted((max(1, width), max(1, height)))
    if MAX_ASPECT_RATIO is not None and long > MAX_ASPECT_RATIO * short:
        return (f"a {width}x{height} image has an aspect ratio of {long / short:.0f}:1, over "
                f"ldmclip.transforms.MAX_ASPECT_RATIO ({MAX_ASPECT_RATIO}:1)")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        resized = target_size * target_size * long / short
        if resized > limit:
            return (f"resizing a {width}x{height} image to {target_size} px gives {resized:.0f} pixels, over "
                    f"the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    return None


def _encoded(source: Any) -> tuple[bytes, str]:
    """The encoded bytes of a path (through the one checked read: regular files only, at most
    ``ldmclip.core.reading.MAX_IMAGE_BYTES``) or of bytes (same limit), and a name for messages."""
    limit = reading.image_byte_limit()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if limit is not None and len(source) > limit:
            raise reading.FileTooLarge(f"<{len(source)} bytes> of image data, over the limit of {limit}")
        return bytes(source), f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return reading.read_regular_file(source, limit), os.fsdecode(source)
    raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")


def _open_drafted_jpeg(data: bytes, target_size: int | None) -> Image.Image | None:
    """A JPEG over the pixel limit opened at the smallest libjpeg scale (1/2, 1/4, 1/8) that brings it
    under the limit and keeps its short side at least ``target_size``; ``None`` when no scale does.
    Only images that would otherwise be refused get here, so no accepted image changes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or data[:3] != b"\xff\xd8\xff":
        return None
    img = JpegImagePlugin.jpeg_factory(io.BytesIO(data))  # Image.open would refuse it outright
    width, height = img.size
    for scale in (2, 4, 8):
        w, h = -(-width // scale), -(-height // scale)
        if target_size is not None and min(w, h) < target_size:
            break
        if w * h <= limit:
            img.draft(img.mode, (width // scale, height // scale))
            if img.width * img.height <= limit:
                return img
            break
    img.close()
    return None


def load_image(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    target_size: int | None = None,
    *,
    fast: bool = False,
) -> Image.Image:
    """Open and fully decode an image (path or encoded bytes), keeping its mode (no RGB conversion,
    no EXIF rotation: the transforms do what OpenCLIP does with the result).

    A path is read through ``ldmclip.core.reading.read_regular_file``: a FIFO, socket, device or
    directory raises ``NotARegularFile`` (without blocking) and a file over
    ``ldmclip.core.reading.MAX_IMAGE_BYTES`` raises ``FileTooLarge`` without being read (encoded bytes
    over the limit too).

    ``fast=True`` with a ``target_size`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when both
    sides stay at least ``target_size`` (``Image.draft``), i.e. when the image is at least twice as large
    as needed. That is several times faster on big photos but changes the pixels (DCT-domain
    downscaling), so it is off by default.

    Images above ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb limit; set it to
    ``None`` to disable) raise ``ValueError``, except JPEGs that libjpeg can decode at a reduced scale
    under the limit (and, with ``target_size``, at least that large): those decode small. With
    ``target_size``, images whose resize to that size would be absurd (``resize_problem``: the resized
    pixels over the limit, or an aspect ratio over ``MAX_ASPECT_RATIO``) raise ``ValueError`` too,
    before they are decoded.
    """
    if target_size is not None:
        target_size = _check_size(target_size)
    data, name = _encoded(source)
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and img.width * img.height > limit:
                    # Same test as PIL's warning, in case another thread changed the warning filters.
                    raise Image.DecompressionBombWarning(
                        f"Image size ({img.width * img.height} pixels) exceeds limit of {limit} pixels")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                if img is not None:
                    img.close()
                img = _open_drafted_jpeg(data, target_size)
                if img is None:
                    raise
            problem = resize_problem(img.width, img.height, target_size)
            if problem is not None:
                raise Image.DecompressionBombError(problem)
            if fast and target_size is not None and img.format == "JPEG":
                if min(img.width, img.height) >= 2 * target_size:
                    img.draft("RGB", (target_size, target_size))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if img is not None:
            img.close()
        raise ValueError(
            f"refusing to decode {name}: possible decompression bomb ({e}). "
            "Raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) if the image is trusted.") from e
    except BaseException:
        if img is not None:
            img.close()
        raise
    return img
