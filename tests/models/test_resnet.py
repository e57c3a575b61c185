"""The ModifiedResNet image towers: every packaged RN config equals OpenCLIP 3.3.0 on the same random
weights (image and text features, fp32, <= 1e-5 relative), with identical state-dict keys; saved folders
load in OpenCLIP and back; the config's ResNet/ViT choice and its mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ldmclip
from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.models import CLIP, CLIPConfig, ModifiedResNet
from tests.conftest import relative_error
from tests.openclip_reference import open_clip, sample_inputs

FAST = ["RN50", "RN50-quickgelu", "RN101", "RN101-quickgelu", "RN50x4", "RN50x4-quickgelu"]
SLOW = ["RN50x16", "RN50x16-quickgelu", "RN50x64", "RN50x64-quickgelu"]

# a small ResNet CLIP for the tests that need no packaged size
TINY_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16,
                                           "patch_size": None},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor non-trivial, BatchNorm statistics included: OpenCLIP starts each block's last
    BatchNorm gain at zero, which would hide every residual branch from the comparison."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model.eval()


def openclip_reference(name: str) -> torch.nn.Module:
    return randomize(open_clip.create_model(name))


def ours_with(state: dict[str, torch.Tensor], name: str) -> CLIP:
    """Our model of ``name`` holding ``state`` (built on the meta device: no time spent on an init)."""
    with torch.device("meta"):
        model = CLIP(ldmclip.get_model_config(name))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def assert_same_features(model, reference, batch: int) -> None:
    images, tokens = sample_inputs(model.image_size, model.context_length, batch=batch)
    with torch.no_grad():
        assert relative_error(model.encode_image(images), reference.encode_image(images)) <= 1e-5
        assert relative_error(model.encode_text(tokens), reference.encode_text(tokens)) <= 1e-5


def _check_config(name: str, batch: int) -> None:
    reference = openclip_reference(name)
    state = reference.state_dict()
    model = ours_with(state, name)
    assert isinstance(model.visual, ModifiedResNet)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert ours == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}  # keys, shapes, dtypes
    assert model.image_size == reference.visual.image_size
    assert_same_features(model, reference, batch)


@pytest.mark.parametrize("name", FAST)
def test_resnet_config_equals_openclip(name):
    _check_config(name, batch=1 if name.startswith("RN50x") else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_large_resnet_config_equals_openclip(name):
    _check_config(name, batch=1)


def test_the_demo_resnet_loads_in_openclip_with_the_same_features():
    """RN-T-64 (the default of ``ldmclip train``) is ldmclip's own config, not one of OpenCLIP's: its JSON,
    added to OpenCLIP, builds the same model (its head width of 32, not the default 64, included)."""
    packaged = Path(ldmclip.__file__).parent / "model_configs" / "RN-T-64.json"
    open_clip.add_model_config(packaged)
    _check_config("RN-T-64", batch=3)


def test_every_packaged_resnet_config_of_openclip_is_openclips():
    names = [n for n in ldmclip.list_models() if n.startswith("RN") and n != "RN-T-64"]
    assert sorted(names) == sorted(FAST + SLOW)
    for name in names:
        theirs = open_clip.get_model_config(name)
        ours = ldmclip.get_model_config(name)
        assert ours.vision_cfg.is_resnet and ours.vision_cfg.layers == theirs["vision_cfg"]["layers"]
        assert ours.vision_cfg.patch_size is None
        assert (ours.embed_dim, ours.quick_gelu) == (theirs["embed_dim"], theirs.get("quick_gelu", False))
        assert ours.vision_cfg.heads == theirs["vision_cfg"]["width"] * 32 // 64  # OpenCLIP's vision_heads


def test_batchnorm_in_training_mode_matches_openclip(tmp_path):
    """Batch statistics, the running-average update and the gradients are OpenCLIP's."""
    open_clip.add_model_config(_tiny_rn_json(tmp_path))
    reference = randomize(open_clip.create_model("tiny-rn")).train()
    with torch.device("meta"):
        model = CLIP(CLIPConfig.from_dict(TINY_RN))
    model.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
    model.train()
    images = torch.randn(4, 3, 64, 64)
    ours, theirs = model.encode_image(images), reference.encode_image(images)
    assert relative_error(ours.detach(), theirs.detach()) <= 1e-5
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for name, param in reference.visual.named_parameters():
        if name == "attnpool.k_proj.bias":  # its true gradient is zero (softmax ignores it): float noise
            continue
        assert relative_error(model.visual.get_parameter(name).grad, param.grad) <= 1e-4, name
    buffers = dict(model.visual.named_buffers())
    for name, buffer in reference.visual.named_buffers():
        assert torch.equal(buffers[name], buffer) if buffer.dtype == torch.long \
            else relative_error(buffers[name], buffer) <= 1e-5, name


