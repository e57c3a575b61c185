"""One bad-input corpus and one tiny saved model for the whole corpus test module (built once)."""

from __future__ import annotations

import pytest

from .corpus import Corpus, build_corpus

MODEL = "ViT-T-8-64"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory) -> str:
    """A tiny model with weights (save_pretrained), as ``--model local-dir:...``."""
    import ldmclip

    folder = tmp_path_factory.mktemp("model")
    ldmclip.create_model(MODEL).save_pretrained(folder)
    return f"local-dir:{folder}"
