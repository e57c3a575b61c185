"""The sd3, flux and sdxl presets (and ``prompts_2``) equal diffusers' own pipeline code.

Each pipeline is built offline from tiny random parts: ``transformers`` CLIP text encoders and
``CLIPTokenizer``s on the packaged CLIP vocabulary (padding as each pipeline's tokenizers do), a
scheduler, and for SD 3 a one-block ``SD3Transformer2DModel`` (``encode_prompt`` reads its
``joint_attention_dim`` to size the absent T5's zeros); no VAE, no U-Net, no T5. ldmclip's towers
are read from the encoders saved as folders, through ``load_text_tower("local-dir:...")``. The
comparisons call the pipelines' ``encode_prompt`` (SD 3, SDXL) and ``_get_clip_prompt_embeds`` (Flux,
whose ``encode_prompt`` needs T5).
"""

from __future__ import annotations

import logging

import pytest
import torch

import ldmclip
from ldmclip.conditioning import TextConditioner
from ldmclip.registry import load_text_tower
from tests.conditioning.reference_towers import EOT, hf_text_tower
from tests.conftest import relative_error

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
WORDS = ("a quiet harbour at dawn with fishing boats gulls over grey water old stone houses "
         "on the hill behind lanterns still lit").split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # 100 words: far more than 75 tokens
PROMPTS = ["", "a photo of a cat", LONG]
PROMPTS_2 = ["an oil painting", "", "a dog on a red sofa, studio light"]
T5_TOKENS = 8  # the zero "T5" part of SD 3's encode_prompt
JOINT_DIM = 160  # SD 3's transformer width for text (4096 in SD 3): wider than CLIP-L + CLIP-G


def _tokenizer(folder, pad_token: str):
    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=77)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny CLIP-L (quick_gelu, 3 blocks, width 64, projection 48) and CLIP-G (gelu, 4 blocks, width 80,
    projection 40) as transformers models, saved folders loaded into ldmclip, and SD's two tokenizers."""
    root = tmp_path_factory.mktemp("pipeline-parts")
    torch.manual_seed(11)
    clip_l, _ = hf_text_tower("quick_gelu")
    torch.manual_seed(12)
    clip_g, _ = hf_text_tower("gelu", width=80, layers=4, projection=40)
    clip_l.save_pretrained(root / "clip_l")
    clip_g.save_pretrained(root / "clip_g")
    vocab = root / "tokenizer"
    ldmclip.get_tokenizer("ViT-L-14").save_pretrained_files(vocab)
    return {
        "clip_l": clip_l, "clip_g": clip_g,
        "tower_l": load_text_tower(f"local-dir:{root / 'clip_l'}"),
        "tower_g": load_text_tower(f"local-dir:{root / 'clip_g'}"),
        # SD 3's and SDXL's tokenizer/ pads with end-of-text, tokenizer_2/ with "!" (id 0)
        "tokenizer": _tokenizer(vocab, "<|endoftext|>"), "tokenizer_2": _tokenizer(vocab, "!"),
    }


def _clip_text_model(with_projection):
    """The same weights as a ``CLIPTextModel`` (Flux's and SDXL's first encoder have no projection)."""
    model = transformers.CLIPTextModel(with_projection.config).eval()
    _text_model(model).load_state_dict(with_projection.text_model.state_dict(), strict=True)
    return model


def _text_model(model):
    # transformers 5's CLIPTextModel is the text transformer itself; 4.x wraps it in .text_model
    return getattr(model, "text_model", model)


@pytest.fixture(scope="module")
def sd3_pipeline(parts):
    torch.manual_seed(13)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=JOINT_DIM, caption_projection_dim=16, pooled_projection_dim=88, out_channels=4,
        pos_embed_max_size=8)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=parts["clip_l"], tokenizer=parts["tokenizer"], text_encoder_2=parts["clip_g"],
        tokenizer_2=parts["tokenizer_2"], text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def sdxl_pipeline(parts):
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=_clip_text_model(parts["clip_l"]), text_encoder_2=parts["clip_g"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=None,
        scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)


def _ldmclip_clip_skip(diffusers_clip_skip: int | None) -> int | None:
    # SD 3 and SDXL read hidden_states[-(clip_skip + 2)]: A1111/kohya's (and ldmclip's) clip_skip + 2
    return None if diffusers_clip_skip is None else diffusers_clip_skip + 2


