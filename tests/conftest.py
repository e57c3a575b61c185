"""Shared test helpers: where the optional real datasets live, and reference-model fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$LDMCLIP_DATA``, else ``../shared/data`` next to the checkout; None when absent (tests then skip)."""
    candidates = [os.environ.get("LDMCLIP_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def flickr8k_folder() -> Path:
    """The Flickr8k folder, or a skip of the calling test (or fixture) when it is absent."""
    root = shared_data_dir()
    if root is None or not (root / "flickr8k" / "captions.csv").is_file():
        pytest.skip("Flickr8k not found (set LDMCLIP_DATA to the folder holding flickr8k/)")
    return root / "flickr8k"


def first_flickr8k_captions(n: int) -> tuple[Path, dict[str, str]]:
    """The Flickr8k folder and ``{image file name: its first caption}`` of the first ``n`` images of
    captions.csv, in file order (skips when Flickr8k is absent)."""
    import csv

    flickr = flickr8k_folder()
    first: dict[str, str] = {}
    with open(flickr / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            first.setdefault(row["image"], row["caption"])
            if len(first) == n:
                break
    return flickr, first


@pytest.fixture
def flickr8k() -> Path:
    return flickr8k_folder()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-abs difference relative to the reference's largest magnitude."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


# hf-hub: names through the Hugging Face cache, offline (no test may download)


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(source.read_bytes())


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache
