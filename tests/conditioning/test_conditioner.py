"""TextConditioner presets equal their reference recipes on the same random weights (fp32, ≤1e-5).

- sd1 and clip_skip: what diffusers / SD 1.x read from ``transformers.CLIPTextModel``.
- sd2 and sdxl: references written here from OpenCLIP 3.3.0's modules, following Stability's
  ``FrozenOpenCLIPEmbedder`` (SD 2.x), ``FrozenCLIPEmbedder(layer="hidden")`` and
  ``FrozenOpenCLIPEmbedder2(legacy=False)`` (SDXL).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import ldmclip
from ldmclip.checkpoints import CheckpointError
from ldmclip.conditioning import ConditionerOutput, TextConditioner
from ldmclip.registry import load_text_tower
from tests.conditioning.reference_towers import EOT, SOT, hf_text_tower, openclip_text_model
from tests.conftest import fake_hub_cache, relative_error
from tests.openclip_reference import openclip_model, save_openclip_hub
from tests.test_checkpoints import hf_clip_model, record_safetensors_reads

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a photo of a cat", "two dogs playing in the snow near a red barn", "", "A WATERCOLOUR of Paris, at dusk"]
TOL = 1e-5


@pytest.fixture(scope="module")
def clip_l():
    """transformers CLIPTextModelWithProjection + the same weights in ldmclip (QuickGELU, like OpenAI's ViT-L/14)."""
    torch.manual_seed(1)
    return hf_text_tower("quick_gelu")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on the CLIP vocabulary, padding with end-of-text as SD 1.x's does."""
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    ldmclip.get_tokenizer("ViT-L-14").save_pretrained_files(folder)
    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def openclip_pair(tmp_path_factory):
    torch.manual_seed(2)
    return openclip_text_model(tmp_path_factory.mktemp("openclip"))


def hf_ids(tokenizer, prompts):
    """SD 1.x / SDXL's first tokenizer call: pad to 77 with end-of-text, truncate."""
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def stability_openclip(model, tokens: torch.Tensor, layer: str, final_ln: bool):
    """Stability's OpenCLIP embedders written against OpenCLIP 3.3.0's modules.

    ``(hidden of 'last' or 'penultimate', pooled)``: token + positional embedding, the resblocks with
    the causal mask, ``ln_final`` on the hidden state when asked, pooled = ``ln_final(last)`` at the
    argmax (EOT) token @ ``text_projection``. (OpenCLIP 3.x runs the blocks batch-first, so Stability's
    NLD/LND permutes fall away.)
    """
    x = model.token_embedding(tokens) + model.positional_embedding
    outputs = {}
    blocks = model.transformer.resblocks
    for index, block in enumerate(blocks):
        if index == len(blocks) - 1:
            outputs["penultimate"] = x
        x = block(x, attn_mask=model.attn_mask)
    outputs["last"] = x
    hidden = model.ln_final(outputs[layer]) if final_ln else outputs[layer]
    last = model.ln_final(outputs["last"])
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return hidden, pooled


# ---------------------------------------------------------------------------------------------
# presets against their references


def test_sd1_equals_transformers_last_hidden_state(clip_l, hf_tokenizer):
    reference, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower)
    ids = hf_ids(hf_tokenizer, PROMPTS)
    assert ids[2, 2:].eq(EOT).all()  # SD 1.x pads with end-of-text
    with torch.no_grad():
        out = conditioner(PROMPTS)
        expected = reference.text_model(ids).last_hidden_state
    assert isinstance(out, ConditionerOutput) and out.pooled is None and out.truncated == 0
    assert out.hidden.shape == (4, 77, 64)
    assert relative_error(out.hidden, expected) <= TOL


def test_sd1_pooled_equals_transformers_text_embeds(clip_l, hf_tokenizer):
    reference, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower, pooled=True)
    with torch.no_grad():
        out = conditioner(PROMPTS)
        expected = reference(hf_ids(hf_tokenizer, PROMPTS)).text_embeds
    assert out.pooled.shape == (4, 48)
    assert relative_error(out.pooled, expected) <= TOL


