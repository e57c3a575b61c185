"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: not to gains, biases, embeddings' scale or logit_scale.

    1-D tensors are LayerNorm gains/biases, linear biases, the class embedding and the scalars
    ``logit_scale``/``logit_bias``; positional and token embeddings are excluded by name, as in CLIP.
    """
    if param.ndim < 2:
        return False
    return not any(part in name for part in ("positional_embedding", "token_embedding", "class_embedding"))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (``torch.optim`` parameter-group dicts, each with its own ``lr`` and
    ``weight_decay``: ``param_groups.optimizer_groups``), by default the two of :func:`parameter_groups`."""
    if groups is None:
        groups = parameter_groups(model, weight_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (did you lock both towers?)")
    # The fused kernel (one pass over all parameters) exists for CPU and CUDA tensors; it is several
    # times faster than the per-parameter loop on small models, where the optimizer step is a large
    # share of the step time.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear from ~0 to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup, total))
