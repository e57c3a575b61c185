"""--anchor-layer / --anchor-weight (train/anchor.py): the anchor loss against a hand computation (value and
gradients, with and without --accum), the frozen copy stays as it was, the drift is 0 at the start and
grows with training (less with a large weight), the layer is the one LDM conditioning reads, and a run
reports anchor_drift, loss_anchor and its settings.

Tiny models (ViT-Tiny-64: 2 text blocks) on random images and captions; the run tests are a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import ldmclip
from ldmclip import losses
from ldmclip.core.errors import UserError
from ldmclip.models import CLIP, CLIPConfig
from ldmclip.models.text import hidden_state_index
from ldmclip.registry import get_tokenizer
from ldmclip.train import TrainConfig
from ldmclip.train.anchor import TextAnchor, build_anchor
from ldmclip.train.step import contrastive_step
from tests.conftest import relative_error

CAPTIONS = ["a red square", "two small blue circles on a green field", "a cat", "yellow triangle next to a big star",
            "an empty room", "a dog running on the beach at sunset", "the sky", "three purple hexagons"]


def _model(text_layers: int = 2) -> CLIP:
    raw = ldmclip.create_model("ViT-Tiny-64").config.to_dict()
    raw["text_cfg"]["layers"] = text_layers
    return CLIP(CLIPConfig.from_dict(raw))


def _batch(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = get_tokenizer("ViT-Tiny-64")(CAPTIONS[:count])
    return torch.randn(count, 3, 64, 64), tokens


def _perturb_text(model: CLIP, scale: float = 0.05) -> None:
    with torch.no_grad():
        for block in model.transformer.resblocks:
            for param in block.parameters():
                param.add_(scale * torch.randn_like(param))
        model.token_embedding.weight.add_(scale * torch.randn_like(model.token_embedding.weight))


def _hand_anchor_loss(model: CLIP, original: CLIP, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
    """Caption by caption, token by token, over all positions of the context then cut at the EOT."""
    h = model.text_hidden_states(tokens)[blocks - 1]
    with torch.no_grad():
        h0 = original.text_hidden_states(tokens)[blocks - 1]
    per_caption = []
    for row in range(tokens.shape[0]):
        terms = []
        for position in range(int(tokens[row].argmax()) + 1):
            diff = h[row, position] - h0[row, position]
            terms.append(diff.pow(2).sum() / h0[row, position].pow(2).sum())
        per_caption.append(torch.stack(terms).mean())
    return torch.stack(per_caption).mean()


def _text_grads(model: CLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and not n.startswith("visual.")}


# ---- the layer


def test_the_layer_is_the_one_ldm_conditioning_reads():
    from ldmclip.conditioning import conditioner
    from ldmclip.conditioning.conditioner import TextConditioner

    assert conditioner.hidden_state_index is hidden_state_index  # one rule, in models/text.py
    assert [hidden_state_index(layer, 12) for layer in ("penultimate", "last", -2, 0, 12)] == [11, 12, 11, 0, 12]
    model = _model(text_layers=12).eval()
    anchor = TextAnchor(model, "penultimate")
    assert anchor.blocks == 11 and len(anchor.frozen.transformer.resblocks) == 11
    _, tokens = _batch()
    with torch.no_grad(), anchor.capture():
        model.encode_text(tokens)
    captured = anchor.take()  # up to the longest caption's EOT (encode_text stops there)
    length = captured.shape[1]
    assert length == int(tokens.argmax(-1).max()) + 1
    # hidden_states[-2] of the 13 (embedding + 12 blocks), as SD 2.x / SDXL read it, and as the conditioner gives it
    with torch.no_grad():
        expected = model.text_hidden_states(tokens)[-2][:, :length]
    assert relative_error(captured, expected) < 1e-5
    cond = TextConditioner(model, get_tokenizer("ViT-Tiny-64"), layer="penultimate", final_ln=False)
    assert cond.blocks == [11]
    with torch.no_grad():
        hidden = cond(CAPTIONS).hidden
    for row in range(tokens.shape[0]):  # the caption's tokens (padding ids may differ after the EOT)
        upto = int(tokens[row].argmax()) + 1
        assert relative_error(hidden[row, :upto], captured[row, :upto]) < 1e-5


def test_a_layer_the_tower_lacks_is_a_user_error():
    with pytest.raises(UserError, match="--anchor-layer"):
        TextAnchor(_model(), 7)
    with pytest.raises(UserError, match="--anchor-layer"):
        TrainConfig(anchor_layer="second").validate()
    assert TrainConfig(anchor_layer="-1").validate().anchor_layer == "-1"


def test_anchor_weight_with_a_locked_text_tower_is_a_user_error():
    model = _model()
    model.lock_text_tower()
    with pytest.raises(UserError, match="--lock-text"):
        build_anchor(TrainConfig(anchor_weight=1.0), model)
    assert build_anchor(TrainConfig(), model) is None  # drift 0 by construction: no frozen copy


# ---- the loss


@pytest.mark.parametrize("layer", ["penultimate", "last", 0])
def test_anchor_loss_equals_the_hand_computation(layer):
    model = _model()
    original = copy.deepcopy(model)
    anchor = TextAnchor(model, layer, weight=1.0)
    _perturb_text(model)
    images, tokens = _batch()
    with anchor.capture():
        model(images, tokens)
    got = anchor.loss_sum(tokens) / tokens.shape[0]
    expected = _hand_anchor_loss(model, original, tokens, anchor.blocks) if anchor.blocks else None
    if expected is None:  # layer 0: the embeddings
        h, h0 = model.embed_tokens(tokens), original.embed_tokens(tokens)
        mask = torch.arange(tokens.shape[1]) <= tokens.argmax(-1, keepdim=True)
        per_token = (h - h0).pow(2).sum(-1) / h0.pow(2).sum(-1)
        expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    assert float(expected.detach()) > 1e-4  # the perturbation moved the layer (else equality proves nothing)
    assert relative_error(got.detach(), expected.detach()) < 1e-5


@pytest.mark.parametrize("accum", [1, 2])
def test_the_step_adds_weight_times_the_anchor_gradient(accum):
    weight = 3.0
    model = _model()
    original = copy.deepcopy(model)
    anchor = TextAnchor(model, "penultimate", weight)  # the frozen copy: the weights before the perturbation
    _perturb_text(model)
    images, tokens = _batch()
    loss_fn = losses.build_loss("clip")

    plain = contrastive_step(model, loss_fn, images, tokens, "fp32", accum)
    plain_grads = _text_grads(model)
    model.zero_grad(set_to_none=True)
    anchored = contrastive_step(model, loss_fn, images, tokens, "fp32", accum, anchor=anchor)
    anchored_grads = _text_grads(model)
    model.zero_grad(set_to_none=True)

    hand = _hand_anchor_loss(model, original, tokens, anchor.blocks)
    hand.backward()
    hand_grads = _text_grads(model)
    assert torch.equal(plain, anchored)  # the returned loss is the contrastive one
    assert relative_error(anchor.last_loss, hand.detach()) < 1e-5
    assert set(hand_grads) <= set(anchored_grads)
    for name, grad in anchored_grads.items():
        expected = plain_grads[name] + weight * hand_grads.get(name, torch.zeros_like(grad))
        assert relative_error(grad, expected) < 1e-4, name
    assert any(g.abs().max() > 0 for g in hand_grads.values())
    assert all(p.grad is None for p in anchor.frozen.parameters())


def test_a_nonfinite_anchor_loss_makes_the_returned_loss_nan():
    model = _model()
    anchor = TextAnchor(model, "penultimate", weight=1.0)
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight.fill_(float("inf"))
    images, tokens = _batch()
    loss = contrastive_step(model, losses.build_loss("clip"), images, tokens, "fp32", anchor=anchor)
    assert torch.isnan(loss)


# ---- the frozen copy and the drift


def _train_steps(model: CLIP, anchor: TextAnchor | None, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = losses.build_loss("clip")
    for _ in range(steps):
        images, tokens = _batch()
        contrastive_step(model, loss_fn, images, tokens, "fp32", anchor=anchor)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_frozen_copy_does_not_change_and_the_drift_grows_from_zero():
    model = _model()
    anchor = TextAnchor(model, "penultimate", weight=1.0)
    start = {k: v.clone() for k, v in anchor.frozen.state_dict().items()}
    assert all(not p.requires_grad for p in anchor.frozen.parameters())
    _, tokens = _batch()
    assert anchor.drift(model, tokens, torch.device("cpu"), batch_size=3) == 0.0
    _train_steps(model, anchor, steps=4)
    assert all(p.grad is None for p in anchor.frozen.parameters())
    assert all(torch.equal(v, start[k]) for k, v in anchor.frozen.state_dict().items())
    assert anchor.drift(model, tokens, torch.device("cpu")) > 1e-3


def test_a_large_weight_keeps_the_layer_closer_than_no_weight():
    drifts = {}
    for weight in (0.0, 100.0):
        torch.manual_seed(1)
        model = _model()
        anchor = TextAnchor(model, "penultimate", weight=weight)
        _train_steps(model, anchor, steps=4, seed=2)
        drifts[weight] = anchor.drift(model, _batch()[1], torch.device("cpu"))
    assert drifts[0.0] > 1e-2
    assert drifts[100.0] < 0.5 * drifts[0.0]


# ---- a run


def _records(output: Path, kind: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


FLAGS = ["--model", "ViT-Tiny-64", "--precision", "fp32", "--workers", "0", "--val-size", "16", "--steps", "4",
         "--batch-size", "8", "--eval-every", "2", "--log-every", "1", "--save-every", "0", "--lr", "3e-3",
         "--warmup", "0", "--progress", "no"]


def _run(output: Path, *extra: str) -> Path:
    import argparse

    from ldmclip.cli.train import add_arguments, config_from_args
    from ldmclip.train import train

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    train(config_from_args(parser.parse_args([*FLAGS, "--output", str(output), *extra])))
    return output


def test_a_run_reports_the_drift_and_with_a_weight_the_anchor_loss(tmp_path):
    anchored = _run(tmp_path / "anchored", "--anchor-weight", "2", "--anchor-layer", "-2")
    settings = json.loads((anchored / "config.json").read_text())
    assert settings["anchor_weight"] == 2.0 and settings["anchor_layer"] == "-2"
    assert settings["anchor_settings"]["hidden_state_index"] == 1 and settings["anchor_settings"]["weight"] == 2.0
    train_records = _records(anchored, "train")
    assert len(train_records) == 4 and all(r["loss_anchor"] >= 0 for r in train_records)
    assert train_records[-1]["loss_anchor"] > 0
    val = _records(anchored, "val")
    assert [r["step"] for r in val] == [2, 4] and all(r["anchor_drift"] > 0 for r in val)

    # fine-tuning without a weight: the drift from the starting weights is still reported, no loss term
    plain = _run(tmp_path / "plain", "--pretrained", str(anchored / "final"))
    assert all("loss_anchor" not in r for r in _records(plain, "train"))
    assert all(r["anchor_drift"] > 0 for r in _records(plain, "val"))
    assert json.loads((plain / "config.json").read_text())["anchor_settings"]["weight"] == 0.0


def test_from_scratch_without_a_weight_keeps_no_frozen_copy():
    """The drift from random weights means nothing; the copy would cost a text tower's memory on every GPU."""
    from ldmclip.train.anchor import build_anchor
    from ldmclip.train.config import TrainConfig

    model = _model()
    assert build_anchor(TrainConfig(), model) is None
    assert build_anchor(TrainConfig(anchor_weight=1.0), model) is not None
    assert build_anchor(TrainConfig(pretrained="weights.safetensors"), model) is not None


# ---- several processes (the frozen copy outside DDP, kept whole under FSDP2)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_anchor_loss(tmp_path, parallel):
    from tests.train.test_distributed import _max_weight_error, _torchrun_train, _train_here, _weights

    flags = ["--batch-size", "16", "--steps", "3", "--save-every", "0", "--anchor-weight", "50",
             "--eval-every", "3", "--lr", "3e-3"]
    _torchrun_train(tmp_path / "two", *flags, *parallel)
    _train_here(tmp_path / "one", *flags)
    error, key = _max_weight_error(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    assert error <= 1e-4, (key, error)
    drift = [_records(tmp_path / name, "val")[-1]["anchor_drift"] for name in ("two", "one")]
    assert drift[1] > 0 and drift[0] == pytest.approx(drift[1], rel=1e-3)
