"""Contrastive losses: the CLIP loss (dense, or exact and tiled to save memory) and the SigLIP loss.

Every loss takes OpenCLIP's arguments::

    loss(image_features, text_features, logit_scale, logit_bias=None) -> scalar tensor

with L2-normalised features ``[N, D]`` (row ``i`` of each is a matching pair) and the
*already exponentiated* temperature ``logit_scale`` (what ``CLIP.forward`` returns as its third
output). The trainer keeps the underlying parameter in range with :func:`clamp_logit_scale_`.

The CLIP loss is the mean of two cross-entropies over the similarity matrix
``S = logit_scale * I @ T.T (+ logit_bias)``: image→text over the rows of ``S`` and text→image
over its columns, the diagonal holding the positives. Written per row/column::

    loss = ½ · mean_i(LSE_j S_ij − S_ii) + ½ · mean_j(LSE_i S_ij − S_jj)

so it needs only the row and column log-sum-exps of ``S`` and its diagonal. The tiled path
(``ClipLoss(tile_size=k)``, built on :func:`tiled_clip_cross_entropy`) computes them by streaming
``k×k`` tiles of ``S`` through a custom autograd function that recomputes the tiles in backward,
so the ``N×N`` matrix never exists.

Distributed (``world_size > 1``, inside an initialised ``torch.distributed`` process group): each
process holds ``n`` pairs of a global batch of ``N = world_size · n`` (equal ``n`` everywhere). The
features are all-gathered *with gradients* (:func:`gather_features`, on
``torch.distributed.nn.functional.all_gather``, whose backward sums every process's gradient for a
slice back onto the process that owns it). Each process then computes only its *local* part of
the global loss (the "local loss" of OpenCLIP): its ``n`` rows (image→text, against all ``N``
texts) and its ``n`` columns (text→image, against all ``N`` images), each averaged over ``n``::

    loss_r = ½ · mean_{i ∈ r}(LSE_j S_ij − S_ii) + ½ · mean_{j ∈ r}(LSE_i S_ij − S_jj)

**Scaling.** The global loss is ``L = (1/W) Σ_r loss_r``: the mean of the local losses. The gradient
that reaches a process's parameters through its own features and the gather's backward is
``Σ_r ∂loss_r/∂θ = W · ∂L/∂θ``; DDP (and FSDP2's reduce-scatter) *average* gradients over the ``W``
processes, giving exactly ``∂L/∂θ`` — the single-process gradient on the whole global batch. The
same holds for parameters the loss sees directly (``logit_scale``, ``logit_bias``). So a
distributed loss needs no extra factor; what a process returns is its ``loss_r`` and the value to
log is its mean over processes. The SigLIP loss follows the same rule (its ``1/N`` normalisation
becomes ``1/n`` locally).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "SIGLIP_INIT_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "build_loss",
    "clamp_logit_scale_",
    "gather_features",
    "tiled_clip_cross_entropy",
]

#: Initial value of a SigLIP model's ``logit_scale`` *parameter* (it is stored as a log, so the
#: loss sees ``exp(log 10) = 10``), as in Zhai et al. 2023 and OpenCLIP's SigLIP configs.
SIGLIP_INIT_LOGIT_SCALE: float = math.log(10)
#: Initial value of a SigLIP model's ``logit_bias`` (used as is, not exponentiated). Starting
#: strongly negative matches the prior that almost every pair in a batch is a negative.
SIGLIP_INIT_LOGIT_BIAS: float = -10.0


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(f"features must be [N, D]; got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must have the same shape; got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")


def _check_world(name: str, rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def gather_features(features: torch.Tensor, rank: int, world_size: int, group=None) -> torch.Tensor:
    """All processes' ``[n, D]`` features concatenated in rank order, ``[world_size·n, D]``, with
    gradients: the backward sums, over processes, the gradient each one computes for a slice and
    returns it to the slice's owner. Every process must pass the same ``n``."""
    if world_size == 1:
        return features
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group "
                           f"(launch with torchrun, or call torch.distributed.init_process_group)")
    if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
        raise RuntimeError(f"the loss was built for rank {rank} of {world_size}, but this process is rank "
                           f"{dist.get_rank(group)} of {dist.get_world_size(group)}")
    with warnings.catch_warnings():
        # torch >= 2.10 marks it deprecated in favour of a private functional API; it is still the
        # public autograd-aware all-gather.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        parts = dist_nn.all_gather(features.contiguous(), group=group)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Exact tiled cross-entropies over a scaled similarity matrix
