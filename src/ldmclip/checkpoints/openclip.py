"""The OpenCLIP hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``) and the one
reader of a checkpoint folder's config, whichever layout it is in. (Writing it is
``CLIP.save_pretrained``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.formats import OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES
from ..models.config import CLIPConfig
from .hf import HF_CONFIG_NAME, HF_WEIGHT_NAMES, config_from_hf, is_hf_dir, read_hf_config
from .errors import CheckpointError

__all__ = ["OPENCLIP_CONFIG_NAME", "OPENCLIP_WEIGHT_NAMES", "is_openclip_dir", "read_dir_config",
           "find_weights_in_dir"]


def is_openclip_dir(path: Path) -> bool:
    return (path / OPENCLIP_CONFIG_NAME).is_file()


def read_dir_config(path: Path) -> tuple[CLIPConfig, dict[str, Any]]:
    """The model config and the preprocessing config of a checkpoint folder."""
    if is_openclip_dir(path):
        with open(path / OPENCLIP_CONFIG_NAME, encoding="utf-8") as f:
            raw = json.load(f)
        if "model_cfg" not in raw:
            raise CheckpointError(f"{path / OPENCLIP_CONFIG_NAME} has no 'model_cfg' entry")
        return CLIPConfig.from_dict(raw["model_cfg"]), dict(raw.get("preprocess_cfg") or {})
    if is_hf_dir(path):
        raw = read_hf_config(path)
        preprocess = {}
        processor = path / "preprocessor_config.json"
        if processor.is_file():
            with open(processor, encoding="utf-8") as f:
                proc = json.load(f)
            preprocess = {k: tuple(proc[src]) for k, src in (("mean", "image_mean"), ("std", "image_std")) if src in proc}
        return config_from_hf(raw, path), preprocess
    raise CheckpointError(
        f"{path} is not a checkpoint folder: expected {OPENCLIP_CONFIG_NAME} (OpenCLIP hub layout) or "
        f"{HF_CONFIG_NAME} with {' or '.join(HF_WEIGHT_NAMES)} (transformers CLIPModel)"
    )


def find_weights_in_dir(path: Path) -> Path:
    names = OPENCLIP_WEIGHT_NAMES + HF_WEIGHT_NAMES
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"no weights in {path}; expected one of: {', '.join(names)}")
