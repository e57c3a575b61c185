"""The embedded synthetic dataset: procedurally drawn, captioned scenes of coloured shapes.

No download, generated on the fly, deterministic from a seed. It is the default training data of
``ldmclip train`` and the zero-shot / retrieval benchmark that shows a small CLIP learned something.

Scenes
    A background (a plain or gradient, low-saturation mid-tone colour, sometimes with light noise)
    and one or two objects. Each object has a colour (``COLOURS``), a shape (``SHAPES``), a size
    (``"small"`` / ``"large"``), a named position (``"left"``, ``"right"``, ``"top"``, ``"bottom"``,
    ``"center"``) and a small random rotation and colour jitter. Two-object scenes put the objects side
    by side or one above the other and carry a relation (``"left of"``, ``"right of"``, ``"above"``,
    ``"below"``, always read as "``objects[0]`` is <relation> ``objects[1]``").

Captions
    Drawn from varied templates ("a red circle", "a photo of a large blue square on the left",
    "there is a small green triangle above a yellow star", "purple cross and white ring."), sometimes
    leaving out the size, the position, the relation and, rarely, the colour or the shape of a single
    object. Every caption word that names a colour / shape / size / position / relation is true of the
    drawn scene; :class:`Scene` records which attributes each caption mentions.

Held-out compositions
    ``HELD_OUT_PAIRS`` (one colour for each shape, six colours in all: 6 of the 48 colour x shape
    pairs) never occur in the ``'train'`` split, in either object of a scene; every colour and every
    shape still occurs there with other partners. ``'val'`` and ``'test'`` draw from all 48 pairs.

Determinism
    ``SyntheticScenes(...)[i]`` depends only on ``(seed, split, i)`` -- not on ``image_size``, the
    order of access, the worker process or any global RNG: the scene is drawn from
    ``numpy.random.default_rng([seed, split_id, i])`` and its geometry is stored in fractions of the
    image side, so the same scene can be rendered at any size.

Rendering is plain PIL: each object is drawn as a 2x-supersampled mask (anti-aliased edges) and pasted
in a solid colour over the background. One core renders several thousand 64 px images a second
(``python -m ldmclip.data.synthetic`` prints the throughput and can write a sample grid).

Training note: the captions state left/right/top/bottom, so augmentations that flip or crop the image
(``RandomResizedCrop``, horizontal flips) make them wrong; train with the evaluation transform (plain
resize to the model's size + normalisation). The data itself is endlessly varied.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "RELATIONS",
    "ALL_PAIRS",
    "HELD_OUT_PAIRS",
    "SEEN_PAIRS",
    "SPLITS",
    "Background",
    "SceneObject",
    "Scene",
    "render_scene",
    "SyntheticScenes",
    "SyntheticZeroShot",
    "zero_shot_templates",
    "synthetic_retrieval_pairs",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

#: Nominal RGB of each colour name; objects are drawn within +-_COLOUR_JITTER of it per channel.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
#: Relation of ``objects[0]`` to ``objects[1]`` in a two-object scene.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
#: Never drawn in the 'train' split: one colour per shape, each colour at most once.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("orange", "ring"),
    ("yellow", "square"),
    ("green", "star"),
    ("blue", "cross"),
    ("purple", "circle"),
)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

#: Index streams: the split id is the second entry of the per-index RNG seed.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_ZERO_SHOT_STREAM = 3

# Caption words (the tests use these tables to check captions against scenes).
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_PREFIXES: tuple[str, ...] = (
    "", "", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "a rendering of ",
    "there is ", "this is ",
)
_GENERIC_NOUNS: tuple[str, ...] = ("shape", "object")

# Geometry, in fractions of the image side.
_SIZE_RANGES = {"small": (0.10, 0.13), "large": (0.17, 0.20)}   # object "radius"
_POSITION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
                     "center": (0.5, 0.5)}
_POSITION_JITTER = 0.04
_PAIR_NEAR, _PAIR_FAR, _PAIR_JITTER, _PAIR_CROSS_JITTER = 0.26, 0.74, 0.02, 0.12
_MAX_ROTATION = 15.0      # degrees, for the polygonal shapes
_COLOUR_JITTER = 15       # per channel
# 0.15 rather than 0.4: with fewer two-object scenes the default 1,000-step demo learns shapes sooner
# (zero-shot 54% vs 41-44% over four runs at 0.4), and every batch still holds about ten relation scenes.
_TWO_OBJECT_PROB = 0.15


# --------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Background:
    kind: str                       # "plain" | "vertical" | "horizontal" (gradient direction)
    rgb0: tuple[int, int, int]      # colour at top / left (the only colour when plain)
    rgb1: tuple[int, int, int]      # colour at bottom / right
    noise: int                      # amplitude of per-pixel noise (at most 10), 0 = none
    noise_offset: tuple[float, float]   # where the image's window lies in the fixed noise tile


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str                       # "small" | "large"
    position: str                   # one of POSITIONS
    center: tuple[float, float]     # (x, y), fractions of the image side
    radius: float                   # fraction of the image side
    rotation: float                 # degrees (0 for circle and ring)
    rgb: tuple[int, int, int]       # the drawn colour (COLOUR_RGB[colour] + jitter)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Everything used to draw and caption one sample."""

    background: Background
    objects: tuple[SceneObject, ...]
    relation: Optional[str]         # objects[0] <relation> objects[1]; None for one object
    caption: str
    #: per object, the attributes the caption mentions: subset of {"colour","shape","size","position"}
    mentioned: tuple[frozenset, ...]
    #: order in which the caption names the objects (indices into ``objects``)
    caption_order: tuple[int, ...]
    #: the relation as the caption states it (first-named <rel> second-named), None if not stated
    caption_relation: Optional[str]


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------