@pytest.mark.parametrize("diffusers_clip_skip", [0, 1, 2])
def test_clip_skip_equals_diffusers(clip_l, hf_tokenizer, diffusers_clip_skip):
    """diffusers' encode_prompt: ``hidden_states[-(clip_skip + 1)]`` then ``final_layer_norm``;
    its clip_skip=k is A1111/kohya's (and ldmclip's) clip_skip=k+1."""
    reference, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower, clip_skip=diffusers_clip_skip + 1)
    ids = hf_ids(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        states = reference.text_model(ids, output_hidden_states=True)
        if diffusers_clip_skip == 0:
            expected = states.last_hidden_state
        else:
            expected = reference.text_model.final_layer_norm(states.hidden_states[-(diffusers_clip_skip + 1)])
        out = conditioner(PROMPTS)
    assert conditioner.layer == -(diffusers_clip_skip + 1)
    assert relative_error(out.hidden, expected) <= TOL


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -3, -4])
def test_integer_layers_index_like_transformers_hidden_states(clip_l, hf_tokenizer, layer):
    reference, tower = clip_l
    conditioner = TextConditioner(tower, layer=layer, final_ln=False, pad_id=EOT)
    with torch.no_grad():
        expected = reference.text_model(hf_ids(hf_tokenizer, PROMPTS), output_hidden_states=True).hidden_states[layer]
        out = conditioner(PROMPTS)
    assert relative_error(out.hidden, expected) <= TOL


def test_sd2_equals_stability_frozen_openclip_embedder(openclip_pair):
    reference, model = openclip_pair
    conditioner = TextConditioner.from_preset("sd2", model)
    tokens = open_clip.tokenize(PROMPTS)  # pads with 0, as SD 2.x does
    with torch.no_grad():
        expected, _ = stability_openclip(reference, tokens, "penultimate", final_ln=True)
        out = conditioner(PROMPTS)
    assert conditioner.pad_ids == [0] and out.pooled is None
    assert out.hidden.shape == (4, 77, 64)
    assert relative_error(out.hidden, expected) <= TOL


def test_sdxl_equals_stability_embedders(clip_l, hf_tokenizer, openclip_pair):
    hf_reference, tower_l = clip_l
    oc_reference, model_g = openclip_pair
    conditioner = TextConditioner.from_preset("sdxl", tower_l, model_2=model_g)
    with torch.no_grad():
        # FrozenCLIPEmbedder(layer="hidden", layer_idx=11) on a 12-block ViT-L: hidden_states[11], the
        # penultimate block, no final LayerNorm; here the stand-in has 3 blocks, so index 2
        states = hf_reference.text_model(hf_ids(hf_tokenizer, PROMPTS), output_hidden_states=True).hidden_states
        first = states[hf_reference.config.num_hidden_layers - 1]
        # FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False, always_return_pooled=True)
        second, pooled = stability_openclip(oc_reference, open_clip.tokenize(PROMPTS), "penultimate", final_ln=False)
        out = conditioner(PROMPTS)
    assert conditioner.pad_ids == [EOT, 0]
    assert out.hidden.shape == (4, 77, 64 + 64) and out.pooled.shape == (4, 40)
    assert relative_error(out.hidden[..., :64], first) <= TOL
    assert relative_error(out.hidden[..., 64:], second) <= TOL
    assert relative_error(out.pooled, pooled) <= TOL


