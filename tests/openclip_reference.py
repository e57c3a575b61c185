"""Helpers that build reference models with OpenCLIP 3.3.0 and write them in OpenCLIP's own formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from ldmclip.registry import _packaged_configs  # noqa: E402


def openclip_model(name: str, **kwargs) -> torch.nn.Module:
    """A randomly initialised OpenCLIP model; ldmclip's small configs are registered on demand."""
    if name not in open_clip.list_models():
        open_clip.add_model_config(str(_packaged_configs()[name]))
    model = open_clip.create_model(name, **kwargs)
    with torch.no_grad():  # non-trivial logit_scale/biases so a wrongly mapped tensor shows up
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def openclip_config(name: str) -> dict:
    return json.loads(_packaged_configs()[name].read_text())


def save_openclip_hub(model, name: str, directory: Path, weights: str = "safetensors") -> Path:
    """Write ``model`` the way OpenCLIP's ``save_for_hf`` does (config via OpenCLIP's own writer)."""
    from open_clip.push_to_hf_hub import save_config_for_hf

    directory.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, directory / "open_clip_config.json", model_config=openclip_config(name))
    return directory


def sample_inputs(image_size: int, context_length: int = 77, batch: int = 2):
    images = torch.randn(batch, 3, image_size, image_size)
    tokens = open_clip.tokenize(["a photo of a cat", "two dogs playing in the snow near a red barn"][:batch],
                                context_length=context_length)
    return images, tokens