class _Draws:
    """Uniform numbers from a numpy Generator, drawn in blocks (numpy's per-call overhead dominates)."""

    __slots__ = ("_gen", "_buf", "_pos")

    def __init__(self, gen: np.random.Generator, block: int = 64):
        self._gen = gen
        self._buf = gen.random(block).tolist()
        self._pos = 0

    def random(self) -> float:
        if self._pos == len(self._buf):
            self._buf = self._gen.random(len(self._buf)).tolist()
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return u

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: Optional[int] = None) -> int:
        """An int in [low, high) (or [0, low) with one argument)."""
        if high is None:
            low, high = 0, low
        return low + min(int(self.random() * (high - low)), high - low - 1)


def _choice(rng: _Draws, seq: Sequence[Any]) -> Any:
    return seq[rng.integers(len(seq))]


def _sample_background(rng: _Draws) -> Background:
    def tone() -> tuple[int, int, int]:
        grey = rng.integers(80, 176)
        return tuple(min(185, max(70, grey + rng.integers(-15, 16))) for _ in range(3))

    kind = _choice(rng, ("plain", "plain", "vertical", "horizontal"))
    rgb0 = tone()
    rgb1 = tone() if kind != "plain" else rgb0
    noise = rng.integers(3, 11) if rng.random() < 0.5 else 0
    noise_offset = (rng.random(), rng.random())
    return Background(kind, rgb0, rgb1, noise, noise_offset)


def _sample_object(rng: _Draws, pair: tuple[str, str], position: str,
                   center: Optional[tuple[float, float]] = None) -> SceneObject:
    colour, shape = pair
    size = _choice(rng, SIZES)
    lo, hi = _SIZE_RANGES[size]
    radius = rng.uniform(lo, hi)
    if center is None:
        cx, cy = _POSITION_CENTRES[position]
        center = (cx + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER),
                  cy + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER))
    rotation = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION) if shape not in ("circle", "ring") else 0.0
    rgb = tuple(min(255, max(0, v + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1))) for v in COLOUR_RGB[colour])
    return SceneObject(colour, shape, size, position, center, radius, rotation, rgb)