def test_only_the_needed_blocks_run(openclip_pair):
    _, model = openclip_pair
    calls = []
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, block in enumerate(model.transformer.resblocks)]
    try:
        with torch.inference_mode():
            TextConditioner.from_preset("sd2", model)(PROMPTS[:1])
            assert calls == [0, 1, 2]  # penultimate of 4 blocks: the last one is skipped
            calls.clear()
            TextConditioner(model, layer=1)(PROMPTS[:1])
            assert calls == [0]
            calls.clear()
            TextConditioner(model, layer=1, pooled=True)(PROMPTS[:1])  # pooled reads the last block
            assert calls == [0, 1, 2, 3]
    finally:
        for hook in hooks:
            hook.remove()


def test_inference_mode_and_bf16_autocast(openclip_pair):
    _, model = openclip_pair
    conditioner = TextConditioner.from_preset("sd2", model, pooled=True)
    with torch.no_grad():
        full = conditioner(PROMPTS)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conditioner(PROMPTS)
    assert mixed.hidden.shape == full.hidden.shape and mixed.hidden.is_inference()
    assert relative_error(mixed.hidden, full.hidden) < 5e-2
    assert relative_error(mixed.pooled, full.pooled) < 5e-2


def test_gradients_flow_when_training_the_text_encoder(clip_l):
    _, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower)
    conditioner(PROMPTS[:2]).hidden.sum().backward()
    assert tower.token_embedding.weight.grad is not None
    tower.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# long prompts


def _words(n: int) -> str:
    """A prompt of exactly n BPE tokens (each of these words is one token)."""
    return " ".join(["cat", "dog", "red", "blue", "tree"][i % 5] for i in range(n))


def test_long_prompt_windows_equal_encoding_each_window(clip_l, hf_tokenizer):
    reference, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower, max_tokens=225)
    prompts = [_words(160), "a photo of a cat"]
    ids = ldmclip.get_tokenizer("ViT-L-14").encode_batch(prompts)
    assert len(ids[0]) == 160
    # the windows as A1111 builds them: SOT + 75 tokens + EOT, padded to 77 (SD 1.x pads with EOT)
    windows = []
    for prompt_ids in ids:
        for w in range(3):
            chunk = prompt_ids[75 * w: 75 * (w + 1)]
            windows.append([SOT, *chunk, EOT] + [EOT] * (75 - len(chunk)))
    windows = torch.tensor(windows)
    with torch.no_grad():
        out = conditioner(prompts)
        expected = reference.text_model(windows).last_hidden_state.reshape(2, 3 * 77, -1)
    assert out.hidden.shape == (2, 231, 64) and out.truncated == 0
    assert relative_error(out.hidden, expected) <= TOL
    # a short prompt: its first window is its ordinary encoding, the others hold the empty prompt
    with torch.no_grad():
        short = TextConditioner.from_preset("sd1", tower)(["a photo of a cat", ""]).hidden
    assert torch.allclose(out.hidden[1, :77], short[0], rtol=0, atol=1e-6)
    assert torch.allclose(out.hidden[1, 77:154], short[1], rtol=0, atol=1e-6)


def test_long_prompt_tokens_have_sot_and_eot_in_every_window(clip_l):
    _, tower = clip_l
    conditioner = TextConditioner.from_preset("sd2", tower, max_tokens=150)
    tokenizer = conditioner.tokenizers[0]
    windows = conditioner._windows(tokenizer.encode_batch([_words(75), _words(76), ""]), tokenizer, 0).view(3, 2, 77)
    assert windows[..., 0].eq(SOT).all()
    assert windows[0, 0, 76] == EOT and windows[0, 1, :3].tolist() == [SOT, EOT, 0]  # exactly one full window
    cat = tokenizer.encode("cat")[0]  # the 76th word of _words(76) spills into the second window
    assert windows[1, 0, 76] == EOT and windows[1, 1, :4].tolist() == [SOT, cat, EOT, 0]
    assert windows[2, 0, :3].tolist() == [SOT, EOT, 0]
    # one window equals what the tokenizer gives with the same pad id
    single = TextConditioner.from_preset("sd2", tower)
    texts = [_words(80), "Hello &amp; good-bye!", ""]
    assert torch.equal(single._windows(tokenizer.encode_batch(texts), tokenizer, 0),
                       ldmclip.get_tokenizer("ViT-H-14")(texts))


