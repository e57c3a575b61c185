"""One optimisation step of contrastive training, with optional cached-feature accumulation."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .precision import autocast


def _features(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, lock_image: bool, lock_text: bool):
    """Normalised features; a locked tower runs without building a graph (LiT)."""
    with torch.no_grad() if lock_image else contextlib.nullcontext():
        image_features = model.encode_image(images, normalize=True)
    with torch.no_grad() if lock_text else contextlib.nullcontext():
        text_features = model.encode_text(tokens, normalize=True)
    return image_features, text_features


def _scale_and_bias(model: nn.Module) -> tuple[torch.Tensor, ...]:
    scale = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", None)
    return (scale,) if bias is None else (scale, bias)


def contrastive_step(model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     precision: str, accum: int = 1, lock_image: bool = False, lock_text: bool = False) -> torch.Tensor:
    """Forward and backward for one batch; returns the (detached) loss. Gradients accumulate in
    ``.grad``; the caller clips, steps and zeroes them.

    With ``accum > 1`` the batch runs in ``accum`` micro-batches without losing contrastive
    negatives (the GradCache method, Gao et al. 2021): first every micro-batch's features are
    computed without a graph, the loss over the whole batch gives the gradient with respect to each
    feature, then each micro-batch is recomputed with a graph and back-propagated from that gradient.
    The random state is replayed, so patch dropout draws the same patches in both passes. The
    gradients equal those of one big batch.
    """
    device = images.device
    if accum <= 1:
        with autocast(precision, device):
            image_features, text_features = _features(model, images, tokens, lock_image, lock_text)
            loss = loss_fn(image_features.float(), text_features.float(), *_scale_and_bias(model))
        loss.backward()
        return loss.detach()

    image_chunks, token_chunks = images.chunk(accum), tokens.chunk(accum)
    rng_states, cached_images, cached_texts = [], [], []
    with torch.no_grad(), autocast(precision, device):
        for image_chunk, token_chunk in zip(image_chunks, token_chunks):
            rng_states.append(_rng_state(device))
            image_features, text_features = _features(model, image_chunk, token_chunk, True, True)
            cached_images.append(image_features.float())
            cached_texts.append(text_features.float())
    all_images = torch.cat(cached_images).requires_grad_(not lock_image)
    all_texts = torch.cat(cached_texts).requires_grad_(not lock_text)
    with autocast(precision, device):
        loss = loss_fn(all_images, all_texts, *_scale_and_bias(model))
    loss.backward()  # gradients for the cached features and for logit_scale / logit_bias

    offsets = [0]
    for chunk in image_chunks:
        offsets.append(offsets[-1] + chunk.shape[0])
    final_state = _rng_state(device)
    for index, (image_chunk, token_chunk) in enumerate(zip(image_chunks, token_chunks)):
        _set_rng_state(device, rng_states[index])
        rows = slice(offsets[index], offsets[index + 1])
        with autocast(precision, device):
            image_features, text_features = _features(model, image_chunk, token_chunk, lock_image, lock_text)
        outputs, grads = [], []
        if not lock_image:
            outputs.append(image_features.float())
            grads.append(all_images.grad[rows])
        if not lock_text:
            outputs.append(text_features.float())
            grads.append(all_texts.grad[rows])
        torch.autograd.backward(outputs, grads)
    _set_rng_state(device, final_state)
    return loss.detach()


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