def _sample_pair_layout(rng: _Draws, relation: str) -> tuple[tuple[float, float], tuple[float, float],
                                                                          str, str]:
    """Centres and position names of objects[0] and objects[1] for a relation."""
    near = _PAIR_NEAR + rng.uniform(-_PAIR_JITTER, _PAIR_JITTER)
    far = _PAIR_FAR + rng.uniform(-_PAIR_JITTER, _PAIR_JITTER)
    cross0 = 0.5 + rng.uniform(-_PAIR_CROSS_JITTER, _PAIR_CROSS_JITTER)
    cross1 = 0.5 + rng.uniform(-_PAIR_CROSS_JITTER, _PAIR_CROSS_JITTER)
    if relation == "left of":
        return (near, cross0), (far, cross1), "left", "right"
    if relation == "right of":
        return (far, cross0), (near, cross1), "right", "left"
    if relation == "above":
        return (cross0, near), (cross1, far), "top", "bottom"
    return (cross0, far), (cross1, near), "bottom", "top"        # below


def _with_article(words: list[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def _noun_phrase(rng: _Draws, obj: SceneObject, show: frozenset, article: bool = True,
                 canonical: bool = False) -> str:
    words = []
    if "size" in show:
        words.append(obj.size if canonical else _choice(rng, SIZE_WORDS[obj.size]))
    if "colour" in show:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in show else _choice(rng, _GENERIC_NOUNS))
    return _with_article(words) if article else " ".join(words)


def _finish(rng: _Draws, prefix: str, body: str) -> str:
    text = prefix + body
    return text + "." if rng.random() < 0.3 else text


def _caption_single(rng: _Draws, obj: SceneObject, mode: str) -> tuple[str, frozenset]:
    if mode == "full":
        show = frozenset({"colour", "shape", "size", "position"})
        return f"{_noun_phrase(rng, obj, show, canonical=True)} {POSITION_PHRASES[obj.position][0]}", show
    show = {"colour", "shape"}
    u = rng.random()
    if u < 0.05:
        show.discard("colour")
    elif u < 0.10:
        show.discard("shape")
    if rng.random() < 0.6:
        show.add("size")
    if rng.random() < 0.5:
        show.add("position")
    show = frozenset(show)
    prefix = _choice(rng, _PREFIXES)
    article = bool(prefix) or rng.random() < 0.7
    body = _noun_phrase(rng, obj, show, article=article)
    if "position" in show:
        body += " " + _choice(rng, POSITION_PHRASES[obj.position])
    return _finish(rng, prefix, body), show


def _caption_pair(rng: _Draws, objects: tuple[SceneObject, SceneObject], relation: str,
                  mode: str) -> tuple[str, tuple[frozenset, frozenset], tuple[int, int], Optional[str]]:
    if mode == "full":
        show = frozenset({"colour", "shape", "size"})
        a, b = objects
        text = (f"{_noun_phrase(rng, a, show, canonical=True)} {RELATION_PHRASES[relation][0]} "
                f"{_noun_phrase(rng, b, show, canonical=True)}")
        return text, (show, show), (0, 1), relation
    order = (0, 1) if rng.random() < 0.5 else (1, 0)
    shows = tuple(frozenset({"colour", "shape", "size"} if rng.random() < 0.4 else {"colour", "shape"})
                  for _ in objects)
    first, second = order
    prefix = _choice(rng, _PREFIXES)
    np_first = _noun_phrase(rng, objects[first], shows[first])
    np_second = _noun_phrase(rng, objects[second], shows[second])
    if rng.random() < 0.75:
        stated = relation if order == (0, 1) else INVERSE_RELATION[relation]
        body = f"{np_first} {_choice(rng, RELATION_PHRASES[stated])} {np_second}"
    else:
        stated = None
        body = f"{np_first} and {np_second}"
    return _finish(rng, prefix, body), shows, order, stated


def _sample_scene(rng: _Draws, pairs: Sequence[tuple[str, str]], mode: str = "varied",
                  two_object_prob: float = _TWO_OBJECT_PROB) -> Scene:
    background = _sample_background(rng)
    if rng.random() >= two_object_prob:
        obj = _sample_object(rng, _choice(rng, pairs), _choice(rng, POSITIONS))
        caption, show = _caption_single(rng, obj, mode)
        return Scene(background, (obj,), None, caption, (show,), (0,), None)
    pair0 = _choice(rng, pairs)
    pair1 = _choice(rng, pairs)
    while pair1 == pair0:                       # two objects differ in colour or shape
        pair1 = _choice(rng, pairs)
    relation = _choice(rng, RELATIONS)
    c0, c1, p0, p1 = _sample_pair_layout(rng, relation)
    objects = (_sample_object(rng, pair0, p0, c0), _sample_object(rng, pair1, p1, c1))
    caption, shows, order, stated = _caption_pair(rng, objects, relation, mode)
    return Scene(background, objects, relation, caption, shows, order, stated)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

def _rotated(points: np.ndarray, degrees: float, cx: float, cy: float) -> list[tuple[float, float]]:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return list(zip(x.tolist(), y.tolist()))


def _unit_star() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.05, 1.05 * 0.42)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Unit outlines (radius 1, y down, pointing up), scaled by the object radius when drawn.
_UNIT_POLYGONS = {
    "square": np.array([[-0.78, -0.78], [0.78, -0.78], [0.78, 0.78], [-0.78, 0.78]]),
    "triangle": 1.05 * np.array([[0.0, -1.0], [math.sqrt(3) / 2, 0.5], [-math.sqrt(3) / 2, 0.5]]),
    "star": _unit_star(),
    "cross": np.array([[-0.32, -0.95], [0.32, -0.95], [0.32, -0.32], [0.95, -0.32], [0.95, 0.32], [0.32, 0.32],
                       [0.32, 0.95], [-0.32, 0.95], [-0.32, 0.32], [-0.95, 0.32], [-0.95, -0.32],
                       [-0.32, -0.32]]),
}
_SUPERSAMPLE = 2


