"""The CLIP paper's ResNet image tower (Radford et al. 2021, section 2.4), OpenCLIP's ``ModifiedResNet``.

Three changes to a torchvision ResNet: a stem of three 3x3 convolutions followed by an average pool
(instead of one 7x7 convolution and a max pool); anti-aliased downsampling, where each strided
bottleneck averages 2x2 before its last 1x1 convolution (and its shortcut averages before its 1x1
projection) instead of striding a convolution; and attention pooling, a single multi-head attention
whose query is the mean of the last feature map, instead of a global average pool.

The module names are OpenCLIP's (``conv1``/``bn1`` ... ``layer1.0.conv1`` ... ``attnpool.q_proj``), so
its checkpoints and OpenAI's load without any key mapping. The facts of the architecture and its
initialisation follow OpenCLIP 3.3.0's ``open_clip/modified_resnet.py``.
"""

from __future__ import annotations

import contextlib
from typing import Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import RESNET_REDUCTION, VisionConfig
from .layers import keep_in_eval_mode, unlock_groups

EXPANSION = 4  # a bottleneck's output has 4x the channels of its inner convolutions


def is_resnet_state_dict(keys: Collection[str]) -> bool:
    """Whether a CLIP state dict's (OpenCLIP key names) image tower is a ModifiedResNet: its stages and
    attention pool, which a ViT has not."""
    return any(k.startswith(("visual.attnpool.", "visual.layer1.")) for k in keys)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (2x2 average pool when strided) -> 1x1, with a shortcut; every conv unstrided."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or in_channels != out_channels:
            # state-dict keys downsample.0 (conv) and downsample.1 (norm); the pool holds no tensors
            self.downsample = nn.Sequential()
            self.downsample.add_module("pool", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(in_channels, out_channels, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.avgpool(self.act2(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return self.act3(out + shortcut)


class AttentionPool2d(nn.Module):
    """One multi-head attention over the flattened feature map, with the map's mean prepended as
    the query token; the output is that token's (separate q/k/v projections, ``c_proj`` out)."""

    def __init__(self, grid_size: int, channels: int, heads: int, output_dim: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"a ResNet's {channels} output channels do not divide into {heads} attention heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid_size ** 2 + 1, channels) / channels ** 0.5)
        self.k_proj = nn.Linear(channels, channels)
        self.q_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        head_dim = channels // self.heads
        # Only the mean token's output is kept, so only its query is computed: the same result as
        # attending from every token and taking the first, at 1/(HW+1) of the query work.
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, -1, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, head_dim]
        return self.c_proj(out.transpose(1, 2).reshape(batch, channels))


class ModifiedResNet(nn.Module):
    """The ResNet image tower: ``[B, 3, S, S]`` images to ``[B, output_dim]`` features."""

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        if not cfg.is_resnet:
            raise ValueError("ModifiedResNet needs a vision config whose layers is a list of four stages")
        cfg.validate()
        self.image_size = cfg.image_size
        self.grid_size = cfg.grid_size
        self.output_dim = output_dim
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        in_channels = width
        for index, blocks in enumerate(cfg.layers):
            channels = width * 2 ** index
            stage = [Bottleneck(in_channels, channels, stride=1 if index == 0 else 2)]
            stage += [Bottleneck(channels * EXPANSION, channels) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            in_channels = channels * EXPANSION
        assert in_channels == width * RESNET_REDUCTION  # 8 * 4: the feature width OpenCLIP's heads count on
        self.attnpool = AttentionPool2d(cfg.grid_size, in_channels, cfg.heads, output_dim)
        # OpenCLIP's flag (set by CLIP.set_grad_checkpointing and the trainer's --grad-checkpointing):
        # recompute each bottleneck's activations in backward instead of storing them
        self.grad_checkpointing = False
        self._init_parameters()

    def _init_parameters(self) -> None:
        # OpenCLIP's init: the attention pool's projections at std channels^-0.5, and each block's last
        # BatchNorm gain at zero, so every residual block starts as the identity.
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for block in self.blocks():
            nn.init.zeros_(block.bn3.weight)

    def blocks(self) -> list[Bottleneck]:
        """The bottleneck blocks, in order (the units of activation checkpointing and of FSDP2)."""
        return [m for m in self.modules() if isinstance(m, Bottleneck)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def lock_groups(self) -> list:
        """The tower's parameters in LiT groups, input to output: the stem, each stage, the attention pool.
        (OpenCLIP 3.3.0 refuses partial locking of a ResNet; ldmclip unlocks the last stages.)"""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4, self.attnpool]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower but its last ``unlocked_groups`` groups; ``freeze_bn_stats`` also keeps every
        BatchNorm of the frozen groups in eval mode (running statistics fixed, as OpenCLIP's frozen
        BatchNorm), whatever ``train()`` is called with later."""
        for param in self.parameters():
            param.requires_grad_(False)
        groups = self.lock_groups()
        unlock_groups(groups, unlocked_groups)
        if freeze_bn_stats:
            frozen = groups[: len(groups) - max(unlocked_groups, 0)]
            for group in frozen:
                for part in group if isinstance(group, list) else [group]:
                    for module in part.modules():
                        if isinstance(module, nn.modules.batchnorm._BatchNorm):
                            keep_in_eval_mode(module)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks():
                x = _checkpointed_block(block, x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def _checkpointed_block(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` under activation checkpointing. Its recomputation in backward must not count the
    batch a second time in the BatchNorm running statistics (each would move twice per step and
    ``num_batches_tracked`` count double): they are restored after the second call."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    calls = []  # the first call is the forward, a second the recomputation

    def once(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(None)
        if len(calls) == 1:
            return block(inputs)
        with _running_stats_untouched(norms):
            return block(inputs)

    return checkpoint(once, x, use_reentrant=False)


@contextlib.contextmanager
def _running_stats_untouched(norms: list[nn.Module]):
    # The recomputation runs exactly as the forward did (checkpoint checks that it saves the same
    # tensors), so the running statistics it updates are put back afterwards; a finally, because
    # checkpoint stops a recomputation early, with an exception, once it has what backward needs.
    tracked = [norm for norm in norms if norm.track_running_stats]
    saved = [(n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone()) for n in tracked]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (mean, var, count) in zip(tracked, saved):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(count)
