"""Tiny random conditioners shared by the text-cache tests (test_cache, test_cache_variants,
test_cache_compact): the same seeds in each, so every module builds the same towers."""

from __future__ import annotations

import pytest
import torch

import ldmclip
from ldmclip.conditioning import TextConditioner

TINY_MODEL = "ViT-Tiny-64"


def tiny_tower(seed: int):
    torch.manual_seed(seed)
    return ldmclip.create_model(TINY_MODEL)


@pytest.fixture(scope="module")
def sdxl():
    """A two-tower conditioner with a pooled output, like SDXL, on tiny random towers."""
    tok = ldmclip.get_tokenizer(TINY_MODEL)
    cond = TextConditioner.from_preset("sdxl", tiny_tower(1), tok, model_2=tiny_tower(2), tokenizer_2=tok)
    return cond.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sd2():
    return TextConditioner.from_preset("sd2", tiny_tower(1), ldmclip.get_tokenizer(TINY_MODEL)).eval().requires_grad_(False)
