"""Export round trip: transformers loads what ldmclip exports and gives the same tensors and token ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ldmclip
from ldmclip.cli import main
from ldmclip.conditioning import TextConditioner
from ldmclip.conditioning.export import export_diffusers, export_transformers
from ldmclip.transforms import OPENAI_MEAN
from tests.conditioning.reference_towers import EOT, small_config_file
from tests.conftest import relative_error

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "two dogs playing in the snow near a red barn", "", "A WATERCOLOUR of Paris, at dusk"]
TOL = 1e-5


def _small_clip(directory, name: str, quick_gelu: bool, width: int = 64, layers: int = 3):
    """A small random ldmclip CLIP (context 77), its LayerNorms nudged off their init."""
    path = small_config_file(directory, name, quick_gelu=quick_gelu,
                             text_cfg={"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2,
                                       "layers": layers})
    model = ldmclip.create_model(str(path)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    torch.manual_seed(3)
    return _small_clip(tmp_path_factory.mktemp("l"), "ldmclip-test-export-l", quick_gelu=True, width=48)


@pytest.fixture(scope="module")
def clip_g(tmp_path_factory):
    torch.manual_seed(4)
    return _small_clip(tmp_path_factory.mktemp("g"), "ldmclip-test-export-g", quick_gelu=False, layers=4)


def _loaded(cls, folder, **kwargs):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _hf_ids(folder, prompts, **kwargs):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), **kwargs)
    return tokenizer, tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_text_model_round_trip(clip_l, clip_g, tmp_path, preset):
    model = clip_l if preset == "sd1" else clip_g
    conditioner = TextConditioner.from_preset(preset, model, pooled=True)
    out = export_transformers(model, tmp_path / "te", pad_id=conditioner.pad_ids[0])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == ("quick_gelu" if preset == "sd1" else "gelu")
    assert config["architectures"] == ["CLIPTextModel"] and config["eos_token_id"] == EOT
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("text_model.") for k in keys) and "text_model.final_layer_norm.weight" in keys

    tokenizer, ids = _hf_ids(out, PROMPTS)
    assert tokenizer.pad_token_id == conditioner.pad_ids[0]
    tower_ids = conditioner._windows(conditioner.tokenizers[0].encode_batch(PROMPTS), conditioner.tokenizers[0],
                                     conditioner.pad_ids[0])
    assert torch.equal(ids, tower_ids)  # transformers' tokenizer gives ldmclip's ids, pad token included

    text_model = _loaded(transformers.CLIPTextModel, out)
    with torch.no_grad():
        states = text_model(ids, output_hidden_states=True)
        ours = conditioner(PROMPTS)
        if preset == "sd1":
            expected = states.last_hidden_state
        else:  # penultimate with the final LayerNorm
            expected = text_model.text_model.final_layer_norm(states.hidden_states[-2]) \
                if hasattr(text_model, "text_model") else text_model.final_layer_norm(states.hidden_states[-2])
    assert relative_error(ours.hidden, expected) <= TOL

    # the same folder as CLIPTextModelWithProjection is missing its projection: write that variant
    projected = export_transformers(model, tmp_path / "te-proj", pad_id=conditioner.pad_ids[0], with_projection=True)
    assert json.loads((projected / "config.json").read_text())["architectures"] == ["CLIPTextModelWithProjection"]
    with_projection = _loaded(transformers.CLIPTextModelWithProjection, projected)
    with torch.no_grad():
        assert relative_error(ours.pooled, with_projection(ids).text_embeds) <= TOL


def test_full_clipmodel_round_trip(clip_l, tmp_path):
    out = export_transformers(clip_l, tmp_path / "clip", full=True, pad_id=EOT)
    assert (out / "preprocessor_config.json").is_file()
    reference = _loaded(transformers.CLIPModel, out)
    images = torch.randn(2, 3, 32, 32)
    tokens = ldmclip.get_tokenizer("ViT-L-14", pad_id=EOT)(PROMPTS)
    with torch.no_grad():
        text = reference.get_text_features(input_ids=tokens)
        image = reference.get_image_features(pixel_values=images)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        assert relative_error(clip_l.encode_text(tokens), text) <= TOL
        assert relative_error(clip_l.encode_image(images), image) <= TOL
    assert reference.logit_scale.item() == pytest.approx(clip_l.logit_scale.item())
    # and ldmclip reads the folder back bit for bit
    again = ldmclip.create_model(f"local-dir:{out}")
    assert again.config == clip_l.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clip_l.state_dict().items())
    assert tuple(again.preprocess_cfg["mean"]) == pytest.approx(OPENAI_MEAN)  # preprocessor_config.json


def test_diffusers_sdxl_layout_round_trip(clip_l, clip_g, tmp_path):
    conditioner = TextConditioner.from_preset("sdxl", clip_l, model_2=clip_g)
    out = export_diffusers(conditioner, tmp_path / "sdxl")
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    first = _loaded(transformers.CLIPTextModel, out, subfolder="text_encoder")
    second = _loaded(transformers.CLIPTextModelWithProjection, out, subfolder="text_encoder_2")
    _, ids_1 = _hf_ids(out, PROMPTS, subfolder="tokenizer")
    tokenizer_2, ids_2 = _hf_ids(out, PROMPTS, subfolder="tokenizer_2")
    assert ids_1[2, 2:].eq(EOT).all() and tokenizer_2.pad_token == "!" and ids_2[2, 2:].eq(0).all()
    with torch.no_grad():
        # what diffusers' SDXL pipeline does: hidden_states[-2] of both encoders, concatenated;
        # pooled = text_encoder_2's text_embeds
        hidden_1 = first(ids_1, output_hidden_states=True).hidden_states[-2]
        out_2 = second(ids_2, output_hidden_states=True)
        ours = conditioner(PROMPTS)
    assert relative_error(ours.hidden, torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1)) <= TOL
    assert relative_error(ours.pooled, out_2.text_embeds) <= TOL


def test_diffusers_sd1_layout_and_half_precision(clip_l, tmp_path):
    out = export_diffusers(TextConditioner.from_preset("sd1", clip_l), tmp_path / "sd1", dtype="fp16")
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "tokenizer"]
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["pad_token_id"] == EOT
    tokenizer_config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "<|endoftext|>" and tokenizer_config["model_max_length"] == 77
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(str(out / "text_encoder" / "model.safetensors")).values())


def test_export_is_atomic(clip_l, tmp_path, monkeypatch):
    import ldmclip.conditioning.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export_transformers(clip_l, tmp_path / "te")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        export_transformers(clip_l, tmp_path / "taken")


def test_every_exported_file_is_written_atomically(clip_l, clip_g, tmp_path, monkeypatch):
    """Each file goes through core.files (temporary name, fsync, rename), not only the folder."""
    import os

    import ldmclip.core.files as files

    renamed: list[Path] = []
    real_replace = os.replace

    def recording_replace(source, target):
        renamed.append(Path(target))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", recording_replace)
    sdxl = TextConditioner.from_preset("sdxl", clip_l, model_2=clip_g)
    exports = {"diffusers": lambda out: export_diffusers(sdxl, out),
               "full": lambda out: export_transformers(clip_l, out, full=True)}
    for name, export in exports.items():
        renamed.clear()
        out = export(tmp_path / name)
        written = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
        # the atomic writes went to the temporary export folder, renamed to out as a whole afterwards
        atomic = {Path(*p.parts[len(tmp_path.parts) + 1:]) for p in renamed}
        assert "tokenizer_config.json" in {p.name for p in written} and written == atomic, name


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def saved_l(clip_l, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "l"
    clip_l.save_pretrained(folder)
    return folder


def test_cli_exports_transformers_and_diffusers(saved_l, clip_l, tmp_path, capsys):
    code = main(["export", "--format", "transformers", "--preset", "sd1", "--model", f"local-dir:{saved_l}",
                 "--out", str(tmp_path / "te")])
    assert code == 0
    assert "CLIPTextModel" in capsys.readouterr().out
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert config["pad_token_id"] == EOT and config["hidden_size"] == 48
    weights = saved_l / "open_clip_model.safetensors"
    code = main(["export", "--format", "diffusers", "--preset", "sdxl", "--model", f"local-dir:{saved_l}",
                 "--model-2", f"local-dir:{saved_l}", "--out", str(tmp_path / "xl")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "xl").iterdir()) == ["text_encoder", "text_encoder_2", "tokenizer",
                                                                   "tokenizer_2"]
    code = main(["export", "--format", "transformers", "--full", "--model", f"local-dir:{saved_l}",
                 "--pretrained", str(weights), "--out", str(tmp_path / "full")])
    assert code == 0 and json.loads((tmp_path / "full" / "config.json").read_text())["architectures"] == ["CLIPModel"]


@pytest.mark.parametrize("arguments, message", [
    (["--format", "diffusers", "--model", "ViT-Tiny-64", "--pretrained", "w"], "needs --preset"),
    (["--format", "transformers", "--preset", "sdxl", "--pretrained", "w"], "two text encoders"),
    (["--format", "transformers", "--model", "ViT-Tiny-64"], "no weights for ViT-Tiny-64"),
    (["--format", "transformers", "--preset", "sd2", "--pretrained", "w", "--model-2", "x"],
     "only for the two-encoder presets (--preset sdxl or sd3)"),
    (["--format", "transformers", "--pretrained", "w"], "pass --model"),
    (["--format", "transformers", "--full", "--with-projection", "--model", "local-dir:x"], "already includes"),
    (["--format", "diffusers", "--preset", "sd1", "--full", "--pretrained", "w"], "for --format transformers"),
    (["--format", "transformers", "--model", "ViT-Tiny-64", "--pretrained", "missing.safetensors"],
     "missing.safetensors"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, arguments, message):
    code = main(["export", *arguments, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_output_folder(saved_l, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = main(["export", "--format", "transformers", "--model", f"local-dir:{saved_l}", "--out",
                 str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_unknown_preset_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--format", "diffusers", "--preset", "sd4", "--out", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'sd4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "ldmclip export --format diffusers --preset sdxl" in capsys.readouterr().out


def test_diffusers_sd3_layout_writes_both_projections(clip_l, clip_g, tmp_path):
    """SD 3 reads the projected pooled embedding of both encoders: both folders are
    CLIPTextModelWithProjection, and their text_embeds are the halves of the sd3 preset's pooled."""
    conditioner = TextConditioner.from_preset("sd3", clip_l, model_2=clip_g)
    out = export_diffusers(conditioner, tmp_path / "sd3")
    encoders = [_loaded(transformers.CLIPTextModelWithProjection, out, subfolder=sub)
                for sub in ("text_encoder", "text_encoder_2")]
    ids = [_hf_ids(out, PROMPTS, subfolder=sub)[1] for sub in ("tokenizer", "tokenizer_2")]
    with torch.no_grad():
        theirs = [encoder(i, output_hidden_states=True) for encoder, i in zip(encoders, ids)]
        ours = conditioner(PROMPTS)
    width = clip_l.transformer.width
    assert relative_error(ours.hidden[..., :width], theirs[0].hidden_states[-2]) <= TOL
    assert relative_error(ours.hidden[..., width:], theirs[1].hidden_states[-2]) <= TOL
    assert relative_error(ours.pooled, torch.cat([t.text_embeds for t in theirs], dim=-1)) <= TOL
