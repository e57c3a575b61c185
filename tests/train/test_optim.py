"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

import ldmclip
from ldmclip.train.optim import build_optimizer, build_scheduler, cosine_with_warmup, parameter_groups


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = ldmclip.create_model("ViT-Tiny-64")
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in not_decayed and "ln_final.weight" in not_decayed
    assert "token_embedding.weight" in not_decayed and "positional_embedding" in not_decayed
    assert "visual.class_embedding" in not_decayed and "visual.positional_embedding" in not_decayed
    assert "transformer.resblocks.0.attn.in_proj_bias" in not_decayed
    assert "transformer.resblocks.0.attn.in_proj_weight" in decayed and "visual.proj" in decayed
    assert "text_projection" in decayed and "visual.conv1.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    model = ldmclip.create_model("ViT-Tiny-64")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)


def test_cosine_schedule_with_linear_warmup():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, 2, 6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.5) and seen[1] == pytest.approx(1.0)
    assert seen[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
