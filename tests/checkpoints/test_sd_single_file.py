"""The text encoders inside single-file SD checkpoints (checkpoints.sd): every layout built from random
transformers / OpenCLIP towers plus a few non-text tensors, saved as .safetensors and .ckpt, read back
and compared with the reference libraries (and with diffusers' own single-file conversion)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldmclip
from ldmclip.checkpoints import CheckpointError, find_text_encoders, read_text_encoders, sd
from ldmclip.checkpoints.hf import with_text_model_prefix
from ldmclip.core.errors import UserError
from ldmclip.registry import _packaged_configs, _packaged_tower_configs, load_text_tower, load_text_towers
from tests.conftest import relative_error
from tests.openclip_reference import open_clip, openclip_model
from tests.test_checkpoints import record_safetensors_reads

transformers = pytest.importorskip("transformers")

L_NAME, G_NAME = "ViT-Tiny-64", "ViT-T-8-64"  # the packaged configs the tiny towers are built to
TOL = 1e-5
FILLER = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
          "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
          "model.diffusion_model.out.2.bias": torch.randn(4)}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # LayerNorms start at 1/0: nudge them so a wrongly mapped one shows
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def hf_config(name: str, projection: bool):
    cfg = ldmclip.get_model_config(name)
    t = cfg.text_cfg
    return transformers.CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
        hidden_act=cfg.activation, projection_dim=cfg.embed_dim if projection else 512,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def hf_tower(name: str = L_NAME, projection: bool = False):
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _perturb(cls(hf_config(name, projection)))


def hf_keys(model) -> dict[str, torch.Tensor]:
    """A transformers text encoder's tensors with the ``text_model.`` prefix of transformers 4 (the
    layout of published single-file checkpoints); transformers 5 drops it for ``CLIPTextModel``."""
    return {with_text_model_prefix(k): v for k, v in model.state_dict().items()}


def openclip_tower(name: str = G_NAME):
    return openclip_model(name)


def openclip_text_keys(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in state.items()}


def write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # the way LDM training writes .ckpt files
        torch.save({"state_dict": state, "global_step": 10}, path)
    return path


def tokens(context_length: int = 32) -> torch.Tensor:
    return open_clip.tokenize(["", "a photo of a cat", "two dogs playing in the snow near a red barn"],
                              context_length=context_length)


# -- comparisons against the reference libraries --------------------------------------------------

def assert_matches_hf(tower, reference) -> None:
    toks = tokens(tower.context_length)
    with torch.no_grad():
        out = reference(input_ids=toks, output_hidden_states=True)
        ours = tower.text_hidden_states(toks)
        pooled = tower.encode_text(toks)
        last = tower.ln_final(ours[-1])
    assert len(ours) == len(out.hidden_states) - 1  # transformers' index 0 is the embedding
    for mine, theirs in zip(ours, out.hidden_states[1:]):
        assert relative_error(mine, theirs) <= TOL
    assert relative_error(last, out.last_hidden_state) <= TOL
    expected = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert relative_error(pooled, expected) <= TOL


def assert_matches_openclip(tower, reference) -> None:
    toks = tokens(tower.context_length)
    with torch.no_grad():
        x = reference.token_embedding(toks) + reference.positional_embedding
        last = reference.ln_final(reference.transformer(x, attn_mask=reference.attn_mask))
        assert relative_error(tower.ln_final(tower.text_hidden_states(toks)[-1]), last) <= TOL
        assert relative_error(tower.encode_text(toks), reference.encode_text(toks)) <= TOL


SUFFIXES = [".safetensors", ".ckpt"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("text_model_prefix", [True, False])
def test_sd1_file_gives_the_transformers_towers_outputs(tmp_path, suffix, text_model_prefix):
    reference = hf_tower()
    keys = hf_keys(reference) if text_model_prefix else {k.removeprefix("text_model."): v
                                                         for k, v in hf_keys(reference).items()}
    path = write(tmp_path / f"sd1{suffix}", {**FILLER, **prefixed("cond_stage_model.transformer.", keys)})
    assert [(f.family, f.encoder) for f in find_text_encoders(path)] == [("sd1", "text_encoder")]
    tower = load_text_tower(L_NAME, path)
    assert_matches_hf(tower, reference)  # no projection: pooled = pooler_output (identity projection)
    assert torch.equal(tower.text_projection, torch.eye(64))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sd2_file_gives_the_openclip_towers_outputs_with_all_its_blocks(tmp_path, suffix):
    reference = openclip_tower()
    path = write(tmp_path / f"sd2{suffix}", {**FILLER, **prefixed("cond_stage_model.model.", openclip_text_keys(reference))})
    tower = load_text_tower(G_NAME, path)
    assert tower.transformer.layers == 4
    assert_matches_openclip(tower, reference)


def sdxl_file(path: Path, refiner: bool = False):
    clip_l, big_g = hf_tower(), openclip_tower()
    state = dict(FILLER)
    if refiner:
        state.update(prefixed("conditioner.embedders.0.model.", openclip_text_keys(big_g)))
    else:
        state.update(prefixed("conditioner.embedders.0.transformer.", hf_keys(clip_l)))
        state.update(prefixed("conditioner.embedders.1.model.", openclip_text_keys(big_g)))
    return write(path, state), clip_l, big_g


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sdxl_file_gives_both_towers_and_name_or_encoder_picks_one(tmp_path, suffix):
    path, clip_l, big_g = sdxl_file(tmp_path / f"sdxl{suffix}")
    assert [f.encoder for f in find_text_encoders(path)] == ["text_encoder", "text_encoder_2"]
    assert_matches_hf(load_text_tower(L_NAME, path), clip_l)          # picked by its shapes
    assert_matches_openclip(load_text_tower(G_NAME, path), big_g)
    assert_matches_openclip(load_text_tower(G_NAME, path, encoder="text_encoder_2"), big_g)
    with pytest.raises(CheckpointError, match="does not fit the text tower of ViT-T-8-64"):
        load_text_tower(G_NAME, path, encoder="text_encoder")


def test_sdxl_refiner_file_holds_bigg_alone(tmp_path):
    path, _, big_g = sdxl_file(tmp_path / "refiner.safetensors", refiner=True)
    assert [(f.family, f.encoder) for f in find_text_encoders(path)] == [("sdxl-refiner", "text_encoder_2")]
    assert_matches_openclip(load_text_tower(G_NAME, path), big_g)


@pytest.mark.parametrize("clip_l_projection", [True, False])
def test_sd3_file_gives_clip_l_and_clip_g(tmp_path, clip_l_projection):
    clip_l, clip_g = hf_tower(L_NAME, projection=clip_l_projection), hf_tower(G_NAME, projection=True)
    state = {**FILLER, "text_encoders.t5xxl.transformer.shared.weight": torch.randn(10, 8),
             **prefixed("text_encoders.clip_l.transformer.", hf_keys(clip_l)),
             **prefixed("text_encoders.clip_g.transformer.", hf_keys(clip_g))}
    path = write(tmp_path / "sd3.safetensors", state)
    assert_matches_hf(load_text_tower(L_NAME, path), clip_l)
    assert_matches_hf(load_text_tower(G_NAME, path), clip_g)


@pytest.mark.parametrize("layout", ["transformers", "transformers5", "transformers-projection", "openclip"])
def test_a_text_encoder_file_alone_and_its_config_inferred(tmp_path, layout):
    """clip_l.safetensors / clip_g.safetensors as ComfyUI and A1111 keep them: with name=None the config
    is the one packaged config whose text tower the shapes fit."""
    if layout == "openclip":
        reference = openclip_tower(L_NAME)
        state = openclip_text_keys(reference)
    else:
        reference = hf_tower(L_NAME, projection=layout == "transformers-projection")
        state = reference.state_dict() if layout == "transformers5" else hf_keys(reference)
    path = write(tmp_path / "clip_l.safetensors", state)
    [found] = find_text_encoders(path)
    assert found.family == "text-encoder"
    [encoder] = read_text_encoders(path, _packaged_tower_configs()).values()
    assert encoder.config_name == L_NAME
    tower = load_text_tower(None, path)
    (assert_matches_openclip if layout == "openclip" else assert_matches_hf)(tower, reference)


def test_load_text_towers_returns_every_encoder(tmp_path):
    clip_g = hf_tower(G_NAME, projection=True)
    path = write(tmp_path / "sd3.safetensors", {**FILLER, **prefixed("text_encoders.clip_g.transformer.",
                                                                     hf_keys(clip_g))})
    towers = load_text_towers(path, model=G_NAME, precision="bf16")
    assert list(towers) == ["text_encoder_2"]
    assert towers["text_encoder_2"].token_embedding.weight.dtype == torch.bfloat16


# -- which config: the named one, the family's, or the one packaged config the shapes fit -------------

def _shapes(name: str, projection: bool) -> dict:
    cfg = ldmclip.get_model_config(name)
    t = cfg.text_cfg
    return {"width": t.width, "layers": t.layers, "context_length": t.context_length, "vocab_size": t.vocab_size,
            "intermediate_size": int(t.width * t.mlp_ratio), "embed_dim": cfg.embed_dim if projection else None}


@pytest.mark.parametrize("family,encoder,shape_of,projection,expected", [
    ("text-encoder", "text_encoder", "ViT-L-14", False, "ViT-L-14-quickgelu"),  # OpenAI's CLIP-L: QuickGELU
    ("text-encoder", "text_encoder", "ViT-bigG-14", True, "ViT-bigG-14"),
    ("text-encoder", "text_encoder", L_NAME, False, L_NAME),  # one packaged config fits
    ("sd2", "text_encoder", "ViT-H-14", True, "ViT-H-14"),
    ("sdxl", "text_encoder_2", "ViT-bigG-14", True, "ViT-bigG-14"),
    ("sd1", "text_encoder", "ViT-L-14", False, "ViT-L-14-quickgelu"),
])
def test_the_config_an_encoder_is_checked_against(family, encoder, shape_of, projection, expected):
    found = sd.FoundEncoder(family, encoder, "transformers", "", ())
    name, _ = sd._match(found, _shapes(shape_of, projection), "it", None, _packaged_tower_configs())
    assert name == expected


def test_shapes_that_fit_configs_of_different_activations_are_not_guessed():
    found = sd.FoundEncoder("text-encoder", "text_encoder", "openclip", "", ())
    with pytest.raises(CheckpointError, match="fits several packaged configs.*ViT-B-16, ViT-B-16-quickgelu.*pass model="):
        sd._match(found, _shapes("ViT-B-32", True), "it", None, _packaged_tower_configs())


def test_the_familys_config_is_used_without_a_name_and_another_activation_warns(tmp_path, monkeypatch, caplog):
    # the family's config stands in for ViT-L-14-quickgelu here (a real-sized CLIP-L is 250 MB)
    monkeypatch.setitem(sd.FAMILY_CONFIGS, ("sd1", "text_encoder"), L_NAME)
    reference = hf_tower()
    path = write(tmp_path / "sd1.safetensors", {**FILLER, **prefixed("cond_stage_model.transformer.",
                                                                     hf_keys(reference))})
    [encoder] = read_text_encoders(path, _packaged_tower_configs()).values()
    assert (encoder.family, encoder.config_name) == ("sd1", L_NAME)
    assert_matches_hf(load_text_towers(path)["text_encoder"], reference)
    assert not caplog.records
    quick = tmp_path / "tiny-quickgelu.json"
    quick.write_text(json.dumps({**json.loads(_packaged_configs()[L_NAME].read_text()), "quick_gelu": True}))
    with caplog.at_level(logging.WARNING):
        load_text_tower(str(quick), path)
    assert "is loaded as" in caplog.text and "but sd1 checkpoints hold ViT-Tiny-64 (activation gelu)" in caplog.text


# -- diffusers' own single-file conversion on the same state dict ---------------------------------

@pytest.fixture
def diffusers_single_file():
    return pytest.importorskip("diffusers.loaders.single_file_utils")


def _diffusers_model(converted: dict[str, torch.Tensor], name: str, projection: bool):
    model = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(
        hf_config(name, projection))
    if not hasattr(model, "text_model"):  # what diffusers' create_diffusers_clip_model_from_ldm does
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]
    return model.eval()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sd1_and_sdxl_clip_l_equal_diffusers_convert_ldm_clip_checkpoint(tmp_path, diffusers_single_file, family):
    if family == "sdxl":
        path, _, _ = sdxl_file(tmp_path / "sdxl.safetensors")
    else:
        path = write(tmp_path / "sd1.safetensors", {**FILLER, **prefixed("cond_stage_model.transformer.",
                                                                         hf_keys(hf_tower()))})
    checkpoint = ldmclip.checkpoints.read_state_dict(path)  # every tensor, as diffusers reads the file
    converted = diffusers_single_file.convert_ldm_clip_checkpoint(checkpoint)
    assert_matches_hf(load_text_tower(L_NAME, path), _diffusers_model(converted, L_NAME, projection=False))


@pytest.mark.parametrize("prefix,family", [("cond_stage_model.model.", "sd2"),
                                           ("conditioner.embedders.1.model.", "sdxl"),
                                           ("conditioner.embedders.0.model.", "sdxl-refiner")])
def test_openclip_layouts_equal_diffusers_convert_open_clip_checkpoint(tmp_path, prefix, family,
                                                                      diffusers_single_file):
    reference = openclip_tower()
    state = {**FILLER, **prefixed(prefix, openclip_text_keys(reference))}
    if family == "sdxl":  # an SDXL file always holds CLIP-L too
        state.update(prefixed("conditioner.embedders.0.transformer.", hf_keys(hf_tower())))
    path = write(tmp_path / "model.safetensors", state)
    projection = family != "sd2"  # diffusers' SD 2.x text_encoder is a CLIPTextModel, SDXL's a ...WithProjection
    shell = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(
        hf_config(G_NAME, projection))
    converted = diffusers_single_file.convert_open_clip_checkpoint(shell, state, prefix=prefix)
    theirs = _diffusers_model(converted, G_NAME, projection)
    ours = load_text_tower(G_NAME, path)
    toks = tokens()
    with torch.no_grad():
        out = theirs(input_ids=toks, output_hidden_states=True)
        for mine, expected in zip(ours.text_hidden_states(toks), out.hidden_states[1:]):
            assert relative_error(mine, expected) <= TOL
        if projection:
            assert relative_error(ours.encode_text(toks), out.text_embeds) <= TOL


def test_sd3_clip_g_equals_diffusers(tmp_path, diffusers_single_file):
    clip_g = hf_tower(G_NAME, projection=True)
    state = {**FILLER, **prefixed("text_encoders.clip_g.transformer.", hf_keys(clip_g))}
    path = write(tmp_path / "sd3.safetensors", state)
    converted = diffusers_single_file.convert_ldm_clip_checkpoint(state, "text_encoders.clip_g.transformer.")
    assert_matches_hf(load_text_tower(G_NAME, path), _diffusers_model(converted, G_NAME, projection=True))


# -- only the text tensors are read ---------------------------------------------------------------

def test_only_the_chosen_encoders_tensors_are_read(tmp_path, monkeypatch):
    path, _, _ = sdxl_file(tmp_path / "sdxl.safetensors")
    big = {"model.diffusion_model.middle_block.1.proj.weight": torch.zeros(1024, 1024)}
    save_file({**ldmclip.checkpoints.read_state_dict(path), **big}, str(path))
    read = record_safetensors_reads(monkeypatch)
    assert find_text_encoders(path) and not read  # detection reads key names only
    load_text_tower(L_NAME, path)
    assert read and all(k.startswith("conditioner.embedders.0.transformer.") for k in read)
    read.clear()
    load_text_tower(G_NAME, path)
    assert read and all(k.startswith("conditioner.embedders.1.model.") for k in read)


# -- TextConditioner.from_pretrained(preset, checkpoint=...) --------------------------------------

def test_conditioner_from_an_sdxl_checkpoint_takes_both_towers(tmp_path):
    path, clip_l, big_g = sdxl_file(tmp_path / "sdxl.safetensors")
    cond = ldmclip.TextConditioner.from_pretrained("sdxl", model=L_NAME, model_2=G_NAME, checkpoint=str(path))
    assert cond.preset == "sdxl" and not any(p.requires_grad for p in cond.parameters())
    assert_matches_hf(cond.towers[0], clip_l)
    assert_matches_openclip(cond.towers[1], big_g)
    assert cond(["a photo of a cat"]).pooled.shape == (1, 128)


@pytest.mark.parametrize("with_clip_g", [False, True], ids=["flux-all-in-one", "sd3"])
def test_flux_preset_reads_clip_l_of_a_flux_or_sd3_checkpoint(tmp_path, with_clip_g):
    """Flux all-in-one files keep CLIP-L (and T5) under SD 3's prefixes: the flux preset takes CLIP-L and
    its pooled output is transformers' pooler_output on the same weights."""
    clip_l = hf_tower(L_NAME, projection=False)
    state = {**FILLER, "text_encoders.t5xxl.transformer.shared.weight": torch.randn(10, 8),
             **prefixed("text_encoders.clip_l.transformer.", hf_keys(clip_l))}
    if with_clip_g:
        state.update(prefixed("text_encoders.clip_g.transformer.", hf_keys(hf_tower(G_NAME, projection=True))))
    path = write(tmp_path / "flux.safetensors", state)
    cond = ldmclip.TextConditioner.from_pretrained("flux", model=L_NAME, checkpoint=str(path))
    prompts = ["a photo of a cat", ""]
    ids = cond.tokenizers[0](prompts)
    with torch.no_grad():
        expected = clip_l(input_ids=ids).pooler_output
    assert relative_error(cond(prompts).pooled, expected) <= TOL
    with pytest.raises(UserError, match="is a sd3 checkpoint"):
        ldmclip.TextConditioner.from_pretrained("sdxl", model=L_NAME, model_2=G_NAME, checkpoint=str(path))


