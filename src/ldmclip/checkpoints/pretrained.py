"""OpenCLIP's pretrained tags (``pretrained="laion2b_s32b_b82k"``): which Hugging Face repository holds
the weights of each (model, tag), and the preprocessing and activation they were trained with.

The facts are data, ``pretrained_tags.json`` beside this module, taken from OpenCLIP 3.3.0's registry
(``open_clip/pretrained.py``) for the models ldmclip packages; ``tests/checkpoints/test_pretrained_tags.py``
checks them against the installed OpenCLIP. A tag always names a repository: nothing is guessed from
a model's name, and an unknown tag is an error listing the known ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import UserError
from .hub import hf_hub_file

__all__ = ["PretrainedTag", "clean_tag", "find_tag", "pretrained_registry", "models_with_tag",
           "unknown_tag_error", "download_tag_weights"]

QUICKGELU_SUFFIX = "-quickgelu"
# The preprocessing keys of a tag (OpenCLIP's PreprocessCfg names); the rest of an entry says where and how.
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class PretrainedTag:
    """One (model, tag) of OpenCLIP's registry."""

    model: str
    tag: str
    hf_hub: str               # OpenCLIP's spelling, "org/repo/": the repository, with its default file names
    preprocess: dict[str, Any]
    quick_gelu: bool
    weights_files: tuple[str, ...]  # asked for in order: as OpenCLIP, the safetensors file, then the pickle

    @property
    def repo_id(self) -> str:
        return self.hf_hub.rstrip("/")


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    with (resources.files("ldmclip") / "checkpoints" / "pretrained_tags.json").open("r", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, dict[str, Any]]]:
    models = {name: dict(tags) for name, tags in _raw()["models"].items()}
    # OpenCLIP's rule (pretrained.py, after _PRETRAINED): "<model>-quickgelu" has the quick_gelu tags of
    # "<model>", appended after all the base models (so list_pretrained's order is OpenCLIP's)
    variants = {}
    for name, tags in models.items():
        quick = {tag: cfg for tag, cfg in tags.items() if cfg.get("quick_gelu")}
        if quick:
            variants[name + QUICKGELU_SUFFIX] = quick
    return {**models, **variants}


def pretrained_registry() -> dict[str, dict[str, dict[str, Any]]]:
    """Every model of the data and its tags' entries (a copy), in OpenCLIP's order."""
    return {name: {tag: dict(cfg) for tag, cfg in tags.items()} for name, tags in _registry().items()}


def clean_tag(tag: str) -> str:
    """OpenCLIP's normalisation of a tag (``_clean_tag``): lower case, ``-`` read as ``_``."""
    return tag.lower().replace("-", "_")


def find_tag(model: str, tag: str) -> PretrainedTag | None:
    """The entry of ``tag`` for ``model``; ``None`` when ``model`` has no such tag."""
    cfg = _registry().get(model, {}).get(clean_tag(tag))
    if cfg is None:
        return None
    preprocess = {key: (list(cfg[key]) if isinstance(cfg[key], list) else cfg[key])
                  for key in _PREPROCESS_KEYS if key in cfg}
    return PretrainedTag(model=model, tag=clean_tag(tag), hf_hub=cfg["hf_hub"], preprocess=preprocess,
                         quick_gelu=bool(cfg.get("quick_gelu", False)),
                         weights_files=tuple(_raw()["weights_files"]))


def models_with_tag(tag: str, among: Iterable[str] | None = None) -> list[str]:
    """The models (of ``among``, default all) that have ``tag``."""
    wanted = None if among is None else set(among)
    return [name for name, tags in _registry().items()
            if clean_tag(tag) in tags and (wanted is None or name in wanted)]


def unknown_tag_error(model: str, tag: str, packaged: Iterable[str]) -> UserError:
    """``tag`` is not one of ``model``'s: say which tags it has, and which models have ``tag``."""
    packaged = list(packaged)
    known = list(_registry().get(model, {}))
    theirs = models_with_tag(tag, among=packaged)
    if theirs:
        what = f"{tag!r} is a pretrained tag of {', '.join(theirs)}, not of {model}"
    else:
        what = f"unknown pretrained tag {tag!r} for {model} (and no file or folder of that name)"
    if known:
        offer = f"{model}'s tags: {', '.join(known)}"
    else:
        offer = f"{model} has no pretrained tags; pass a weights file, a checkpoint folder or 'hf-hub:org/repo'"
    return UserError(f"{what}. {offer} (all of them: ldmclip.list_pretrained())")


def download_tag_weights(tag: PretrainedTag, cache_dir: str | Path | None = None) -> Path:
    """The weights file of ``tag``: from the Hugging Face cache, else downloaded (unless HF_HUB_OFFLINE)."""
    return hf_hub_file(tag.repo_id, tag.weights_files, cache_dir=cache_dir,
                       asked=f"the weights of {tag.model} pretrained={tag.tag!r}")
