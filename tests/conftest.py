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


@pytest.fixture
def flickr8k() -> Path:
    root = shared_data_dir()
    if root is None or not (root / "flickr8k" / "captions.csv").is_file():
        pytest.skip("Flickr8k not found (set LDMCLIP_DATA to the folder holding flickr8k/)")
    return root / "flickr8k"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-abs difference relative to the reference's largest magnitude."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))