def test_long_prompt_pooled_comes_from_the_first_window(clip_l, openclip_pair):
    _, tower_l = clip_l
    oc_reference, model_g = openclip_pair
    conditioner = TextConditioner.from_preset("sdxl", tower_l, model_2=model_g, max_tokens=150)
    prompt = _words(120)
    with torch.no_grad():
        out = conditioner([prompt, "a cat"])
        first_window = open_clip.tokenize([_words(75)])
        first_window[0, 76] = EOT  # OpenCLIP keeps EOT last when it truncates, as a window does
        _, pooled = stability_openclip(oc_reference, first_window, "penultimate", final_ln=False)
    assert out.hidden.shape == (2, 154, 128) and out.pooled.shape == (2, 40)
    assert relative_error(out.pooled[:1], pooled) <= TOL


def test_truncation_warning_once_per_call_with_the_count(clip_l, caplog):
    _, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower)
    with caplog.at_level(logging.WARNING, logger="ldmclip.conditioning"):
        out = conditioner([_words(76), "short", _words(200)])
    records = [r for r in caplog.records if "were cut" in r.getMessage()]
    assert len(records) == 1 and out.truncated == 2
    assert "2 of 3 prompts are longer than 75 tokens" in records[0].getMessage()
    assert "max_tokens=225" in records[0].getMessage()
    caplog.clear()
    long_conditioner = TextConditioner.from_preset("sd1", tower, max_tokens=150)
    with caplog.at_level(logging.WARNING, logger="ldmclip.conditioning"):
        out = long_conditioner([_words(76), _words(150)])
        assert out.truncated == 0 and not caplog.records
        out = long_conditioner([_words(151)])
    assert out.truncated == 1 and "1 of 1 prompts are longer than 150 tokens" in caplog.records[0].getMessage()
    # a prompt of exactly 75 tokens fits
    assert conditioner([_words(75)]).truncated == 0


