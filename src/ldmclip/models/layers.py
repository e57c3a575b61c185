"""Transformer building blocks shared by the image and the text tower.

Parameter names follow OpenCLIP's (``attn.in_proj_weight``, ``mlp.c_fc`` ...), so a state dict
moves between the two libraries without any key mapping.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's original CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Inference (e.g. LDM conditioning): the same three operations in one buffer instead of three
        # fresh ones, bit-identical and ~4x faster on CPU, where each large new tensor pays page faults.
        out = torch.mul(x, 1.702)
        out.sigmoid_()
        return out.mul_(x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; use 'gelu' or 'quick_gelu'")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights stay numerically stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and ``scaled_dot_product_attention``.

    The parameters carry ``nn.MultiheadAttention``'s names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) because that is what OpenCLIP's checkpoints contain.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, L, 3, H, Dh] -> three tensors of [B, H, L, Dh]
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = _attention(q, k, v, causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    # On CPU, for a bf16 graph at short sequence lengths, plain matmul-softmax-matmul beats the fused
    # kernel's forward + backward (torch 2.14, 2-core AVX512-bf16 CPU: 19 vs 27 ms at 65 tokens, 2 vs 10 ms
    # for a causal 20-token text batch); from about 200 tokens (ViT-B/16's 197: 109 vs 93 ms) the fused
    # kernel wins. Everywhere else PyTorch's own choice is the fastest.
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= _CPU_PLAIN_MAX_LENGTH
            and torch.is_grad_enabled() and q.requires_grad):
        return _plain_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


_CPU_PLAIN_MAX_LENGTH = 128


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with bf16 matmuls and an fp32 softmax (autocast's split on CUDA).

    PyTorch's MATH SDPA kernel would do the same work 20-25% slower here: it upcasts q, k, v to fp32
    for the matmuls and guards against fully masked rows (an ``all`` + ``where`` per call) that a
    causal or unmasked attention never has. (ViT-T-8-64 training step, batch 64: 145 vs 193 ms.)
    """
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if causal:
        length = q.shape[-2]
        scores = scores + torch.full((length, length), float("-inf"), dtype=scores.dtype,
                                     device=scores.device).triu_(1)
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, ln_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks (batch-first, ``[B, L, width]``).

    ``forward`` can return the output of every block, which LDM conditioning needs (the
    penultimate layer of the text tower for SD 2.x and SDXL).

    ``grad_checkpointing = True`` (OpenCLIP's flag of the same name, set by
    ``CLIP.set_grad_checkpointing`` and the trainer's ``--grad-checkpointing``) recomputes each block's
    activations in backward instead of storing them; without gradients it changes nothing.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 activation: str = "gelu", ln_eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, ln_eps) for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, stop_at: int | None = None,
                return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run the blocks; ``stop_at=k`` stops after block ``k`` blocks (saves the rest)."""
        outputs = []
        for index, block in enumerate(self.resblocks):
            if stop_at is not None and index >= stop_at:
                break
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
            if return_all:
                outputs.append(x)
        return outputs if return_all else x


def unlock_groups(groups: list, unlocked: int) -> None:
    """Make the parameters of the last ``unlocked`` of ``groups`` trainable again (after a tower froze
    every parameter): OpenCLIP's LiT-style partial locking. A group is a module, a parameter or a list
    of them; ``unlocked`` larger than the number of groups unlocks them all."""
    if unlocked <= 0:
        return
    for group in groups[-unlocked:]:
        for part in group if isinstance(group, (list, tuple)) else [group]:
            params = [part] if isinstance(part, nn.Parameter) else part.parameters()
            for param in params:
                param.requires_grad_(True)


def keep_in_eval_mode(module: nn.Module) -> None:
    """Make ``module.train(mode)`` put it (and everything under it) in eval mode whatever ``mode`` is.

    ``nn.Module.train`` reaches each child through ``child.train(mode)``, so an instance attribute
    shadows the method for this module alone and the model's code does not change. A bound method
    (not a closure) so that ``copy.deepcopy`` binds the copy to the copied module."""
    module.train = types.MethodType(_train_as_eval, module)
    module.train()


def _train_as_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)
