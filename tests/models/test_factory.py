"""Model names, configs and the public constructors."""

from __future__ import annotations

import json

import pytest
import torch

import ldmclip
from ldmclip.models.config import CLIPConfig


REQUIRED = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"]


def test_packaged_models_include_the_published_architectures_and_quickgelu_variants():
    names = ldmclip.list_models()
    for name in REQUIRED:
        assert name in names and f"{name}-quickgelu" in names
    assert ldmclip.get_model_config("ViT-B-16-quickgelu").quick_gelu
    assert not ldmclip.get_model_config("ViT-B-16").quick_gelu


@pytest.mark.parametrize("name", REQUIRED)
def test_packaged_configs_equal_openclip_configs(name):
    open_clip = pytest.importorskip("open_clip")
    theirs = CLIPConfig.from_dict(open_clip.get_model_config(name))
    assert ldmclip.get_model_config(name) == theirs


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError) as error:
        ldmclip.create_model("ViT-Q-99")
    assert "ViT-B-16" in str(error.value) and "hf-hub:" in str(error.value)


def test_json_config_path(tmp_path):
    cfg = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    cfg["vision_cfg"]["layers"] = 1
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    model = ldmclip.create_model(str(path))
    assert model.visual.transformer.layers == 1
    with pytest.raises(FileNotFoundError):
        ldmclip.create_model(str(tmp_path / "missing.json"))


def test_config_rejects_architectures_it_does_not_build():
    cfg = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    cfg["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(ValueError, match="attentional_pool"):
        CLIPConfig.from_dict(cfg)
    cfg = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    cfg["text_cfg"]["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        CLIPConfig.from_dict(cfg)


def test_a_typo_in_a_section_name_lists_the_sections_that_exist(tmp_path):
    cfg = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    cfg["vision_cfgs"] = cfg.pop("vision_cfg")
    with pytest.raises(ValueError, match=r"model\.vision_cfgs.*did you mean 'vision_cfg'\?") as error:
        CLIPConfig.from_dict(cfg)
    for key in ("embed_dim", "quick_gelu", "text_cfg", "vision_cfg"):
        assert f"'{key}'" in str(error.value)
    (tmp_path / "typo.json").write_text(json.dumps(cfg))  # the same through a user's JSON file
    with pytest.raises(ValueError, match="did you mean 'vision_cfg'"):
        ldmclip.create_model(str(tmp_path / "typo.json"))
    cfg["text_cfg"]["widht"] = 3  # and inside a section, the section's own keys
    cfg["vision_cfg"] = cfg.pop("vision_cfgs")
    with pytest.raises(ValueError, match=r"text_cfg\.widht.*did you mean 'width'"):
        CLIPConfig.from_dict(cfg)


def test_config_round_trips_through_dict():
    cfg = ldmclip.get_model_config("ViT-bigG-14")
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert int(cfg.vision_cfg.width * cfg.vision_cfg.mlp_ratio) == 8192


def test_create_model_and_transforms_uses_checkpoint_mean_std(tmp_path):
    model = ldmclip.create_model("ViT-Tiny-64")
    model.preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    model.save_pretrained(tmp_path / "ckpt")
    model, train, val = ldmclip.create_model_and_transforms(f"local-dir:{tmp_path / 'ckpt'}")
    from PIL import Image

    white = Image.new("RGB", (80, 70), (255, 255, 255))
    out = val(white)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    assert train(white).shape == (3, 64, 64)


def test_precision_and_device_options():
    with pytest.raises(ValueError, match="precision"):
        ldmclip.create_model("ViT-Tiny-64", precision="fp8")
    with pytest.raises(TypeError, match="unknown option"):
        ldmclip.create_model("ViT-Tiny-64", colour="red")
    model = ldmclip.create_model("ViT-Tiny-64", precision="fp16", device="cpu")
    assert model.logit_scale.dtype == torch.float16
