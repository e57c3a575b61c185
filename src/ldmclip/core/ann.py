"""FAISS, the optional dependency of nearest-neighbour work (the ``ann`` extra: ``pip install faiss-cpu``):
whether it is installed, and importing it with a message that says how to install it. Shared by the search
index (``search.neighbors``) and near-duplicate grouping (``curate.dedup``)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from .errors import UserError

__all__ = ["faiss_available", "import_faiss"]


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def import_faiss(purpose: str) -> ModuleType:
    """The ``faiss`` module; a one-line :class:`UserError` naming ``purpose`` and the install command when
    it is missing (imported only when needed, so the rest of ldmclip works without it)."""
    try:
        import faiss
    except ImportError as error:
        raise UserError(f"{purpose} needs FAISS, which is not installed: pip install faiss-cpu "
                        "(or pip install 'ldmclip[ann]')") from error
    return faiss