_NOISE_TILE_MAX = 10


@functools.lru_cache(maxsize=8)
def _noise_tile(size: int) -> np.ndarray:
    """A fixed 2size x 2size x 3 tile of uniform integer noise in [-10, 10] (the same in every process)."""
    gen = np.random.default_rng([0x5EED, size])
    tile = gen.integers(-_NOISE_TILE_MAX, _NOISE_TILE_MAX + 1, size=(2 * size, 2 * size, 3), dtype=np.int16)
    tile.flags.writeable = False
    return tile


def _background(bg: Background, size: int) -> Image.Image:
    # Tones lie in [70, 185] and noise is at most 10: no clipping is needed.
    if bg.kind == "plain" and not bg.noise:
        return Image.new("RGB", (size, size), bg.rgb0)
    if bg.kind == "plain":
        arr = np.empty((size, size, 3), np.int16)
        arr[...] = bg.rgb0
    else:
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
        line = (np.array(bg.rgb0, np.float32) * (1 - t) + np.array(bg.rgb1, np.float32) * t + 0.5).astype(np.int16)
        arr = np.repeat(line[:, None, :], size, axis=1) if bg.kind == "vertical" else \
            np.repeat(line[None, :, :], size, axis=0)
    if bg.noise:
        tile = _noise_tile(size)
        ox, oy = int(bg.noise_offset[0] * size), int(bg.noise_offset[1] * size)
        arr += tile[oy:oy + size, ox:ox + size] * bg.noise // _NOISE_TILE_MAX
    return Image.frombytes("RGB", (size, size), arr.astype(np.uint8).tobytes())