# -- bad input: one clear error naming what was found; the input file never changes -----------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_with_no_text_encoder(tmp_path):
    path = write(tmp_path / "unet.safetensors", FILLER)
    before = _sha256(path)
    with pytest.raises(CheckpointError, match=r"holds no CLIP text encoder.*3 tensors: model.diffusion_model"):
        load_text_towers(path)
    with pytest.raises(UserError, match="holds no CLIP text encoder"):
        ldmclip.TextConditioner.from_pretrained("sdxl", checkpoint=path)
    assert _sha256(path) == before


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_half_written_file(tmp_path, suffix):
    path, _, _ = sdxl_file(tmp_path / f"sdxl{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = _sha256(path)
    with pytest.raises(CheckpointError, match=f"cannot read {path}.*(truncated|not a complete)"):
        load_text_tower(L_NAME, path)
    with pytest.raises(CheckpointError, match="truncated|not a complete"):
        ldmclip.TextConditioner.from_pretrained("sdxl", checkpoint=path)
    assert _sha256(path) == before


def test_shapes_that_match_no_packaged_config(tmp_path):
    odd = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=20))
    path = write(tmp_path / "clip_l.safetensors", hf_keys(odd))
    with pytest.raises(CheckpointError, match=r"\(width 48, 2 blocks, context length 20.*matches no packaged model"):
        load_text_tower(None, path)
    sd1 = write(tmp_path / "sd1.safetensors", {**FILLER, **prefixed("cond_stage_model.transformer.", hf_keys(odd))})
    with pytest.raises(CheckpointError, match="is not the ViT-L-14-quickgelu text tower sd1 checkpoints hold"):
        load_text_towers(sd1)
    with pytest.raises(CheckpointError, match="width 48.*does not fit the text tower of ViT-Tiny-64"):
        load_text_tower(L_NAME, sd1)


