"""The model itself: numerics equal to OpenCLIP 3.3.0 on the same weights, and its parts."""

from __future__ import annotations

import math

import pytest
import torch

import ldmclip
from tests.conftest import relative_error
from tests.openclip_reference import openclip_model, sample_inputs


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-Tiny-64"])
def test_same_weights_same_features_as_openclip(name):
    reference = openclip_model(name)
    model = ldmclip.create_model(name).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    images, tokens = sample_inputs(model.image_size, model.context_length)
    with torch.no_grad():
        assert relative_error(model.encode_image(images), reference.encode_image(images)) <= 1e-5
        assert relative_error(model.encode_text(tokens), reference.encode_text(tokens)) <= 1e-5
        ours, theirs = model(images, tokens), reference(images, tokens)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) <= 1e-5


def test_state_dict_keys_and_shapes_equal_openclip():
    reference = openclip_model("ViT-B-32")
    ours = ldmclip.create_model("ViT-B-32").state_dict()
    theirs = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("name, millions", [("ViT-B-16", 149.62), ("ViT-L-14", 427.62),
                                            ("ViT-H-14", 986.11), ("ViT-bigG-14", 2539.57)])
def test_parameter_counts_match_openclip(name, millions):
    with torch.device("meta"):
        model = ldmclip.models.CLIP(ldmclip.get_model_config(name))
    assert round(model.num_parameters() / 1e6, 2) == millions


def test_logit_scale_starts_at_inverse_temperature_007():
    model = ldmclip.create_model("ViT-Tiny-64")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_bias is None
    *_, scale = model(torch.randn(1, 3, 64, 64), torch.tensor([[49406, 320, 49407] + [0] * 29]))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_siglip_config_adds_logit_bias(tmp_path):
    cfg = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    cfg["init_logit_bias"] = -10
    path = tmp_path / "siglip-tiny.json"
    import json

    path.write_text(json.dumps(cfg))
    model = ldmclip.create_model(str(path))
    assert model.logit_bias.item() == -10
    assert len(model(torch.randn(1, 3, 64, 64), torch.tensor([[49406, 49407] + [0] * 30]))) == 4


def test_forward_returns_normalised_features():
    model = ldmclip.create_model("ViT-Tiny-64").eval()
    images, tokens = sample_inputs(64, 32)
    image_features, text_features, _ = model(images, tokens)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_text_tower_skips_positions_after_the_longest_caption():
    # Trimming to the longest caption must not change any pooled feature: compare with the
    # full-length computation done by hand.
    model = ldmclip.create_model("ViT-Tiny-64").eval()
    _, tokens = sample_inputs(64, 32)
    with torch.no_grad():
        full = model.transformer(model.embed_tokens(tokens), causal=True)
        expected = model.pool_text(full, tokens)
        assert torch.allclose(model.encode_text(tokens), expected, atol=1e-6)


def test_encode_text_batched_equals_openclip_in_input_order():
    # Length-bucketed batches: rows sorted by length, each batch cut to its own longest caption,
    # results scattered back to the input order; every row equals OpenCLIP's full-length encode_text.
    reference = openclip_model("ViT-Tiny-64")
    model = ldmclip.create_model("ViT-Tiny-64").eval()
    model.load_state_dict(reference.state_dict())
    captions = ["a dog", "two children play football on a wide green field near the sea", "red", "",
                "a man rides a bike down the street", "cat on a mat"]
    tokens = ldmclip.get_tokenizer("ViT-Tiny-64")(captions)
    with torch.no_grad():
        expected = reference.encode_text(tokens)
        for batch_size in (1, 2, 4, 64):
            assert relative_error(model.encode_text_batched(tokens, batch_size=batch_size), expected) <= 1e-5
        assert model.encode_text_batched(tokens[:0]).shape == (0, expected.shape[1])
        normalized = model.encode_text_batched(tokens, batch_size=4, normalize=True)
        assert relative_error(normalized, torch.nn.functional.normalize(expected, dim=-1)) <= 1e-5


def test_hidden_states_give_every_layer_and_stop_early():
    model = ldmclip.create_model("ViT-Tiny-64").eval()
    _, tokens = sample_inputs(64, 32)
    with torch.no_grad():
        states = model.text_hidden_states(tokens)
        assert len(states) == model.transformer.layers
        penultimate = model.text_hidden_states(tokens, num_layers=model.transformer.layers - 1)
        assert len(penultimate) == model.transformer.layers - 1
        assert torch.equal(penultimate[-1], states[-2])
        assert torch.allclose(model.pool_text(states[-1], tokens), model.encode_text(tokens), atol=1e-6)


def test_hidden_states_equal_openclip_intermediate_layers():
    reference = openclip_model("ViT-Tiny-64")
    model = ldmclip.create_model("ViT-Tiny-64").eval()
    model.load_state_dict(reference.state_dict())
    _, tokens = sample_inputs(64, 32)
    captured = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in reference.transformer.resblocks]
    with torch.no_grad():
        reference.encode_text(tokens)
        ours = model.text_hidden_states(tokens)
    for hook in hooks:
        hook.remove()
    assert len(captured) == len(ours)
    for theirs, mine in zip(captured, ours):
        assert relative_error(mine, theirs) <= 1e-5


def test_patch_dropout_keeps_class_token_and_drops_patches_only_in_training():
    model = ldmclip.create_model("ViT-Tiny-64", patch_dropout=0.5)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    tokens = model.visual.embed(images)
    assert tokens.shape[1] == 1 + 16 // 2
    model.eval()
    assert model.visual.embed(images).shape[1] == 1 + 16
    with pytest.raises(ValueError, match="patch_dropout"):
        ldmclip.create_model("ViT-Tiny-64", patch_dropout=1.0)


def test_bad_tokens_get_a_clear_error():
    model = ldmclip.create_model("ViT-Tiny-64")
    with pytest.raises(ValueError, match="context length is 32"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode_text(torch.zeros(1, 10))


def test_bf16_precision_casts_weights_and_runs():
    model = ldmclip.create_model("ViT-Tiny-64", precision="bf16").eval()
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    images, tokens = sample_inputs(64, 32)
    with torch.no_grad():
        assert model.encode_image(images.bfloat16()).dtype == torch.bfloat16
        assert torch.isfinite(model.encode_text(tokens).float()).all()
