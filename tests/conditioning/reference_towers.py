"""Small text towers shared by ldmclip and the reference libraries (same random weights).

- ``hf_text_tower``: a ``transformers`` ``CLIPTextModelWithProjection`` (the library SD 1.x and SDXL's
  first encoder run in) and the same weights in an ldmclip ``TextTransformer``.
- ``openclip_text_model``: an OpenCLIP 3.3.0 ``CLIP`` built by ``open_clip.create_model`` from a small
  config (the library SD 2.x and SDXL's second encoder run in) and the same weights in an ldmclip ``CLIP``.

Context length 77 as in every Stable Diffusion, so long prompts split into real 75-token windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ldmclip
from ldmclip.checkpoints import hf_to_openclip_state_dict, load_into_model, normalize_state_dict
from ldmclip.models import TextConfig, TextTransformer

EOT = 49407
SOT = 49406


def _perturb_vectors(model: torch.nn.Module) -> None:
    # random init leaves LayerNorm weights at 1 and biases at 0; nudge them so a wrongly mapped
    # or skipped LayerNorm shows up
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))


def hf_text_tower(activation: str = "quick_gelu", width: int = 64, layers: int = 3, heads: int = 2,
                  projection: int = 48, pad_token_id: int = EOT):
    """``(transformers CLIPTextModelWithProjection, ldmclip TextTransformer)`` with equal weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=activation, projection_dim=projection,
        bos_token_id=SOT, eos_token_id=EOT, pad_token_id=pad_token_id)
    reference = transformers.CLIPTextModelWithProjection(config).eval()
    _perturb_vectors(reference)
    ours = TextTransformer(TextConfig(context_length=77, width=width, heads=heads, layers=layers), projection,
                           activation)
    ours.load_state_dict(hf_to_openclip_state_dict(reference.state_dict()), strict=True)
    return reference, ours.eval()


SMALL_OPENCLIP = {
    "embed_dim": 40,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}


def small_config_file(directory: Path, name: str = "ldmclip-test-cond-text", **changes) -> Path:
    """A small model config as a JSON file (OpenCLIP's and ldmclip's layout)."""
    config = json.loads(json.dumps(SMALL_OPENCLIP))
    for key, value in changes.items():
        config[key] = value
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def openclip_text_model(directory: Path, name: str = "ldmclip-test-cond-text", **changes):
    """``(OpenCLIP CLIP, ldmclip CLIP)`` with equal weights, from a small config."""
    open_clip = pytest.importorskip("open_clip")
    path = small_config_file(directory, name, **changes)
    open_clip.add_model_config(str(path))
    reference = open_clip.create_model(name).eval()
    _perturb_vectors(reference)
    ours = ldmclip.create_model(str(path))
    load_into_model(ours, normalize_state_dict(reference.state_dict()))
    return reference, ours.eval()

