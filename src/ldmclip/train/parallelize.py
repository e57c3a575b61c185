"""Ways of running a model that the model itself knows nothing about.

Each function takes a model and changes how it runs (the torchtitan way); the trainer composes
them. Distributed wrappers (DDP, FSDP2) belong here too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.layers import ResidualAttentionBlock


def _checkpointed(forward):
    def run(x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x, causal=causal)
        return checkpoint(forward, x, causal, use_reentrant=False)

    return run


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each residual block's activations in backward instead of storing them.

    The block's ``forward`` is replaced on the instance, so module names and state-dict keys do not
    change (checkpoints stay loadable with and without this option).
    """
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock) and not getattr(module, "_checkpointed", False):
            module.forward = _checkpointed(module.forward)
            module._checkpointed = True
    return model


def lock_tower(tower: nn.Module) -> None:
    """Freeze a tower (LiT: Zhai et al. 2022): no gradients, no updates, eval-mode dropout."""
    for param in tower.parameters():
        param.requires_grad_(False)


def lock_text_tower(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
            param.requires_grad_(False)


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each residual block (small graphs compile fast and are reused across layers)."""
    for module in list(model.modules()):
        blocks = getattr(module, "resblocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile()
    return model
