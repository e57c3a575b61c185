"""The CLIP model: an image tower, a text tower and a learnable temperature."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.files import atomic_write, write_safetensors
from ..core.formats import OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES
from .config import CLIPConfig, VisionConfig
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vision import VisionTransformer


def build_vision_tower(cfg: VisionConfig, output_dim: int, activation: str) -> nn.Module:
    """The image tower the config describes: a ModifiedResNet (``layers`` a list; ReLU throughout, so
    ``activation`` is the text tower's alone) or a Vision Transformer."""
    cfg.validate()  # options may have been set after the config was made (create_model's overrides)
    if cfg.is_resnet:
        return ModifiedResNet(cfg, output_dim)
    return VisionTransformer(cfg, output_dim, activation)


class CLIP(TextTransformer):
    """Contrastive image–text model with OpenCLIP's ``CLIP`` state-dict layout.

    The text tower's parameters live at the top level (inherited from ``TextTransformer``), the
    image tower under ``visual.``, then ``logit_scale`` (and ``logit_bias`` for SigLIP models).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__(cfg.text_cfg, cfg.embed_dim, cfg.activation)
        self.config = cfg
        self.visual = build_vision_tower(cfg.vision_cfg, cfg.embed_dim, cfg.activation)
        # The temperature starts at 0.07, stored as log(1/T) so it stays positive while training.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        else:
            self.logit_bias = None
        # Metadata carried to saved checkpoints (mean/std etc.); set by the factory.
        self.preprocess_cfg: dict = {}

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """Normalised ``(image_features, text_features, logit_scale.exp())`` — the inputs of the
        contrastive loss — plus ``logit_bias`` as a fourth element for SigLIP models."""
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the OpenCLIP hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``).

        ``open_clip.create_model('local-dir:<directory>')`` and ``ldmclip.create_model`` both load it.
        """
        directory = Path(directory)
        config = {"model_cfg": self.config.to_dict(), "preprocess_cfg": dict(self.preprocess_cfg)}
        write_safetensors(directory / OPENCLIP_WEIGHT_NAMES[0], self.state_dict(), {"format": "pt"})
        text = json.dumps(config, indent=2, default=list)
        atomic_write(directory / OPENCLIP_CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return directory

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