# ---------------------------------------------------------------------------------------------
# sd3


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd3_equals_stable_diffusion_3_encode_prompt(parts, sd3_pipeline, clip_skip):
    cond = TextConditioner.from_preset("sd3", parts["tower_l"], model_2=parts["tower_g"],
                                       clip_skip=_ldmclip_clip_skip(clip_skip))
    with torch.no_grad():
        embeds, _, pooled, _ = sd3_pipeline.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip,
            max_sequence_length=T5_TOKENS)
        out = cond(PROMPTS)
    assert cond.pad_ids == [EOT, 0] and out.truncated == 1  # the 100-word prompt, cut as diffusers cuts it
    assert out.hidden.shape == (3, 77, 64 + 80) and out.pooled.shape == (3, 48 + 40) == pooled.shape
    assert cond.hidden_size == 144 and cond.pooled_size == 88
    # the join the module docstring describes: zero-pad the CLIP part to T5's width, CLIP tokens first
    t5 = torch.zeros(3, T5_TOKENS, JOINT_DIM)
    joined = torch.cat([torch.nn.functional.pad(out.hidden, (0, JOINT_DIM - out.hidden.shape[-1])), t5], dim=-2)
    assert joined.shape == embeds.shape == (3, 77 + T5_TOKENS, JOINT_DIM)
    assert relative_error(joined, embeds) <= TOL
    assert relative_error(out.pooled, pooled) <= TOL
    for row in range(3):  # each prompt alone, "" and the long one included
        assert relative_error(out.hidden[row], embeds[row, :77, :144]) <= TOL, PROMPTS[row]
        assert relative_error(out.pooled[row], pooled[row]) <= TOL, PROMPTS[row]


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd3_equals_get_clip_prompt_embeds_of_each_encoder(parts, sd3_pipeline, clip_skip):
    cond = TextConditioner.from_preset("sd3", parts["tower_l"], model_2=parts["tower_g"],
                                       clip_skip=_ldmclip_clip_skip(clip_skip))
    with torch.no_grad():
        hidden_l, pooled_l = sd3_pipeline._get_clip_prompt_embeds(PROMPTS, device="cpu", clip_skip=clip_skip,
                                                                  clip_model_index=0)
        hidden_g, pooled_g = sd3_pipeline._get_clip_prompt_embeds(PROMPTS, device="cpu", clip_skip=clip_skip,
                                                                  clip_model_index=1)
        out = cond(PROMPTS)
    assert relative_error(out.hidden[..., :64], hidden_l) <= TOL
    assert relative_error(out.hidden[..., 64:], hidden_g) <= TOL
    assert relative_error(out.pooled[:, :48], pooled_l) <= TOL  # CLIP-L's projected pooled first
    assert relative_error(out.pooled[:, 48:], pooled_g) <= TOL


def test_sd3_prompts_2_equals_prompt_2(parts, sd3_pipeline):
    cond = TextConditioner.from_preset("sd3", parts["tower_l"], model_2=parts["tower_g"])
    with torch.no_grad():
        embeds, _, pooled, _ = sd3_pipeline.encode_prompt(
            PROMPTS, PROMPTS_2, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS)
        out = cond(PROMPTS, prompts_2=PROMPTS_2)
    assert relative_error(out.hidden, embeds[:, :77, :144]) <= TOL
    assert relative_error(out.pooled, pooled) <= TOL


# ---------------------------------------------------------------------------------------------
# flux


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_flux_pooled_equals_flux_pipeline_get_clip_prompt_embeds(parts, clip_skip):
    reference = _clip_text_model(parts["clip_l"])
    pipeline = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=reference,
        tokenizer=parts["tokenizer"], text_encoder_2=None, tokenizer_2=None, transformer=None)
    # the ldmclip tower has CLIP-L's text_projection (as OpenAI's ViT-L/14 does): flux must not apply it
    tower = parts["tower_l"]
    assert tower.text_projection.shape == (64, 48)
    cond = TextConditioner.from_preset("flux", tower, clip_skip=clip_skip)
    with torch.no_grad():
        pooled = pipeline._get_clip_prompt_embeds(PROMPTS, device="cpu")
        states = reference(parts["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True,
                                              return_tensors="pt").input_ids, output_hidden_states=True)
        out = cond(PROMPTS)
        # hidden (which Flux does not read): last_hidden_state, or with clip_skip that layer + final LayerNorm
        expected = states.last_hidden_state if clip_skip is None else \
            _text_model(reference).final_layer_norm(states.hidden_states[-clip_skip])
    assert out.pooled.shape == pooled.shape == (3, 64) and cond.pooled_size == 64
    # clip_skip never moves the pooled output (diffusers' Flux pipeline has no clip_skip)
    assert relative_error(out.pooled, pooled) <= TOL
    assert out.hidden.shape == (3, 77, 64) and relative_error(out.hidden, expected) <= TOL


