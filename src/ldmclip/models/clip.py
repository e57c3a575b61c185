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
from ..transforms import PreprocessConfig
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
        self.preprocess_cfg = {}
        # OpenCLIP's switch: forward returns a dict (image_features, text_features, logit_scale[, logit_bias])
        self.output_dict = False

    @property
    def preprocess_cfg(self) -> dict:
        """The preprocessing a checkpoint carries (what ``save_pretrained`` writes). Setting it also sets
        ``visual.preprocess_cfg``: every key of OpenCLIP's ``PreprocessCfg`` filled in, where OpenCLIP's
        clients read mean/std (and the legacy ``visual.image_mean``/``image_std``)."""
        return self._preprocess_cfg

    @preprocess_cfg.setter
    def preprocess_cfg(self, value: dict) -> None:
        self._preprocess_cfg = dict(value)
        full = PreprocessConfig.from_dict({"size": self.image_size, **self._preprocess_cfg}).to_dict()
        full["size"] = (full["size"], full["size"])  # (height, width), as OpenCLIP's visual.preprocess_cfg
        self.visual.preprocess_cfg = full
        self.visual.image_mean, self.visual.image_std = tuple(full["mean"]), tuple(full["std"])

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return size[0] if isinstance(size, tuple) else size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of every transformer block in backward (OpenCLIP's method; the
        trainer's ``--grad-checkpointing`` sets the same flags)."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower but its last ``unlocked_groups`` groups (LiT, OpenCLIP's meaning): each
        tower says what its groups are (``visual.lock``). Only ``requires_grad`` changes."""
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """Normalised ``(image_features, text_features, logit_scale.exp())`` — the inputs of the
        contrastive loss — plus ``logit_bias`` as a fourth element for SigLIP models; with
        ``output_dict = True`` OpenCLIP's dict of the same values."""
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features,
                   "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
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