@pytest.mark.parametrize("max_tokens", [100, 0, 74, "225"])
def test_max_tokens_must_be_a_multiple_of_75(clip_l, max_tokens):
    _, tower = clip_l
    with pytest.raises(ValueError, match="multiple of 75"):
        TextConditioner.from_preset("sd1", tower, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------
# empty prompt


def test_empty_prompt_is_encoded_once_and_cached(openclip_pair):
    _, model = openclip_pair
    conditioner = TextConditioner.from_preset("sd2", model, pooled=True).requires_grad_(False)
    calls = []
    hook = model.token_embedding.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            first = conditioner.empty_prompt()
        second = conditioner.empty_prompt()
        assert len(calls) == 1
    finally:
        hook.remove()
        conditioner.requires_grad_(True)
    with torch.no_grad():
        direct = conditioner([""])
    assert first.hidden.shape == (1, 77, 64) and first.pooled.shape == (1, 40)
    assert torch.equal(first.hidden, direct.hidden) and torch.equal(second.pooled, direct.pooled)
    assert not second.hidden.is_inference()  # usable in autograd later
    second.hidden.add_(1)  # the caller's copy; the cache is untouched
    assert torch.equal(conditioner.requires_grad_(False).empty_prompt().hidden, direct.hidden)
    conditioner.requires_grad_(True)


def test_empty_prompt_is_recomputed_while_training(clip_l):
    _, tower = clip_l
    conditioner = TextConditioner.from_preset("sd1", tower)
    out = conditioner.empty_prompt()
    assert out.hidden.requires_grad  # a text encoder being trained gets a fresh, differentiable encoding
    assert not conditioner._empty


def test_sdxl_style_zeros_for_the_empty_prompt(clip_l, openclip_pair):
    _, tower_l = clip_l
    _, model_g = openclip_pair
    conditioner = TextConditioner.from_preset("sdxl", tower_l, model_2=model_g, zero_empty_prompt=True)
    with torch.no_grad():
        zeros = conditioner.empty_prompt()
        encoded = conditioner.empty_prompt(zeros=False)
    assert zeros.hidden.shape == (1, 77, 128) and zeros.pooled.shape == (1, 40)
    assert not zeros.hidden.any() and not zeros.pooled.any()
    assert encoded.hidden.abs().sum() > 0 and encoded.pooled.abs().sum() > 0


def test_empty_batch(clip_l):
    _, tower = clip_l
    with torch.no_grad():
        out = TextConditioner.from_preset("sd1", tower, pooled=True, max_tokens=150)([])
    assert out.hidden.shape == (0, 154, 64) and out.pooled.shape == (0, 48)


# ---------------------------------------------------------------------------------------------
# identity, from_pretrained


def test_identity_is_json_and_follows_weights_and_options(openclip_pair):
    _, model = openclip_pair
    identity = TextConditioner.from_preset("sd2", model).identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["preset"] == "sd2" and identity["hidden_state_index"] == [3]
    assert identity["towers"][0]["config"]["layers"] == 4 and identity["towers"][0]["tokenizer"]["pad_id"] == 0
    # the same settings spelled differently are the same identity
    assert TextConditioner.from_preset("sd2", model, clip_skip=2).identity() == identity
    assert TextConditioner.from_preset("sd2", model, max_tokens=150).identity() != identity
    assert TextConditioner.from_preset("sd2", model, layer="last").identity() != identity
    with torch.no_grad():
        model.ln_final.bias[0] += 1e-3
    try:
        changed = TextConditioner.from_preset("sd2", model).identity()
    finally:
        with torch.no_grad():
            model.ln_final.bias[0] -= 1e-3
    assert changed["towers"][0]["sha256"] != identity["towers"][0]["sha256"]


def test_from_pretrained_builds_frozen_text_towers(tmp_path, openclip_pair):
    _, model = openclip_pair
    weights = tmp_path / "g.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(weights))
    config = tmp_path / "small.json"
    config.write_text(json.dumps(model.config.to_dict()))
    conditioner = TextConditioner.from_pretrained("sd2", model=str(config), pretrained=str(weights))
    assert type(conditioner.towers[0]) is ldmclip.models.TextTransformer  # no image tower kept
    assert not any(p.requires_grad for p in conditioner.parameters()) and not conditioner.training
    reference = TextConditioner.from_preset("sd2", model)
    assert conditioner.identity() == reference.identity()
    with torch.no_grad():
        assert torch.equal(conditioner(PROMPTS).hidden, reference(PROMPTS).hidden)
    sdxl = TextConditioner.from_pretrained("sdxl", model=str(config), pretrained=str(weights), model_2=str(config),
                                           pretrained_2=str(weights))
    assert sdxl.pad_ids == [EOT, 0] and sdxl.pooled and sdxl.hidden_size == 128


# ---------------------------------------------------------------------------------------------
# a transformers text encoder alone (diffusers' text_encoder/ and text_encoder_2/)


def test_text_encoder_with_projection_folder_loads_with_its_numerics(tmp_path, clip_l, hf_tokenizer):
    reference, _ = clip_l
    reference.save_pretrained(tmp_path / "text_encoder_2")
    tower = load_text_tower(f"local-dir:{tmp_path / 'text_encoder_2'}")
    assert tower.activation == "quick_gelu" and tower.transformer.layers == 3
    ids = hf_ids(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        theirs = reference(ids, output_hidden_states=True)
        assert relative_error(tower.encode_text(ids), theirs.text_embeds) <= TOL
        blocks = tower.text_hidden_states(ids)  # block outputs; transformers' [0] is the embedding
        for layer in range(3):
            assert relative_error(blocks[layer], theirs.hidden_states[layer + 1]) <= TOL, layer


def test_text_encoder_without_projection_pools_the_eot_state(tmp_path, hf_tokenizer):
    torch.manual_seed(3)
    config = hf_text_tower("gelu")[0].config
    reference = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # move LayerNorms off 1/0 so a mis-mapped one shows
        for param in reference.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(tmp_path / "text_encoder")
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]
    # what SD 1.x's pipeline does with its text_encoder/, through the sd1 preset
    conditioner = TextConditioner.from_pretrained("sd1", model=f"local-dir:{tmp_path / 'text_encoder'}", pooled=True)
    ids = hf_ids(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        out = conditioner(PROMPTS)
        theirs = reference(ids)
    assert conditioner.towers[0].activation == "gelu"
    assert relative_error(out.hidden, theirs.last_hidden_state) <= TOL
    assert relative_error(out.pooled, theirs.pooler_output) <= TOL  # no projection: the EOT state itself


def test_exported_text_encoder_loads_back_bit_identical(tmp_path, openclip_pair):
    from ldmclip.conditioning.export import export_transformers

    _, model = openclip_pair
    tower = load_text_tower_of(model)
    export_transformers(tower, tmp_path / "export", with_projection=True)
    again = load_text_tower(f"local-dir:{tmp_path / 'export'}", precision="bf16")
    assert next(again.parameters()).dtype == torch.bfloat16
    for key, value in tower.state_dict().items():
        assert torch.equal(value.bfloat16(), again.state_dict()[key]), key
    assert ldmclip.get_tokenizer(f"local-dir:{tmp_path / 'export'}").context_length == 77


def test_a_whole_clip_cannot_be_built_from_a_text_encoder_folder(tmp_path, clip_l):
    reference, _ = clip_l
    reference.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="text encoder alone.*load_text_tower"):
        ldmclip.create_model(f"local-dir:{tmp_path / 'text_encoder'}")


def load_text_tower_of(model):
    with torch.device("meta"):
        tower = ldmclip.models.TextTransformer(model.config.text_cfg, model.config.embed_dim, model.config.activation)
    tower.load_state_dict(model.text_state_dict(), assign=True)
    return tower.eval()


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_presets_and_options(clip_l, openclip_pair):
    _, tower = clip_l
    _, model = openclip_pair
    with pytest.raises(ValueError, match="unknown conditioning preset 'sd4'.*sd1, sd2, sdxl, sd3, flux"):
        TextConditioner.from_preset("sd4", tower)
    with pytest.raises(ValueError, match="two text towers: pass model_2"):
        TextConditioner.from_preset("sdxl", tower)
    with pytest.raises(ValueError, match="one text tower"):
        TextConditioner.from_preset("sd1", tower, model_2=model)
    with pytest.raises(ValueError, match="one text tower"):
        TextConditioner.from_pretrained("sd2", model_2="ViT-Tiny-64")
    with pytest.raises(ValueError, match="either layer or clip_skip"):
        TextConditioner(tower, layer=-2, clip_skip=2)
    with pytest.raises(ValueError, match="diffusers counts from 0"):
        TextConditioner.from_preset("sd1", tower, clip_skip=0)
    with pytest.raises(ValueError, match="does not exist in a text tower of 3 blocks"):
        TextConditioner(tower, layer=-5)
    with pytest.raises(ValueError, match="does not exist"):
        TextConditioner.from_preset("sd1", tower, clip_skip=5)
    with pytest.raises(ValueError, match="'last', 'penultimate' or an int"):
        TextConditioner(tower, layer="middle")
    with pytest.raises(ValueError, match="exceeds the text tower's 77"):
        TextConditioner(tower, context_length=78)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TextConditioner(tower, pad_id=50000)
    with pytest.raises(TypeError, match="ldmclip CLIP model or text tower"):
        TextConditioner(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected str"):
        TextConditioner(tower)(["fine", None])


# ---------------------------------------------------------------------------------------------
# load_text_tower builds and reads the text tower alone, from every pretrained form


TINY = "ViT-Tiny-64"


@pytest.fixture
def text_only(monkeypatch):
    """Call it to make building an image tower fail from then on; it returns the list in which the
    names of the tensors read from safetensors files are recorded (a whole-file read fails)."""
    from ldmclip.checkpoints import state_dict as state_dict_module
    from ldmclip.models.vision import VisionTransformer

    def refuse(*args, **kwargs):
        raise AssertionError("an image tower was built")

    def enable() -> list[str]:
        monkeypatch.setattr(VisionTransformer, "__init__", refuse)
        read = record_safetensors_reads(monkeypatch)
        monkeypatch.setattr(state_dict_module, "load_file", lambda *a, **k: pytest.fail("a whole file was read"))
        return read

    return enable


def _pretrained_form(form: str, tmp_path, hub_cache) -> tuple[str, str | None]:
    """``(name, pretrained)`` of one form, holding the weights of a tiny OpenCLIP (or transformers) CLIP."""
    torch.manual_seed(5)
    if form == "transformers-folder":
        hf_clip_model("gelu").save_pretrained(tmp_path / "hf")
        return f"local-dir:{tmp_path / 'hf'}", None
    reference = openclip_model(TINY)
    if form == "safetensors-file":
        save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
        return TINY, str(tmp_path / "w.safetensors")
    if form == "pt-file":  # a DDP training checkpoint
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pt")
        return TINY, str(tmp_path / "w.pt")
    folder = save_openclip_hub(reference, TINY, tmp_path / "hub")
    if form == "openclip-folder-name":
        return f"local-dir:{folder}", None
    if form == "openclip-folder-pretrained":
        return TINY, str(folder)
    fake_hub_cache(hub_cache, "someone/tiny-clip",
                    {n: folder / n for n in ("open_clip_config.json", "open_clip_model.safetensors")})
    return ("hf-hub:someone/tiny-clip", None) if form == "hf-hub-name" else (TINY, "hf-hub:someone/tiny-clip")


FORMS = ["safetensors-file", "pt-file", "openclip-folder-name", "openclip-folder-pretrained", "hf-hub-name",
         "hf-hub-pretrained", "transformers-folder"]


@pytest.mark.parametrize("form", FORMS)
def test_load_text_tower_builds_and_reads_only_the_text_tower(form, tmp_path, offline_hub, text_only):
    name, pretrained = _pretrained_form(form, tmp_path, offline_hub)
    reference = ldmclip.create_model(name, pretrained=pretrained, precision="bf16").text_state_dict()
    read = text_only()
    tower = load_text_tower(name, pretrained, precision="bf16")
    assert type(tower) is ldmclip.models.TextTransformer
    state = tower.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert value.dtype == torch.bfloat16 and torch.equal(state[key], value), key
    if form != "pt-file":  # every other form is read from safetensors: only the text tensors
        assert read and not [k for k in read if k.startswith(("visual", "vision_model.", "logit_scale"))]


def test_random_text_tower_equals_create_models_and_warns(text_only, caplog):
    torch.manual_seed(7)
    reference = ldmclip.create_model(TINY).text_state_dict()
    text_only()
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING):
        tower = load_text_tower(TINY)
    assert "no pretrained weights given for ViT-Tiny-64" in caplog.text
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in reference.items())


def test_a_text_tower_checkpoint_alone_loads_and_a_missing_key_is_named(tmp_path, text_only):
    torch.manual_seed(8)
    model = ldmclip.create_model(TINY)
    save_file(model.text_state_dict(), str(tmp_path / "text.safetensors"))  # no image tower in the file
    text_only()
    tower = load_text_tower(TINY, str(tmp_path / "text.safetensors"))
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in model.text_state_dict().items())
    state = model.text_state_dict()
    del state["ln_final.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): ln_final.bias"):
        load_text_tower(TINY, str(tmp_path / "broken.safetensors"))
