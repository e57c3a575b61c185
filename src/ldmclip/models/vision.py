"""The Vision Transformer image tower."""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import LayerNorm, Transformer, unlock_groups


class PatchDropout(nn.Module):
    """Keeps a random subset of patch tokens during training (https://arxiv.org/abs/2212.00794).

    The class token is always kept. At eval time, or with ``prob=0``, it is the identity.
    """

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        batch, num_patches, _ = patches.shape
        keep = max(1, int(num_patches * (1.0 - self.prob)))
        kept_indices = torch.rand(batch, num_patches, device=x.device).topk(keep, dim=-1).indices
        patches = patches.gather(1, kept_indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_token, patches], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str = "gelu"):
        super().__init__()
        # (height, width), as OpenCLIP's towers expose it; ldmclip's images are square
        self.image_size = (cfg.image_size, cfg.image_size)
        self.patch_size = cfg.patch_size
        self.grid_size = cfg.grid_size
        self.output_dim = output_dim
        width = cfg.width
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size ** 2 + 1, width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def lock_groups(self) -> list:
        """The tower's parameters in OpenCLIP's LiT groups, input to output (``VisionTransformer.lock``):
        the embedding, each block but the last, the last block with ``ln_post``, the projection."""
        blocks = list(self.transformer.resblocks)
        return [[self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre], *blocks[:-1],
                [*blocks[-1:], self.ln_post], self.proj]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower but its last ``unlocked_groups`` groups (OpenCLIP's meaning; a ViT has no
        BatchNorm, so ``freeze_bn_stats`` changes nothing here)."""
        for param in self.parameters():
            param.requires_grad_(False)
        unlock_groups(self.lock_groups(), unlocked_groups)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` to the token sequence ``[B, 1 + grid², width]`` fed to the blocks."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed(images))
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj
