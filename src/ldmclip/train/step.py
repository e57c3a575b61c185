"""One optimisation step of contrastive training, with optional cached-feature accumulation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .anchor import TextAnchor
from .parallelize import gradient_sync
from ..core.precision import autocast


def _forward(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """``model(images, tokens)``: normalised features, ``logit_scale.exp()`` (and ``logit_bias``).

    Going through ``forward`` is what lets DDP and FSDP2 hook in. A locked tower's parameters do
    not require gradients, so no graph is built through it (LiT)."""
    image_features, text_features, *scale_and_bias = model(images, tokens)
    return image_features, text_features, scale_and_bias


def contrastive_step(model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     precision: str, accum: int = 1, lock_image: bool = False, lock_text: bool = False,
                     on_forward_done: Callable[[], None] | None = None, anchor: TextAnchor | None = None) -> torch.Tensor:
    """Forward and backward for one batch; returns the (detached) loss. Gradients accumulate in
    ``.grad``; the caller clips, steps and zeroes them.

    ``model`` may be wrapped by DDP or sharded by FSDP2, and ``loss_fn`` distributed (features
    gathered over processes); the returned loss is then this process's local loss.

    With ``accum > 1`` the batch runs in ``accum`` micro-batches without losing contrastive
    negatives (the GradCache method, Gao et al. 2021): first every micro-batch's features are
    computed without a graph, the loss over the whole batch gives the gradient with respect to each
    feature (and to ``logit_scale`` / ``logit_bias``), then each micro-batch is recomputed with a
    graph and back-propagated from those gradients (the scale's with the last one, when the
    gradients are also reduced across processes). The random state is replayed, so patch dropout
    draws the same patches in both passes. The gradients equal those of one big batch.

    ``on_forward_done`` is called between the forward and the backward pass (to time them apart);
    with ``accum > 1`` the passes interleave and it is not called.

    ``anchor`` (when its weight is above 0): ``anchor.weight x`` the anchor loss (train/anchor.py) is
    added, back-propagated with the contrastive loss (per micro-batch, each its share of the mean);
    the contrastive loss is still what is returned (NaN when the anchor loss is not finite, so the
    caller skips the step), the anchor loss is left in ``anchor.last_loss``.
    """
    device = images.device
    anchor = anchor if anchor is not None and anchor.active else None
    count = tokens.shape[0]  # (the anchor loss: a mean over captions)
    if anchor is not None:
        anchor.last_loss = None
    if accum <= 1:
        with autocast(precision, device):
            with _capturing(anchor):
                image_features, text_features, scale_and_bias = _forward(model, images, tokens)
            loss = loss_fn(image_features.float(), text_features.float(), *scale_and_bias)
            total = loss
            for term in _anchor_terms(anchor, tokens, count):
                total = total + term
        if on_forward_done is not None:
            on_forward_done()
        total.backward()
        return _with_anchor_check(loss.detach(), anchor)

    image_chunks, token_chunks = images.chunk(accum), tokens.chunk(accum)
    rng_states, cached_images, cached_texts = [], [], []
    with torch.no_grad(), autocast(precision, device):
        for image_chunk, token_chunk in zip(image_chunks, token_chunks):
            rng_states.append(_rng_state(device))
            image_features, text_features, scale_and_bias = _forward(model, image_chunk, token_chunk)
            cached_images.append(image_features.float())
            cached_texts.append(text_features.float())
    all_images = torch.cat(cached_images).requires_grad_(not lock_image)
    all_texts = torch.cat(cached_texts).requires_grad_(not lock_text)
    scale_leaves = [t.detach().requires_grad_(True) for t in scale_and_bias]
    with autocast(precision, device):
        loss = loss_fn(all_images, all_texts, *scale_leaves)
    loss.backward()  # gradients for the cached features and for logit_scale / logit_bias

    offsets = [0]
    for chunk in image_chunks:
        offsets.append(offsets[-1] + chunk.shape[0])
    final_state = _rng_state(device)
    last = len(image_chunks) - 1
    for index, (image_chunk, token_chunk) in enumerate(zip(image_chunks, token_chunks)):
        _set_rng_state(device, rng_states[index])
        rows = slice(offsets[index], offsets[index + 1])
        with gradient_sync(model, index == last):
            with autocast(precision, device), _capturing(anchor):
                image_features, text_features, scale_and_bias = _forward(model, image_chunk, token_chunk)
            outputs, grads = [], []
            for term in _anchor_terms(anchor, token_chunk, count):  # this micro-batch's share of the mean
                outputs.append(term)
                grads.append(torch.ones_like(term))
            if not lock_image:
                outputs.append(image_features.float())
                grads.append(all_images.grad[rows])
            if not lock_text:
                outputs.append(text_features.float())
                grads.append(all_texts.grad[rows])
            if index == last:
                for value, leaf in zip(scale_and_bias, scale_leaves):
                    if leaf.grad is not None and value.requires_grad:
                        outputs.append(value)
                        grads.append(leaf.grad.to(value.dtype))
            torch.autograd.backward(outputs, grads)
    _set_rng_state(device, final_state)
    return _with_anchor_check(loss.detach(), anchor)


def _capturing(anchor: TextAnchor | None):
    return anchor.capture() if anchor is not None else contextlib.nullcontext()


def _anchor_terms(anchor: TextAnchor | None, tokens: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``[weight x loss_sum / count]`` for the hidden states just captured (adding the unweighted part to
    ``anchor.last_loss``), or ``[]`` with no anchor or when no trainable weight lies below the layer."""
    if anchor is None:
        return []
    part = anchor.loss_sum(tokens) / count
    anchor.last_loss = part.detach() if anchor.last_loss is None else anchor.last_loss + part.detach()
    return [anchor.weight * part] if part.requires_grad else []


def _with_anchor_check(loss: torch.Tensor, anchor: TextAnchor | None) -> torch.Tensor:
    if anchor is None:
        return loss
    return torch.where(torch.isfinite(anchor.last_loss), loss, torch.full_like(loss, float("nan")))


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