# --------------------------------------------------------------------------------------------

def _autocast_available(device: torch.device) -> bool:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    return is_available is not None and is_available(device.type)


def _no_autocast(device: torch.device):
    """Autocast off inside the tiled kernels: they pick their own precisions (see
    ``_matmul_dtype``; statistics in fp32), which autocast would otherwise override."""
    if _autocast_available(device):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _matmul_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype of the tiles' matmuls: the inputs' dtype, or autocast's when autocast is on at
    the call (as a dense ``a @ b.T`` would do)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    device_type = a.device.type
    if dtype.is_floating_point and _autocast_available(a.device) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _diagonal_block(i0: int, rows: int, j0: int, cols: int, offset: int):
    """Where the positives ``(r, r + offset)`` cross the tile of rows ``[i0, i0+rows)`` and columns
    ``[j0, j0+cols)``: ``(r_lo, r_hi, local_row, local_col)``, or None when they miss it."""
    r_lo = max(i0, j0 - offset)
    r_hi = min(i0 + rows, j0 + cols - offset)
    if r_lo >= r_hi:
        return None
    return r_lo, r_hi, r_lo - i0, r_lo + offset - j0


class _TiledClipCrossEntropy(torch.autograd.Function):
    """Per-row and per-column cross-entropies of ``S = scale * a @ b.T + bias``, tile by tile.

    ``a`` is ``[Na, D]``, ``b`` is ``[Nb, D]``; row ``r``'s positive is column ``r + offset``
    (``offset + Na <= Nb``). Outputs, in fp32 (fp64 for fp64 inputs):

    - ``ce_rows [Na]``: ``LSE_c S[r, c] - S[r, r + offset]`` (image→text when ``a`` are images);
    - ``ce_cols [Nb]`` when ``with_cols`` (needs ``Na == Nb``, ``offset == 0``):
      ``LSE_r S[r, c] - S[c, c]`` (text→image); otherwise an empty tensor.

    Forward visits ``k×k`` tiles of ``S`` and keeps, per row and per column, a running maximum
    and a running sum of ``exp(S - max)`` in fp32 (the online log-sum-exp), and picks the positives
    out of the tiles that cross the diagonal, so they are the very numbers inside the
    log-sum-exps. Each cross-entropy is formed as ``(max - positive) + log(sum)``, which keeps full
    precision when the positive dominates (a loss near 0), like a fused log-softmax.

    Backward recomputes each tile and uses ``softmax = exp((S - max) - log(sum))``: with upstream
    gradients ``g_r``, ``g_c`` the tile's gradient is
    ``G = g_r[:, None] * softmax_rows + g_c[None, :] * softmax_cols - (g_r + g_c) on the positives``
    and ``grad_a = scale * G @ b``, ``grad_b = scale * G.T @ a``,
    ``grad_scale = sum(G * (a @ b.T)) = sum(a * (G @ b))``. ``grad_bias`` is exactly 0: a
    cross-entropy does not change when every logit moves by the same amount.

    Saved for backward: the inputs and four ``[N]`` statistics; working memory is a few ``k×k``
    tiles plus fp32 gradient accumulators of ``O(N·D)``. Matmuls run in ``compute_dtype`` (the
    inputs' dtype, or autocast's; bf16/fp16 for tensor-core / AMX speed); their outputs are
    turned to fp32 before any exponentiation or accumulation.

    Distributed use (``ClipLoss(tile_size=k, world_size=W)``): after all-gathering features, call it with the *local* rows against
    the *gathered* columns, ``a = local_image_features [n, D]``, ``b = all_text_features
    [world·n, D]``, ``offset = rank·n``, ``with_cols=False``: ``ce_rows`` are then exactly the local
    image→text cross-entropies. The text→image ones come from a second call with
    ``a = local_text_features``, ``b = all_image_features`` (same offset). ``grad_b`` flows back to
    the owning ranks through the autograd of the all-gather (``torch.distributed.nn.all_gather``).
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, tile_size: int, with_cols: bool, offset: int, compute_dtype: torch.dtype):
        with _no_autocast(a.device):
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            a_c, b_c = a.to(compute_dtype), b.to(compute_dtype)
            s = scale.detach().to(acc_dtype).reshape(())
            bias_v = None if bias is None else bias.detach().to(acc_dtype).reshape(())
            na, nb, k = a.shape[0], b.shape[0], tile_size
            new = dict(dtype=acc_dtype, device=a.device)

            row_max, row_sum = torch.empty(na, **new), torch.empty(na, **new)
            positives = torch.empty(na, **new)
            if with_cols:
                col_max, col_sum = torch.full((nb,), -math.inf, **new), torch.zeros(nb, **new)
            b_tiles = b_c.split(k)
            for i0 in range(0, na, k):
                a_tile = a_c[i0:i0 + k]
                r_max = torch.full((a_tile.shape[0],), -math.inf, **new)
                r_sum = torch.zeros(a_tile.shape[0], **new)
                for j, b_tile in enumerate(b_tiles):
                    j0 = j * k
                    logits = _logit_tile(a_tile, b_tile, s, bias_v, acc_dtype)
                    block = _diagonal_block(i0, a_tile.shape[0], j0, b_tile.shape[0], offset)
                    if block is not None:
                        r_lo, r_hi, lr, lc = block
                        positives[r_lo:r_hi] = logits[lr:lr + r_hi - r_lo, lc:lc + r_hi - r_lo].diagonal()
                    r_max, r_sum = _online_lse_update(logits, r_max, r_sum, dim=1)
                    if with_cols:
                        col_max[j0:j0 + k], col_sum[j0:j0 + k] = _online_lse_update(
                            logits, col_max[j0:j0 + k], col_sum[j0:j0 + k], dim=0)
                row_max[i0:i0 + k], row_sum[i0:i0 + k] = r_max, r_sum
            row_logsum = row_sum.log_()
            ce_rows = (row_max - positives) + row_logsum
            if with_cols:
                col_logsum = col_sum.log_()
                ce_cols = (col_max - positives) + col_logsum
            else:
                col_max = col_logsum = ce_cols = row_max.new_empty(0)

        ctx.save_for_backward(a, b, scale, bias, row_max, row_logsum, col_max, col_logsum)
        ctx.tile_size, ctx.with_cols, ctx.offset, ctx.compute_dtype = tile_size, with_cols, offset, compute_dtype
        return ce_rows, ce_cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, grad_cols):
        a, b, scale, bias, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        need_a, need_b, need_scale, need_bias = ctx.needs_input_grad[:4]
        k, with_cols, offset, compute_dtype = ctx.tile_size, ctx.with_cols, ctx.offset, ctx.compute_dtype
        with _no_autocast(a.device):
            acc_dtype = row_max.dtype
            a_c, b_c = a.to(compute_dtype), b.to(compute_dtype)
            s = scale.detach().to(acc_dtype).reshape(())
            bias_v = None if bias is None else bias.detach().to(acc_dtype).reshape(())
            g_r = grad_rows.to(acc_dtype)
            g_c = grad_cols.to(acc_dtype) if with_cols else None
            # What the positives take off: d(-S[r, r+offset]) for the row and (square case) column.
            g_pos = g_r + g_c if with_cols else g_r

            # Unscaled fp32 accumulators: ga = sum_j G @ b_j and gb = sum_i G.T @ a_i.
            want_ga = need_a or need_scale
            ga = torch.zeros(a.shape, dtype=acc_dtype, device=a.device) if want_ga else None
            gb = torch.zeros(b.shape, dtype=acc_dtype, device=a.device) if need_b else None
            if want_ga or need_b:
                b_tiles = b_c.split(k)
                for i0 in range(0, a.shape[0], k):
                    a_tile = a_c[i0:i0 + k]
                    rows = slice(i0, i0 + a_tile.shape[0])
                    for j, b_tile in enumerate(b_tiles):
                        j0 = j * k
                        cols = slice(j0, j0 + b_tile.shape[0])
                        logits = _logit_tile(a_tile, b_tile, s, bias_v, acc_dtype)
                        grad = (logits - row_max[rows, None]).sub_(row_logsum[rows, None]).exp_()
                        grad.mul_(g_r[rows, None])
                        if with_cols:
                            logits.sub_(col_max[None, cols]).sub_(col_logsum[None, cols]).exp_()
                            grad.add_(logits.mul_(g_c[None, cols]))
                        block = _diagonal_block(i0, a_tile.shape[0], j0, b_tile.shape[0], offset)
                        if block is not None:
                            r_lo, r_hi, lr, lc = block
                            grad[lr:lr + r_hi - r_lo, lc:lc + r_hi - r_lo].diagonal().sub_(g_pos[r_lo:r_hi])
                        grad = grad.to(compute_dtype)
                        if want_ga:
                            ga[rows] += (grad @ b_tile).to(acc_dtype)
                        if need_b:
                            gb[cols] += (grad.T @ a_tile).to(acc_dtype)

            grad_a = (ga * s).to(a.dtype) if need_a else None
            grad_b = (gb * s).to(b.dtype) if need_b else None
            grad_scale = None
            if need_scale:
                grad_scale = (ga * a.to(acc_dtype)).sum().to(scale.dtype).reshape(scale.shape)
            grad_bias = torch.zeros_like(bias) if need_bias else None
        return grad_a, grad_b, grad_scale, grad_bias, None, None, None, None


def _logit_tile(a_tile, b_tile, s, bias, acc_dtype):
    """One tile ``s * a_tile @ b_tile.T (+ bias)`` as a fresh ``acc_dtype`` tensor."""
    logits = (a_tile @ b_tile.T).to(acc_dtype)  # matmul in the inputs' dtype, then fp32
    logits.mul_(s)
    if bias is not None:
        logits.add_(bias)
    return logits


def _online_lse_update(logits, run_max, run_sum, dim: int):
    """Merge a tile into running (max, sum of exp(x - max)) statistics along ``dim``."""
    new_max = torch.maximum(run_max, logits.amax(dim=dim))
    shifted = logits - (new_max[:, None] if dim == 1 else new_max[None, :])
    new_sum = run_sum * (run_max - new_max).exp() + shifted.exp_().sum(dim=dim)
    return new_max, new_sum


def _as_scalar_tensor(value, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.numel() != 1:
        raise ValueError(f"{name} must hold a single value, got shape {tuple(t.shape)}")
    return t


def tiled_clip_cross_entropy(a: torch.Tensor, b: torch.Tensor, logit_scale, logit_bias=None, *,
                             tile_size: int = 1024, with_cols: bool = True, offset: int = 0):
    """Cross-entropies of ``S = logit_scale * a @ b.T + logit_bias`` without building ``S``.

    Row ``r``'s positive is column ``r + offset``. Returns ``(ce_rows [Na], ce_cols [Nb])`` in fp32:
    ``ce_rows[r] = logsumexp(S[r, :]) - S[r, r + offset]`` and, with ``with_cols`` (square,
    ``offset=0``), ``ce_cols[c] = logsumexp(S[:, c]) - S[c, c]``; ``ce_cols`` is empty otherwise.
    Differentiable w.r.t. ``a``, ``b``, ``logit_scale`` and ``logit_bias``; peak extra memory is
    ``O((Na + Nb)·D + tile_size²)``. ``ClipLoss(tile_size=k)`` is the mean of both, halved.

    The tiles' matmuls run in the inputs' dtype, or in autocast's dtype when called under
    autocast; softmax statistics and gradient accumulation are fp32 in every case, and gradients
    come back in the inputs' dtypes.
    """
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [Na, D] and [Nb, D]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"the positives (r, r + {offset}) of {a.shape[0]} rows fall outside {b.shape[0]} columns")
    if with_cols and (a.shape[0] != b.shape[0] or offset != 0):
        raise ValueError("with_cols needs as many rows as columns and offset=0")
    scale = _as_scalar_tensor(logit_scale, a.device, "logit_scale")
    bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, a.device, "logit_bias")
    return _TiledClipCrossEntropy.apply(a, b, scale, bias, tile_size, bool(with_cols), int(offset),
                                        _matmul_dtype(a, b))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

class ClipLoss(nn.Module):
    """The CLIP (InfoNCE) loss: mean of the image→text and text→image cross-entropies.

    ``tile_size=None`` builds the ``N×N`` logits like OpenCLIP's ``ClipLoss`` (same numbers to
    fp32 rounding, same dtype behaviour; about 4 ``N×N`` buffers at the peak of forward+backward).
    ``tile_size=k`` uses the exact tiled path (:func:`tiled_clip_cross_entropy`): the same loss and
    gradients (w.r.t. both feature matrices, ``logit_scale`` and ``logit_bias``) to fp32 rounding,
    with ``O(N·D + k²)`` extra memory instead of ``O(N²)``. Its matmuls run in the features' dtype
    (or autocast's), its softmax statistics in fp32, and its result is an fp32 scalar.

    With ``world_size > 1`` each process passes its own ``n`` pairs; the features of all processes
    are gathered with gradients and the process returns its local loss (its rows and columns of the
    global ``N×N`` similarity matrix, see the module docs for why no rescaling is needed). Dense:
    an ``n×N`` logits block per direction; tiled: local rows against gathered columns, exact, with
    ``O(N·D + k²)`` memory.
    """

    def __init__(self, tile_size: int | None = None, rank: int = 0, world_size: int = 1):
        super().__init__()
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(f"tile_size must be None or a positive int, got {tile_size!r}")
        _check_world("ClipLoss", rank, world_size)
        self.tile_size = tile_size
        self.rank = rank
        self.world_size = world_size

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, rank={self.rank}, world_size={self.world_size}"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        _check_features(image_features, text_features)
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        elif self.tile_size is None:
            loss = self._dense(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._tiled(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image_features, text_features, logit_scale, logit_bias):
        n = image_features.shape[0]
        offset = self.rank * n  # where this process's pairs sit in the global batch
        all_images = gather_features(image_features, self.rank, self.world_size)
        all_texts = gather_features(text_features, self.rank, self.world_size)
        if self.tile_size is not None:
            ce_image, _ = tiled_clip_cross_entropy(image_features, all_texts, logit_scale, logit_bias,
                                                   tile_size=self.tile_size, with_cols=False, offset=offset)
            ce_text, _ = tiled_clip_cross_entropy(text_features, all_images, logit_scale, logit_bias,
                                                  tile_size=self.tile_size, with_cols=False, offset=offset)
            return (ce_image.mean() + ce_text.mean()) / 2
        logits_per_image = logit_scale * image_features @ all_texts.T   # local rows     [n, N]
        logits_per_text = logit_scale * text_features @ all_images.T    # local columns  [n, N]
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = torch.arange(offset, offset + n, device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    @staticmethod
    def _dense(image_features, text_features, logit_scale, logit_bias):
        logits_per_image = logit_scale * image_features @ text_features.T
        if logits_per_image.dtype == torch.float32:
            # The text→image logits are the transpose: one fp32 N×N product instead of two.
            logits_per_text = logits_per_image.T
        else:
            # bf16/fp16 (or autocast): the second product is cheap, and a cross-entropy over
            # contiguous rows is faster than over the transpose (1.5× on an H200 at N=65536).
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def _tiled(self, image_features, text_features, logit_scale, logit_bias):
        ce_image, ce_text = tiled_clip_cross_entropy(image_features, text_features, logit_scale, logit_bias,
                                                     tile_size=self.tile_size)
        return (ce_image.mean() + ce_text.mean()) / 2


class SigLipLoss(nn.Module):
    """The sigmoid loss of SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343).

    Every pair ``(i, j)`` is a binary problem, label ``+1`` on the diagonal and ``-1`` elsewhere::

        loss = -sum_ij logsigmoid(label_ij * (logit_scale * I_i·T_j + logit_bias)) / N

    normalised by the batch size ``N`` (not ``N²``), exactly as OpenCLIP's ``SigLipLoss``.
    Models trained with it start from ``logit_scale = exp(SIGLIP_INIT_LOGIT_SCALE) = 10`` and
    ``logit_bias = SIGLIP_INIT_LOGIT_BIAS = -10``. ``logit_bias=None`` means no bias.

    With ``world_size > 1`` each process scores its ``n`` images against the texts of *all*
    processes and normalises by its own ``n``: the local loss, whose mean over processes is the
    global loss (module docs). The texts are exchanged with one all-gather with gradients rather
    than passed around the ring with send/recv as in the SigLIP paper and OpenCLIP: the same
    numbers and gradients, one collective instead of ``world_size - 1`` exchanges, for an extra
    ``N×D`` buffer of text features (a few MB even at N=65536) and an ``n×N`` logits block.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        _check_world("SigLipLoss", rank, world_size)
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        _check_features(image_features, text_features)
        n = image_features.shape[0]
        all_texts = gather_features(text_features, self.rank, self.world_size)
        logits = logit_scale * image_features @ all_texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        # +1 on this process's diagonal block (its own pairs), -1 everywhere else
        labels = torch.full_like(logits, -1.0, dtype=image_features.dtype)
        labels[:, self.rank * n:(self.rank + 1) * n] = 2 * torch.eye(n, device=logits.device,
                                                                     dtype=image_features.dtype) - 1
        loss = -F.logsigmoid(labels * logits).sum() / n
        return {"contrastive_loss": loss} if output_dict else loss