def test_saved_folder_loads_in_openclip_and_back(tmp_path):
    model = randomize(ldmclip.create_model("RN50"))
    model.preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    model.save_pretrained(tmp_path / "rn50")
    config = json.loads((tmp_path / "rn50" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["layers"] == [3, 4, 6, 3]
    assert config["model_cfg"]["vision_cfg"]["patch_size"] is None
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'rn50'}").eval()
    assert_same_features(model, theirs, batch=1)
    # and back: OpenCLIP's own hub writer, read by ldmclip
    from tests.openclip_reference import save_openclip_hub

    save_openclip_hub(theirs, "RN50", tmp_path / "theirs")
    again = ldmclip.create_model(f"local-dir:{tmp_path / 'theirs'}").eval()
    assert isinstance(again.visual, ModifiedResNet)
    assert_same_features(again, theirs, batch=1)


def test_openai_style_state_dict_loads(tmp_path):
    """OpenAI's released files: OpenCLIP's keys plus input_resolution, context_length and vocab_size
    entries (fp16), which OpenAI's and OpenCLIP's loaders drop."""
    model = randomize(CLIP(CLIPConfig.from_dict(TINY_RN)))
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16),
                 vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "openai.pt")
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(TINY_RN))
    loaded = ldmclip.create_model(str(path), pretrained=str(tmp_path / "openai.pt")).eval()
    for key, value in model.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key


def test_layers_list_with_a_patch_size_is_a_clear_error():
    raw = json.loads(json.dumps(TINY_RN))
    raw["vision_cfg"]["patch_size"] = 16
    with pytest.raises(UserError, match=r"drop patch_size \(or set it to null\) for a ResNet"):
        CLIPConfig.from_dict(raw)


def test_layers_list_with_a_patch_size_in_a_json_file_names_the_file(tmp_path, capsys):
    raw = json.loads(json.dumps(TINY_RN))
    raw["vision_cfg"]["patch_size"] = 16
    (tmp_path / "mixed.json").write_text(json.dumps(raw))
    assert main(["train", "--model", str(tmp_path / "mixed.json"), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"ldmclip train: error: {tmp_path / 'mixed.json'}: vision_cfg has layers as a list")
    assert "\n" not in error and "drop patch_size" in error


def test_resnet_config_without_patch_size_is_a_resnet_and_round_trips():
    raw = json.loads(json.dumps(TINY_RN))
    del raw["vision_cfg"]["patch_size"]
    cfg = CLIPConfig.from_dict(raw)
    assert cfg.vision_cfg.is_resnet and cfg.vision_cfg.grid_size == 2
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert not ldmclip.get_model_config("ViT-Tiny-64").vision_cfg.is_resnet


def test_patch_dropout_on_a_resnet_is_refused_and_zero_is_accepted(tmp_path):
    assert isinstance(ldmclip.create_model(_tiny_rn_json(tmp_path), patch_dropout=0.0).visual, ModifiedResNet)
    with pytest.raises(UserError, match="patch_dropout=0.5 needs a ViT image tower.*choose a ViT model"):
        ldmclip.create_model(_tiny_rn_json(tmp_path), patch_dropout=0.5)


def test_patch_dropout_with_the_default_resnet_demo_is_one_line_before_any_run_folder(tmp_path, capsys):
    assert main(["train", "--patch-dropout", "0.5", "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose a ViT model (e.g. ViT-T-8-64" in err, err
    assert not (tmp_path / "run").exists()


def test_image_size_override_resizes_the_attention_pool():
    model = ldmclip.create_model("RN50", image_size=96).eval()
    assert model.image_size == 96 and model.visual.attnpool.positional_embedding.shape == (3 * 3 + 1, 2048)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 1024)


def _tiny_rn_json(tmp_path) -> str:
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(TINY_RN))
    return str(path)


def test_a_resnet_checkpoint_in_a_vit_config_names_the_resnet_configs(tmp_path):
    from ldmclip.checkpoints import CheckpointError

    with torch.device("meta"):
        shapes = CLIP(ldmclip.get_model_config("RN50")).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, tmp_path / "rn50.pt")
    with pytest.raises(CheckpointError) as raised:
        ldmclip.create_model("ViT-B-32", pretrained=str(tmp_path / "rn50.pt"))
    message = str(raised.value)
    assert "the checkpoint holds a ResNet image tower" in message and "config builds a ViT image tower" in message
    assert "the checkpoint looks like: RN50, RN50-quickgelu" in message and "\n" not in message


