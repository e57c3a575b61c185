"""The training step: accumulation keeps the whole contrastive batch; towers lock; checkpointing is exact."""

from __future__ import annotations

import copy

import pytest
import torch

import ldmclip
from ldmclip.losses import ClipLoss, SigLipLoss
from ldmclip.train.parallelize import apply_activation_checkpointing, lock_text_tower, lock_tower
from ldmclip.train.step import contrastive_step
from tests.conftest import relative_error


def _batch(n: int = 12):
    images = torch.randn(n, 3, 64, 64)
    tokens = torch.randint(1, 49000, (n, 32))
    lengths = torch.randint(3, 32, (n,))
    tokens[torch.arange(n), lengths] = 49407
    tokens[torch.arange(32)[None, :] > lengths[:, None]] = 0
    tokens[:, 0] = 49406
    return images, tokens


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_cached_feature_accumulation_equals_one_big_batch(loss_fn):
    model = ldmclip.create_model("ViT-Tiny-64")
    if isinstance(loss_fn, SigLipLoss):
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    twin = copy.deepcopy(model)
    images, tokens = _batch()
    loss_one = contrastive_step(model, loss_fn, images, tokens, "fp32", accum=1)
    loss_four = contrastive_step(twin, loss_fn, images, tokens, "fp32", accum=4)
    assert torch.allclose(loss_one, loss_four, rtol=1e-6)
    one, four = _grads(model), _grads(twin)
    assert one.keys() == four.keys() and "logit_scale" in one
    for name in one:
        assert relative_error(four[name], one[name]) <= 1e-5, name


def test_accumulation_replays_patch_dropout_randomness():
    # With patch dropout, the recomputed micro-batch must drop the same patches as the cached
    # pass; otherwise the gradient does not belong to the loss. Check against a direct computation
    # using the same per-chunk random states.
    model = ldmclip.create_model("ViT-Tiny-64", patch_dropout=0.5).train()
    images, tokens = _batch(8)
    torch.manual_seed(3)
    loss = contrastive_step(model, ClipLoss(), images, tokens, "fp32", accum=2)
    torch.manual_seed(3)
    with torch.no_grad():
        first = model.encode_image(images[:4], normalize=True)
        _ = model.encode_text(tokens[:4])
        second = model.encode_image(images[4:], normalize=True)
        texts = model.encode_text(tokens, normalize=True)
        expected = ClipLoss()(torch.cat([first, second]), texts, model.logit_scale.exp())
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_locked_image_tower_gets_no_gradient_and_logit_scale_still_learns():
    model = ldmclip.create_model("ViT-Tiny-64")
    lock_tower(model.visual)
    images, tokens = _batch()
    contrastive_step(model, ClipLoss(), images, tokens, "fp32", accum=2, lock_image=True)
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.token_embedding.weight.grad is not None and model.logit_scale.grad is not None


def test_locked_text_tower():
    model = ldmclip.create_model("ViT-Tiny-64")
    lock_text_tower(model)
    images, tokens = _batch()
    contrastive_step(model, ClipLoss(), images, tokens, "fp32", lock_text=True)
    assert model.token_embedding.weight.grad is None and model.transformer.resblocks[0].attn.in_proj_weight.grad is None
    assert model.visual.conv1.weight.grad is not None


def test_activation_checkpointing_same_gradients_same_keys():
    model = ldmclip.create_model("ViT-Tiny-64")
    twin = copy.deepcopy(model)
    apply_activation_checkpointing(twin)
    assert twin.state_dict().keys() == model.state_dict().keys()
    images, tokens = _batch()
    contrastive_step(model, ClipLoss(), images, tokens, "fp32")
    contrastive_step(twin, ClipLoss(), images, tokens, "fp32")
    for name, grad in _grads(model).items():
        assert relative_error(dict(twin.named_parameters())[name].grad, grad) <= 1e-5, name


def test_bf16_autocast_step_is_close_to_fp32():
    model = ldmclip.create_model("ViT-Tiny-64")
    images, tokens = _batch()
    fp32 = contrastive_step(copy.deepcopy(model), ClipLoss(), images, tokens, "fp32")
    bf16 = contrastive_step(model, ClipLoss(), images, tokens, "amp_bf16")
    assert abs(fp32.item() - bf16.item()) < 0.05 * fp32.item()


def _tokens_into_transformer(model, images) -> tuple[int, torch.Tensor]:
    """The number of tokens the image transformer sees, and the image features, in one forward."""
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        features = model.encode_image(images)
    hook.remove()
    return seen[0], features


def test_a_locked_image_tower_has_no_patch_dropout_in_train_mode_an_unlocked_one_does():
    torch.manual_seed(0)
    model = ldmclip.create_model("ViT-Tiny-64", patch_dropout=0.5)
    images = _batch(4)[0]
    model.eval()
    all_tokens, eval_features = _tokens_into_transformer(model, images)

    unlocked = copy.deepcopy(model).train()
    dropped, _ = _tokens_into_transformer(unlocked, images)
    assert dropped < all_tokens  # patch dropout runs in an unlocked tower

    locked = copy.deepcopy(model)
    lock_tower(locked.visual)
    locked.train()  # as the trainer does every step and after validation
    kept, locked_features = _tokens_into_transformer(locked, images)
    assert locked.training and not locked.visual.training
    assert not any(m.training for m in locked.visual.modules())
    assert kept == all_tokens
    assert torch.equal(locked_features, eval_features)
    assert locked.transformer.training  # the text tower still trains

    twin = copy.deepcopy(locked).train()  # a copy stays locked, on its own modules
    assert not twin.visual.training and _tokens_into_transformer(twin, images)[0] == all_tokens


def test_a_locked_text_tower_stays_in_eval_mode():
    model = ldmclip.create_model("ViT-Tiny-64", patch_dropout=0.5)
    lock_text_tower(model)
    model.train()
    assert not model.transformer.training and not model.ln_final.training
    assert model.visual.training and model.visual.patch_dropout.training