def clamp_logit_scale_(model: nn.Module, max_log_scale: float = math.log(100)) -> torch.Tensor:
    """Clamp ``model.logit_scale`` (the log-temperature parameter) in place to ``[0, max_log_scale]``.

    Call after every optimizer step, as CLIP training does, so the scale stays within ``[1, 100]``.
    Finds the parameter on the model itself or on the module it wraps (``.module`` for
    DDP/DataParallel, ``._orig_mod`` for ``torch.compile``). Returns the (clamped) parameter.
    """
    target = model
    seen = set()
    while not isinstance(getattr(target, "logit_scale", None), torch.Tensor):
        seen.add(id(target))
        inner = getattr(target, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(target, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or id(inner) in seen:
            raise AttributeError(f"{type(model).__name__} has no `logit_scale` tensor (also looked "
                                 f"at wrapped `.module` / `._orig_mod`)")
        target = inner
    logit_scale = target.logit_scale
    with torch.no_grad():
        logit_scale.clamp_(0, max_log_scale)
    return logit_scale


_LOSSES = ("clip", "siglip")


def build_loss(name: str, tile_size: int | None = None, *, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The loss called ``name``: ``'clip'`` (dense, or tiled with ``tile_size``) or ``'siglip'``."""
    key = name.lower()
    if key == "clip":
        return ClipLoss(tile_size=tile_size, rank=rank, world_size=world_size)
    if key == "siglip":
        if tile_size is not None:
            raise ValueError("tile_size applies only to the 'clip' loss; SigLipLoss has no tiled path")
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(repr(n) for n in _LOSSES)}")