def test_a_vit_checkpoint_in_a_resnet_config_names_the_vit_configs(tmp_path):
    from ldmclip.checkpoints import CheckpointError

    ldmclip.create_model("ViT-Tiny-64").save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError) as raised:
        ldmclip.create_model(_tiny_rn_json(tmp_path), pretrained=str(tmp_path / "vit"))
    message = str(raised.value)
    assert "the checkpoint holds a ViT image tower" in message and "config builds a ResNet image tower" in message
    assert "the checkpoint looks like: ViT-Tiny-64" in message


def test_a_checkpoint_at_another_image_size_loads_with_its_attention_pool_resampled(tmp_path):
    model = randomize(CLIP(CLIPConfig.from_dict(TINY_RN)))
    model.save_pretrained(tmp_path / "tiny")
    bigger = ldmclip.create_model(f"local-dir:{tmp_path / 'tiny'}", image_size=128).eval()
    assert bigger.visual.attnpool.positional_embedding.shape == (4 * 4 + 1, 8 * 32)
    with torch.no_grad():  # the mean token's position is kept as it was
        assert torch.equal(bigger.visual.attnpool.positional_embedding[0], model.visual.attnpool.positional_embedding[0])
        assert bigger.encode_image(torch.randn(1, 3, 128, 128)).shape == (1, 32)


def test_export_of_the_text_tower_works_and_a_whole_resnet_clip_is_refused(tmp_path, capsys):
    CLIP(CLIPConfig.from_dict(TINY_RN)).save_pretrained(tmp_path / "tiny")
    model = f"local-dir:{tmp_path / 'tiny'}"
    assert main(["export", "--format", "transformers", "--with-projection", "--model", model,
                 "--out", str(tmp_path / "te")]) == 0
    from transformers import CLIPTextModelWithProjection

    from ldmclip.registry import load_text_tower

    text = CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "te")).eval()
    ours = load_text_tower(model).eval()
    tokens = ldmclip.get_tokenizer(model)(["a red square", "two blue circles"])
    with torch.no_grad():
        assert relative_error(text(tokens).text_embeds, ours.encode_text(tokens)) <= 1e-5
    capsys.readouterr()
    assert main(["export", "--format", "transformers", "--full", "--model", model,
                 "--out", str(tmp_path / "full")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "transformers' CLIPModel has only ViT image towers" in error
    assert not (tmp_path / "full").exists() or not any((tmp_path / "full").iterdir())


def test_lock_image_tower_and_grad_checkpointing_of_a_resnet_like_openclip(tmp_path):
    """OpenCLIP's lock_image_tower() freezes the whole ResNet tower and, with freeze_bn_stats, its
    BatchNorm statistics; ldmclip's leaves the same parameters trainable and keeps those BatchNorms in
    eval mode through train(). set_grad_checkpointing recomputes the bottlenecks with the same gradients."""
    open_clip.add_model_config(_tiny_rn_json(tmp_path))
    reference = open_clip.create_model("tiny-rn")
    reference.lock_image_tower(freeze_bn_stats=True)
    model = CLIP(CLIPConfig.from_dict(TINY_RN))
    model.lock_image_tower(freeze_bn_stats=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name, param in reference.named_parameters() if param.requires_grad}
    model.train()
    assert all(not m.training for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    images = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    model.encode_image(images)
    assert all(torch.equal(v, before[k]) for k, v in model.visual.state_dict().items())  # statistics fixed

    plain = randomize(CLIP(CLIPConfig.from_dict(TINY_RN))).train()
    checkpointed = CLIP(CLIPConfig.from_dict(TINY_RN))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train().set_grad_checkpointing(True)
    for m in (plain, checkpointed):
        m.encode_image(images).square().sum().backward()
    for name, param in plain.visual.named_parameters():
        if name != "attnpool.k_proj.bias":  # a true gradient of zero
            assert relative_error(checkpointed.visual.get_parameter(name).grad, param.grad) <= 1e-5, name
    assert torch.equal(checkpointed.visual.layer1[0].bn1.num_batches_tracked, plain.visual.layer1[0].bn1.num_batches_tracked)