# ---------------------------------------------------------------------------------------------
# sdxl: prompts_2


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sdxl_prompts_2_equals_diffusers_prompt_2(parts, sdxl_pipeline, clip_skip):
    cond = TextConditioner.from_preset("sdxl", parts["tower_l"], model_2=parts["tower_g"],
                                       clip_skip=_ldmclip_clip_skip(clip_skip))
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl_pipeline.encode_prompt(
            PROMPTS, prompt_2=PROMPTS_2, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip)
        out = cond(PROMPTS, prompts_2=PROMPTS_2)
        same, _, same_pooled, _ = sdxl_pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                              clip_skip=clip_skip)
        default = cond(PROMPTS)
    assert out.hidden.shape == embeds.shape == (3, 77, 144)
    assert relative_error(out.hidden, embeds) <= TOL
    assert relative_error(out.pooled, pooled) <= TOL  # bigG's pooled reads prompts_2
    # without prompts_2 both encoders read the prompts, as without prompt_2
    assert relative_error(default.hidden, same) <= TOL and relative_error(default.pooled, same_pooled) <= TOL
    assert not torch.allclose(out.hidden[..., 64:], default.hidden[..., 64:])


def test_long_prompts_are_windowed_per_encoder(parts, caplog):
    """With max_tokens each tower windows its own prompts: the halves of hidden equal each tower alone."""
    tower_l, tower_g = parts["tower_l"], parts["tower_g"]
    cond = TextConditioner.from_preset("sd3", tower_l, model_2=tower_g, max_tokens=150)
    short, long_2 = ["a cat", "a dog"], [LONG, "a red barn"]
    alone_l = TextConditioner(tower_l, layer="penultimate", final_ln=False, pad_id=EOT, max_tokens=150)
    alone_g = TextConditioner(tower_g, layer="penultimate", final_ln=False, pad_id=0, max_tokens=150, pooled=True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ldmclip.conditioning"):
        out = cond(short, prompts_2=long_2)
        first, second = alone_l(short), alone_g(long_2)
    assert out.hidden.shape == (2, 154, 144)
    assert torch.allclose(out.hidden[..., :64], first.hidden, rtol=0, atol=1e-6)
    assert torch.allclose(out.hidden[..., 64:], second.hidden, rtol=0, atol=1e-6)
    assert torch.allclose(out.pooled[:, 48:], second.pooled, rtol=0, atol=1e-6)
    assert out.truncated == 0 and not caplog.records  # LONG's tokens fit in two windows
    # the second window of the long prompt_2 holds its tokens 76-150, not the empty prompt
    assert not torch.allclose(out.hidden[0, 77:, 64:], out.hidden[1, 77:, 64:])
    # a cut prompt in either list counts its row once
    assert TextConditioner.from_preset("sdxl", tower_l, model_2=tower_g)([LONG, LONG, "x"],
                                                                         prompts_2=[LONG, "y", LONG]).truncated == 3


def test_prompts_2_bad_input(parts):
    tower_l, tower_g = parts["tower_l"], parts["tower_g"]
    sdxl = TextConditioner.from_preset("sdxl", tower_l, model_2=tower_g)
    with pytest.raises(ValueError, match="prompts_2 holds 1 prompts but prompts holds 2"):
        sdxl(["a", "b"], prompts_2=["c"])
    with pytest.raises(ValueError, match="prompts_2 is for a conditioner with two text towers.*sdxl and sd3"):
        TextConditioner.from_preset("flux", tower_l)(["a"], prompts_2=["b"])
    with torch.no_grad():  # a str is one prompt, on either side
        assert torch.equal(sdxl("a cat", prompts_2="a dog").hidden, sdxl(["a cat"], prompts_2=["a dog"]).hidden)
    with pytest.raises(ValueError, match="one text tower; model_2/tokenizer_2 are for sdxl and sd3"):
        TextConditioner.from_preset("flux", tower_l, model_2=tower_g)
    with pytest.raises(ValueError, match="sd3 preset conditions on two text towers"):
        TextConditioner.from_preset("sd3", tower_l)
    with pytest.raises(ValueError, match="pooled_from must be 'last' or 'all'"):
        TextConditioner(tower_l, pooled=True, pooled_from="first")


def test_identity_tells_the_new_presets_apart_and_keeps_the_old_ones(parts):
    tower_l, tower_g = parts["tower_l"], parts["tower_g"]
    sdxl = TextConditioner.from_preset("sdxl", tower_l, model_2=tower_g).identity()
    sd3 = TextConditioner.from_preset("sd3", tower_l, model_2=tower_g).identity()
    flux = TextConditioner.from_preset("flux", tower_l).identity()
    # caches made before pooled_from / project_pooled existed keep their identity
    assert "pooled_from" not in sdxl and "project_pooled" not in sdxl
    assert sd3["pooled_from"] == "all" and flux["project_pooled"] is False
    # the options alone (no preset name) still change the identity
    plain = TextConditioner(tower_l, pooled=True, pad_id=EOT)
    assert plain.identity() != TextConditioner(tower_l, pooled=True, pad_id=EOT, project_pooled=False).identity()