def test_a_name_or_encoder_the_file_does_not_hold(tmp_path):
    path, _, _ = sdxl_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"holds 2 text encoders and none fits the text tower of ViT-B-32 "
                                              r"\(text_encoder: width 64.*text_encoder_2: width 128.*pass encoder="):
        load_text_tower("ViT-B-32", path)
    with pytest.raises(CheckpointError, match="has no text encoder 'text_encoder_3'; it has: text_encoder, "
                                              "text_encoder_2"):
        load_text_tower(None, path, encoder="text_encoder_3")
    with pytest.raises(UserError, match=r"holds 2 text encoders \(text_encoder, text_encoder_2\): pass encoder="):
        load_text_tower(None, path)
    alone = write(tmp_path / "clip_l.safetensors", hf_keys(hf_tower()))
    with pytest.raises(CheckpointError, match="does not fit the text tower of ViT-T-8-64; it fits ViT-Tiny-64"):
        load_text_tower(G_NAME, alone)


def test_a_checkpoint_of_another_family_given_to_a_preset(tmp_path):
    path = write(tmp_path / "sd1.safetensors", {**FILLER, **prefixed("cond_stage_model.transformer.",
                                                                     hf_keys(hf_tower()))})
    before = _sha256(path)
    with pytest.raises(UserError, match=r"is a sd1 checkpoint \(text encoders: text_encoder "
                                        r"\(cond_stage_model.transformer.\)\), not a sdxl one"):
        ldmclip.TextConditioner.from_pretrained("sdxl", checkpoint=path)
    refiner, _, _ = sdxl_file(tmp_path / "refiner.safetensors", refiner=True)
    with pytest.raises(UserError, match="is a sdxl-refiner checkpoint"):
        ldmclip.TextConditioner.from_single_file("sdxl", refiner)
    assert _sha256(path) == before


