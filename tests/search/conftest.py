"""Fixtures for the search tests: small saved models, a folder of generated images, a built index."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldmclip
from ldmclip.search import build_index, model_identity

MODEL = "ViT-Tiny-64"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}


def save_model(directory: Path, seed: int) -> str:
    """A random ``ViT-Tiny-64`` saved in the OpenCLIP hub layout; returns its ``local-dir:`` name."""
    torch.manual_seed(seed)
    ldmclip.create_model(MODEL).save_pretrained(directory)
    return f"local-dir:{directory}"


@pytest.fixture(scope="session")
def model_name(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="session")
def other_model_name(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("other_model"), seed=1)


def make_images(root: Path, per_colour: int = 2, seed: int = 0) -> Path:
    """``root/<colour>/<n>.png`` (and one JPEG) with a coloured disc on noise: 8 readable images."""
    rng = np.random.default_rng(seed)
    for colour, rgb in COLOURS.items():
        (root / colour).mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            image = Image.fromarray((rng.random((48, 60, 3)) * 60).astype(np.uint8))
            ImageDraw.Draw(image).ellipse([10, 6, 50, 42], fill=rgb)
            image.save(root / colour / (f"{i}.jpg" if (colour, i) == ("blue", 1) else f"{i}.png"))
    return root


def add_unreadable(root: Path) -> None:
    """Two files with image suffixes that are not images, and one file that is not an image at all."""
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, not looked at")


ODD_NAMES = (b"red/caf\xe9.png", b"green/new\nline.png")  # not UTF-8 (Latin-1 'é'); a newline


def add_odd_names(root: Path) -> list[str]:
    """Copies of two images under the ``ODD_NAMES``; returns their relative paths as Python names them."""
    for name, source in zip(ODD_NAMES, ("red/0.png", "green/0.png")):
        (root / os.fsdecode(name)).write_bytes((root / source).read_bytes())
    return [os.fsdecode(name) for name in ODD_NAMES]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_images(tmp_path / "images")


def load(name: str):
    model, _, transform = ldmclip.create_model_and_transforms(name)
    return model.eval(), transform


def build(name: str, images: Path, out: Path, **kwargs):
    model, transform = load(name)
    kwargs.setdefault("progress", False)
    return build_index(model, transform, images, out, identity=model_identity(model, name, None), **kwargs)


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, model_name) -> Path:
    """An index (float32, chunks of 3) of 8 images plus 2 unreadable files, made once per session."""
    root = make_images(tmp_path_factory.mktemp("indexed") / "images")
    add_unreadable(root)
    out = root.parent / "index"
    build(model_name, root, out, chunk_size=3, dtype="float32")
    return out
