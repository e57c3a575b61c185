"""Fixtures for the evaluation tests: a small model with diverse outputs, and generated image data."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldmclip

MODEL = "ViT-Tiny-64"
# Class name -> (colour, shape). Distinct colours and shapes, so a scrambled random model still spreads
# its predictions over several classes (a model that predicts one class everywhere would make any
# prediction-parity check vacuous).
CLASSES = {
    "red circle": ((220, 30, 30), "ellipse"),
    "green square": ((30, 200, 40), "rectangle"),
    "blue circle": ((30, 60, 220), "ellipse"),
    "yellow square": ((240, 220, 30), "rectangle"),
    "magenta circle": ((220, 40, 220), "ellipse"),
    "cyan square": ((40, 220, 220), "rectangle"),
}  # six classes: OpenCLIP's evaluation loop needs more than five (it always takes the top 5)


def scrambled_model(seed: int = 0) -> ldmclip.CLIP:
    """A random ``ViT-Tiny-64`` whose weights get extra noise (vectors: 0.1, matrices: their own std):
    plain random init maps every image to nearly the same feature."""
    torch.manual_seed(seed)
    model = ldmclip.create_model(MODEL)
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.1 if param.dim() <= 1 else float(param.std().clamp_min(0.02))
            param.add_(scale * torch.randn_like(param))
    return model.eval()


def _spreads_predictions(model: ldmclip.CLIP, folder: Path) -> bool:
    """Does ``model`` predict at least 3 of the 6 classes on ``folder``, with no near-tie (margin between
    the two best classes above 1e-3, far beyond float rounding)?"""
    from ldmclip.eval import SIMPLE_IMAGENET_TEMPLATES, build_zero_shot_classifier, open_zero_shot
    from ldmclip.transforms import EvalTransform

    source = open_zero_shot(folder, EvalTransform(model.visual.image_size))
    classifier = build_zero_shot_classifier(model, ldmclip.get_tokenizer(MODEL), source.classnames,
                                            SIMPLE_IMAGENET_TEMPLATES)
    images = torch.stack([source.dataset[i].image for i in range(len(source.dataset))])
    with torch.no_grad():
        top = (model.encode_image(images, normalize=True) @ classifier).topk(2, dim=1)
    margin = (top.values[:, 0] - top.values[:, 1]).min().item()
    return len(set(top.indices[:, 0].tolist())) >= 3 and margin > 1e-3


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A scrambled model in the OpenCLIP hub layout (loads in ldmclip and in OpenCLIP) that spreads its
    predictions over the classes of ``make_class_folder``: whether a random model does depends on its
    seed, so the first seed that does is taken (the same one on every run)."""
    folder = make_class_folder(tmp_path_factory.mktemp("probe") / "classes")
    for seed in range(20):
        model = scrambled_model(seed)
        if _spreads_predictions(model, folder):
            break
    else:  # pragma: no cover - the search is deterministic; this would mean the model code changed a lot
        raise RuntimeError("no scrambled model seed spreads its predictions")
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


def draw(colour: tuple[int, int, int], shape: str, rng: np.random.Generator, size=(90, 72)) -> Image.Image:
    """A noisy background with one shape at a random place."""
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 60).astype(np.uint8))
    x, y, r = int(rng.integers(30, size[0] - 30)), int(rng.integers(26, size[1] - 26)), int(rng.integers(22, 28))
    getattr(ImageDraw.Draw(image), shape)([x - r, y - r, x + r, y + r], fill=colour)
    return image


def make_class_folder(root: Path, per_class: int = 4, seed: int = 0, fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for name, (colour, shape) in CLASSES.items():
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(per_class):
            draw(colour, shape, rng).save(folder / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "classes")


def make_caption_table(root: Path, images: int = 12, captions_per_image: int = 3, seed: int = 0) -> Path:
    """``root/captions.csv`` (image,caption; one row per caption) and ``root/images/*.png``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    names = list(CLASSES)
    rows = []
    for i in range(images):
        name = names[i % len(names)]
        colour, shape = CLASSES[name]
        draw(colour, shape, rng).save(root / "images" / f"im{i:03d}.png")
        for j in range(captions_per_image):
            rows.append((f"im{i:03d}.png", f"a {name} number {i} seen {['left', 'right', 'up'][j % 3]}"))
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return root / "captions.csv"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