def _object_mask(obj: SceneObject, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """An anti-aliased 'L' mask of the object and where to paste it (top-left corner)."""
    extent = obj.radius * 1.15 * size
    x0 = max(0, int(math.floor(obj.center[0] * size - extent)))
    y0 = max(0, int(math.floor(obj.center[1] * size - extent)))
    x1 = min(size, int(math.ceil(obj.center[0] * size + extent)))
    y1 = min(size, int(math.ceil(obj.center[1] * size + extent)))
    k = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = (obj.center[0] * size - x0) * k, (obj.center[1] * size - y0) * k
    r = obj.radius * size * k
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(2, round(0.38 * r)))
    else:
        draw.polygon(_rotated(_UNIT_POLYGONS[obj.shape] * r, obj.rotation, cx, cy), fill=255)
    if k > 1:
        mask = mask.reduce(k)
    return mask, (x0, y0)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of ``image_size`` x ``image_size`` (a pure function of its arguments)."""
    image = _background(scene.background, image_size)
    for obj in scene.objects:
        mask, box = _object_mask(obj, image_size)
        image.paste(obj.rgb, box + (box[0] + mask.width, box[1] + mask.height), mask)
    return image


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

def _check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    return image_size


class SyntheticScenes(torch.utils.data.Dataset):
    """Map-style dataset of ``(image, caption)`` pairs; ``ds[i]`` depends only on ``(seed, split, i)``.

    ``split``: ``'train'`` (never draws ``HELD_OUT_PAIRS``), ``'val'`` or ``'test'`` (all pairs, separate
    index streams). ``image`` is a PIL RGB image of ``image_size``\\ :sup:`2`, or ``transform(image)``.
    ``caption_mode``: ``'varied'`` (templates, attributes sometimes left out) or ``'full'`` (one fixed
    template naming size, colour, shape and position / relation of every object).
    """

    def __init__(self, split: str = "train", image_size: int = 64, length: int = 100_000, seed: int = 0,
                 transform: Optional[Callable[[Image.Image], Any]] = None, caption_mode: str = "varied"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if caption_mode not in ("varied", "full"):
            raise ValueError(f"caption_mode must be 'varied' or 'full', got {caption_mode!r}")
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.split = split
        self.image_size = _check_image_size(image_size)
        self.length = int(length)
        self.seed = int(seed)
        self.transform = transform
        self.caption_mode = caption_mode
        self.pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS if split == "train" else ALL_PAIRS

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index out of range for a dataset of length {self.length}")
        return i

    def scene(self, i: int) -> Scene:
        """The structured description of sample ``i`` (what is drawn and what the caption says)."""
        rng = _Draws(np.random.default_rng([self.seed, SPLITS[self.split], self._index(i)]))
        return _sample_scene(rng, self.pairs, self.caption_mode)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        scene = self.scene(i)
        image = render_scene(scene, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, scene.caption

    def __repr__(self) -> str:
        return (f"SyntheticScenes(split={self.split!r}, image_size={self.image_size}, length={self.length}, "
                f"seed={self.seed}, caption_mode={self.caption_mode!r})")


def zero_shot_templates() -> list[str]:
    """Prompt templates for zero-shot classification on :class:`SyntheticZeroShot` (``t.format(classname)``)."""
    return ["a photo of a {}.", "a {}.", "a picture of a {}.", "there is a {}.", "{}."]


class SyntheticZeroShot(torch.utils.data.Dataset):
    """Single-object images of known colour x shape classes, as ``(image, label)``.

    ``classes``: ``'all'`` (48 classes), ``'held_out'`` (the 6 ``HELD_OUT_PAIRS``) or ``'seen'`` (the 42
    others). ``classnames[label]`` is e.g. ``"red circle"``. Sample ``i`` has label ``i % num_classes``
    (so every prefix of the dataset is balanced to within one), ``per_class`` samples per class. Size,
    position, rotation, colour jitter and background vary; the image of the ``k``-th sample of a class
    depends only on ``(seed, colour, shape, k)``, so it is the same whichever ``classes`` subset it is in.
    """

    def __init__(self, image_size: int = 64, per_class: int = 20, seed: int = 1,
                 transform: Optional[Callable[[Image.Image], Any]] = None, classes: str = "all"):
        if classes == "all":
            pairs = ALL_PAIRS
        elif classes == "held_out":
            pairs = HELD_OUT_PAIRS
        elif classes == "seen":
            pairs = SEEN_PAIRS
        else:
            raise ValueError(f"classes must be 'all', 'held_out' or 'seen', got {classes!r}")
        if int(per_class) < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class!r}")
        self.image_size = _check_image_size(image_size)
        self.per_class = int(per_class)
        self.seed = int(seed)
        self.transform = transform
        self.classes = classes
        self.pairs: tuple[tuple[str, str], ...] = tuple(pairs)
        self.classnames: list[str] = [f"{c} {s}" for c, s in self.pairs]

    @property
    def num_classes(self) -> int:
        return len(self.pairs)

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    @property
    def labels(self) -> list[int]:
        return [i % self.num_classes for i in range(len(self))]

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index out of range for a dataset of length {len(self)}")
        return i

    def scene(self, i: int) -> Scene:
        i = self._index(i)
        label, k = i % self.num_classes, i // self.num_classes
        colour, shape = self.pairs[label]
        rng = _Draws(np.random.default_rng([self.seed, _ZERO_SHOT_STREAM, COLOURS.index(colour),
                                             SHAPES.index(shape), k]))
        return _sample_scene(rng, [(colour, shape)], mode="full", two_object_prob=0.0)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        scene = self.scene(i)
        image = render_scene(scene, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._index(i) % self.num_classes


def synthetic_retrieval_pairs(n: int = 1000, image_size: int = 64, seed: int = 0,
                              detailed: bool = True) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs from the 'val' split, for image<->text retrieval recall.

    With ``detailed=True`` (default) captions use the ``'full'`` template (size, colour, shape, position or
    relation of every object) and only the first scene of each distinct caption is kept, so every caption
    has exactly one matching image; with ``detailed=False`` the first ``n`` 'val' samples as they are.
    """
    n = int(n)
    if detailed:
        ds = SyntheticScenes("val", image_size=image_size, length=2 ** 62, seed=seed, caption_mode="full")
        out: list[tuple[Image.Image, str]] = []
        seen: set[str] = set()
        i = 0
        while len(out) < n:
            scene = ds.scene(i)
            i += 1
            if scene.caption in seen:
                continue
            seen.add(scene.caption)
            out.append((render_scene(scene, image_size), scene.caption))
        return out
    ds = SyntheticScenes("val", image_size=image_size, length=n, seed=seed)
    return [ds[i] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# python -m ldmclip.data.synthetic
# --------------------------------------------------------------------------------------------------

def _grid(samples: Sequence[tuple[Image.Image, str]], cols: int = 8, cell: int = 160) -> Image.Image:
    import textwrap

    from PIL import ImageFont
    font = ImageFont.load_default(size=11)
    rows = (len(samples) + cols - 1) // cols
    text_h = 44
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(samples):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        grid.paste(image.resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        draw.multiline_text((x + 4, y + cell - 2), "\n".join(textwrap.wrap(caption, 26)[:3]), fill=(0, 0, 0),
                            font=font, spacing=1)
    return grid


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ldmclip.data.synthetic",
                                     description="Throughput of the synthetic dataset; optional sample grid.")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--split", default="train", choices=sorted(SPLITS))
    parser.add_argument("-n", type=int, default=5000, help="images to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write an 8x8 grid of samples with captions to this PNG")
    args = parser.parse_args(argv)

    ds = SyntheticScenes(args.split, image_size=args.image_size, length=max(args.n, 64), seed=args.seed)
    ds[0]
    start = time.perf_counter()
    for i in range(args.n):
        ds[i]
    elapsed = time.perf_counter() - start
    print(f"{args.n} {args.split} images at {args.image_size}px in {elapsed:.2f}s: "
          f"{args.n / elapsed:,.0f} images/s (one process)")
    if args.grid:
        _grid([ds[i] for i in range(64)]).save(args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