# -- the command line: --pretrained of cache-text and export takes an SD checkpoint ------------------

def test_cache_text_and_export_read_both_sdxl_towers_from_one_file(tmp_path, capsys):
    from ldmclip.cli import main

    path, clip_l, big_g = sdxl_file(tmp_path / "sdxl.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\ntwo dogs\n")
    towers = ["--preset", "sdxl", "--model", L_NAME, "--model-2", G_NAME, "--pretrained", str(path)]
    assert main(["cache-text", str(prompts), "--out", str(tmp_path / "cache"), *towers, "--quiet",
                 "--dtype", "fp32", "--precision", "fp32"]) == 0  # (auto is bf16 on CPUs with AVX512-bf16)
    cache = ldmclip.TextEmbeddingCache(tmp_path / "cache")
    expected = ldmclip.TextConditioner.from_pretrained("sdxl", model=L_NAME, model_2=G_NAME, checkpoint=path)
    with torch.no_grad():
        want = expected(["a photo of a cat"])
    [key] = [k for k in cache.keys() if torch.allclose(
        cache[k]["pooled"].float(), want.pooled[0], atol=1e-5)]
    assert relative_error(cache[key]["hidden"].float(), want.hidden[0]) <= TOL
    assert main(["export", "--format", "diffusers", *towers, "--out", str(tmp_path / "te")]) == 0
    exported = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "te" / "text_encoder_2")
    assert_matches_openclip(load_text_tower(f"local-dir:{tmp_path / 'te' / 'text_encoder_2'}"), big_g)
    assert exported.config.hidden_size == 128


@pytest.mark.parametrize("command", ["cache-text", "export"])
def test_cli_bad_single_files_are_one_line(tmp_path, capsys, command):
    from ldmclip.cli import main

    sd1 = write(tmp_path / "sd1.safetensors", {**FILLER, **prefixed("cond_stage_model.transformer.",
                                                                    hf_keys(hf_tower()))})
    cut, _, _ = sdxl_file(tmp_path / "cut.safetensors")
    cut.write_bytes(cut.read_bytes()[:-100])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    for path, phrase in ((sd1, "is a sd1 checkpoint"), (cut, "not a complete .safetensors file")):
        before = _sha256(path)
        out = tmp_path / f"out-{path.stem}"
        argv = (["cache-text", str(prompts), "--out", str(out), "--quiet"] if command == "cache-text" else
                ["export", "--format", "diffusers", "--out", str(out)])
        assert main([*argv, "--preset", "sdxl", "--model", L_NAME, "--model-2", G_NAME,
                     "--pretrained", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ldmclip {command}: error: ") and phrase in err, err
        assert _sha256(path) == before
