"""The drop-in API for OpenCLIP's clients: each name and keyword against OpenCLIP 3.3.0 on the same inputs
(the same random weights, saved by OpenCLIP in its hub layout and read by both through ``local-dir:``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ldmclip
from ldmclip.core.errors import UserError
from ldmclip.eval import load_templates

from .conftest import fake_hub_cache, relative_error
from .openclip_reference import openclip_model, save_openclip_hub

open_clip = pytest.importorskip("open_clip")

NAME = "ViT-Tiny-64"  # image 64 px, context length 32, 2 blocks per tower


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_openclip_hub(openclip_model(NAME), NAME, tmp_path_factory.mktemp("vit-tiny"))


def _pair(hub_dir, **kwargs):
    """(ldmclip model, OpenCLIP model) of the same weights, built with the same keywords."""
    ours = ldmclip.create_model(f"local-dir:{hub_dir}", **kwargs).eval()
    theirs = open_clip.create_model(f"local-dir:{hub_dir}", **kwargs).eval()
    return ours, theirs


def _inputs(image_size=64, context_length=32):
    torch.manual_seed(1)
    texts = ["a photo of a cat", "two dogs playing in the snow near a red barn"]
    return torch.randn(2, 3, image_size, image_size), open_clip.tokenize(texts, context_length=context_length)


def _assert_same_features(ours, theirs, images, tokens):
    with torch.no_grad():
        assert relative_error(ours.encode_image(images), theirs.encode_image(images)) <= 1e-5
        assert relative_error(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# tokenizer, constants, dtypes, templates, class names


def test_tokenize_equals_openclips():
    texts = ["a photo of a cat", "", "Ünïcödé   text, with  spaces!!", "word " * 100]
    assert torch.equal(ldmclip.tokenize(texts), open_clip.tokenize(texts))
    assert torch.equal(ldmclip.tokenize(texts, context_length=16), open_clip.tokenize(texts, context_length=16))
    assert torch.equal(ldmclip.tokenize("one text"), open_clip.tokenize("one text"))


def test_get_tokenizer_takes_openclips_keywords(hub_dir, tmp_path):
    texts = ["a photo of a cat", "word " * 50]
    ours = ldmclip.get_tokenizer(f"local-dir:{hub_dir}", cache_dir=str(tmp_path))
    theirs = open_clip.get_tokenizer(f"local-dir:{hub_dir}", cache_dir=str(tmp_path))
    assert torch.equal(ours(texts), theirs(texts))
    ours = ldmclip.get_tokenizer(f"local-dir:{hub_dir}", context_length=12)
    assert torch.equal(ours(texts), open_clip.get_tokenizer(f"local-dir:{hub_dir}", context_length=12)(texts))
    assert torch.equal(ldmclip.get_tokenizer()(texts), open_clip.get_tokenizer()(texts))  # "": plain CLIP BPE, 77
    with pytest.raises(TypeError, match="unsupported options"):
        ldmclip.get_tokenizer(NAME, clean="canonicalize")


def test_module_tokenizer_instance_decodes_like_openclips():
    # clients import it (CLIP_benchmark's captioning metric: `from open_clip.tokenizer import _tokenizer`)
    from open_clip.tokenizer import _tokenizer as theirs

    from ldmclip.tokenizer import _tokenizer as ours

    ids = open_clip.tokenize(["a photo of a cat", "Ünïcödé text"]).tolist()
    assert [ours.decode(row) for row in ids] == [theirs.decode(row) for row in ids]


def test_constants_and_dtypes_are_openclips():
    for name in ("OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN",
                 "INCEPTION_STD"):
        assert getattr(ldmclip, name) == getattr(open_clip.constants, name), name
    for precision in ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_fp16"):
        assert ldmclip.get_cast_dtype(precision) == open_clip.get_cast_dtype(precision), precision
        assert ldmclip.get_input_dtype(precision) == open_clip.get_input_dtype(precision), precision


def test_templates_are_callables_like_openclips_and_classnames_equal():
    for ours, theirs in ((ldmclip.OPENAI_IMAGENET_TEMPLATES, open_clip.OPENAI_IMAGENET_TEMPLATES),
                         (ldmclip.SIMPLE_IMAGENET_TEMPLATES, open_clip.SIMPLE_IMAGENET_TEMPLATES)):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        assert [t("red panda") for t in ours] == [t("red panda") for t in theirs]
    assert ldmclip.IMAGENET_CLASSNAMES == open_clip.IMAGENET_CLASSNAMES
    assert len(ldmclip.IMAGENET_CLASSNAMES) == 1000


def test_template_files_with_c_like_clip_benchmark(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {c}.\n{{c}} is not the class: {c}\nart of the {}.\n", encoding="utf-8")
    templates = load_templates(path)
    assert [t.format("cat") for t in templates] == ["a photo of a {c}.".format(c="cat"),
                                                   "{{c}} is not the class: {c}".format(c="cat"), "art of the cat."]
    for bad in ("{c} and {}", "{c} {c}", "{cat}"):
        path.write_text(bad + "\n", encoding="utf-8")
        with pytest.raises(UserError, match="exactly one"):
            load_templates(path)


# ---------------------------------------------------------------------------------------------------------
# zero-shot classifier


def test_build_zero_shot_classifier_has_openclips_signature_and_values(hub_dir):
    ours_model, theirs_model = _pair(hub_dir)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{hub_dir}")
    names = ["tench", "goldfish", "kite (bird of prey)", "a dog", "red panda"]
    theirs = open_clip.build_zero_shot_classifier(theirs_model, tokenizer, names, open_clip.SIMPLE_IMAGENET_TEMPLATES,
                                                  2, "cpu", False)
    for per_batch in (2, None, 10):  # positional, as OpenCLIP's callers write it
        ours = ldmclip.build_zero_shot_classifier(ours_model, ldmclip.get_tokenizer(f"local-dir:{hub_dir}"), names,
                                                  ldmclip.SIMPLE_IMAGENET_TEMPLATES, per_batch, "cpu", False)
        assert ours.shape == theirs.shape == (64, len(names))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with_lambdas = ldmclip.build_zero_shot_classifier(ours_model, tokenizer, names,
                                                      open_clip.SIMPLE_IMAGENET_TEMPLATES, use_tqdm=True)
    torch.testing.assert_close(with_lambdas, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# image_transform in OpenCLIP's form


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 131, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (120, 47, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (33, 40), dtype=np.uint8), "L")
    return [rgb, tall, rgba, grey]


@pytest.mark.parametrize("kwargs", [
    {},
    {"mean": (0.5, 0.5, 0.5), "std": 0.25, "interpolation": "bilinear"},
    {"resize_mode": "longest", "fill_color": 128},
    {"resize_mode": "squash"},
    {"image_size": (48, 48)},
])
def test_image_transform_openclip_form_equals_openclips(kwargs):
    kwargs = {"image_size": 56, **kwargs}
    ours = ldmclip.image_transform(is_train=False, **kwargs)
    theirs = open_clip.image_transform(is_train=False, **kwargs)
    for image in _images():
        torch.testing.assert_close(ours(image), theirs(image), rtol=0, atol=1e-6)


def test_image_transform_train_form_equals_openclips_crops():
    ours = ldmclip.image_transform(56, True, aug_cfg={"scale": (0.4, 1.0)})
    theirs = open_clip.image_transform(56, True, aug_cfg={"scale": (0.4, 1.0)})
    for image in _images():
        torch.manual_seed(3)
        mine = ours(image)
        torch.manual_seed(3)
        torch.testing.assert_close(mine, theirs(image), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="only 'scale'"):
        ldmclip.image_transform(56, True, aug_cfg={"color_jitter_prob": 0.5, "color_jitter": (0.1,) * 4})


# ---------------------------------------------------------------------------------------------------------
# create_model keywords and create_model_from_pretrained


def _plain(preprocess_cfg: dict) -> dict:
    """Lists and tuples alike (OpenCLIP keeps a config's lists, its defaults are tuples)."""
    return {key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in preprocess_cfg.items()}


def test_output_dict_and_visual_attributes_are_openclips(hub_dir):
    ours, theirs = _pair(hub_dir, output_dict=True)
    images, tokens = _inputs()
    with torch.no_grad():
        mine, reference = ours(images, tokens), theirs(images, tokens)
    assert isinstance(mine, dict) and mine.keys() == reference.keys()
    for key in reference:
        assert relative_error(mine[key], reference[key]) <= 1e-5, key
    assert ours.visual.image_size == theirs.visual.image_size == (64, 64)
    assert _plain(ours.visual.preprocess_cfg) == _plain(theirs.visual.preprocess_cfg)
    assert isinstance(ldmclip.create_model(NAME)(images, tokens), tuple)  # the default stays a tuple


def test_image_mean_std_into_preprocess_cfg_like_openclip(hub_dir):
    kwargs = {"image_mean": (0.1, 0.2, 0.3), "image_std": (0.4, 0.5, 0.6), "image_interpolation": "bilinear"}
    ours, ours_train, ours_val = ldmclip.create_model_and_transforms(f"local-dir:{hub_dir}", **kwargs)
    theirs, _, theirs_val = open_clip.create_model_and_transforms(f"local-dir:{hub_dir}", **kwargs)
    assert _plain(ours.visual.preprocess_cfg) == _plain(theirs.visual.preprocess_cfg)
    assert tuple(ours.visual.preprocess_cfg["mean"]) == (0.1, 0.2, 0.3)
    for image in _images():
        torch.testing.assert_close(ours_val(image), theirs_val(image), rtol=0, atol=1e-6)
    assert ours_train.mean == (0.1, 0.2, 0.3)


def test_force_patch_dropout_and_force_preprocess_cfg_like_openclip(hub_dir):
    ours, theirs = _pair(hub_dir, force_patch_dropout=0.25, force_preprocess_cfg={"resize_mode": "longest"})
    assert ours.visual.patch_dropout.prob == theirs.visual.patch_dropout.prob == 0.25
    assert _plain(ours.visual.preprocess_cfg) == _plain(theirs.visual.preprocess_cfg)
    assert ours.visual.preprocess_cfg["resize_mode"] == "longest"


def test_force_quick_gelu_same_outputs_as_openclip(hub_dir):
    ours, theirs = _pair(hub_dir, force_quick_gelu=True)
    assert ours.config.quick_gelu
    _assert_same_features(ours, theirs, *_inputs())
    plain = ldmclip.create_model(f"local-dir:{hub_dir}").eval()
    images, _ = _inputs()
    with torch.no_grad():
        assert relative_error(plain.encode_image(images), ours.encode_image(images)) > 1e-4


def test_force_image_size_same_outputs_as_openclip(hub_dir):
    ours, theirs = _pair(hub_dir, force_image_size=96)
    assert ours.visual.image_size == theirs.visual.image_size == (96, 96)
    assert ours.visual.positional_embedding.shape == theirs.visual.positional_embedding.shape
    _assert_same_features(ours, theirs, *_inputs(image_size=96))
    assert ours.visual.preprocess_cfg["size"] == theirs.visual.preprocess_cfg["size"]
    with pytest.raises(UserError, match="square"):
        ldmclip.create_model(NAME, force_image_size=(64, 96))


def test_force_context_length_resamples_loaded_weights_like_openclip(hub_dir):
    ours, theirs = _pair(hub_dir, force_context_length=16)
    assert ours.positional_embedding.shape == theirs.positional_embedding.shape == (16, 64)
    assert relative_error(ours.positional_embedding.detach(), theirs.positional_embedding.detach()) <= 1e-6
    _assert_same_features(ours, theirs, *_inputs(context_length=16))
    assert ldmclip.create_model(NAME, force_context_length=20).positional_embedding.shape == (20, 64)


def test_load_weights_false_reads_no_weights(hub_dir, monkeypatch):
    from ldmclip import checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoints, "read_state_dict", refuse)
    ours = ldmclip.create_model(f"local-dir:{hub_dir}", load_weights=False)
    theirs = open_clip.create_model(f"local-dir:{hub_dir}", load_weights=False)
    monkeypatch.undo()
    loaded = ldmclip.create_model(f"local-dir:{hub_dir}")
    for model in (ours, theirs):
        assert not torch.equal(model.visual.proj, loaded.visual.proj)
    assert ours.visual.proj.shape == theirs.visual.proj.shape


def test_a_tag_beside_a_local_dir_name_is_ignored_as_openclip_ignores_it(hub_dir):
    with pytest.warns(UserWarning, match="'laion400m_e32' is ignored"):  # CLIP_benchmark's default --pretrained
        ours = ldmclip.create_model(f"local-dir:{hub_dir}", pretrained="laion400m_e32").eval()
    theirs = open_clip.create_model(f"local-dir:{hub_dir}", pretrained="laion400m_e32").eval()
    _assert_same_features(ours, theirs, *_inputs())


def test_jit_is_refused_and_weights_only_false_warns(hub_dir):
    with pytest.raises(UserError, match="jit=True is not supported"):
        ldmclip.create_model(NAME, jit=True)
    with pytest.warns(UserWarning, match="weights_only=False is ignored"):
        model = ldmclip.create_model(f"local-dir:{hub_dir}", weights_only=False)
    assert model.visual.proj.shape == (64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ldmclip.create_model(NAME, weights_only=True)


def test_create_model_from_pretrained_like_openclip(hub_dir):
    ours, ours_pp = ldmclip.create_model_from_pretrained(f"local-dir:{hub_dir}")
    theirs, theirs_pp = open_clip.create_model_from_pretrained(f"local-dir:{hub_dir}")
    _assert_same_features(ours.eval(), theirs.eval(), *_inputs())
    for image in _images():
        torch.testing.assert_close(ours_pp(image), theirs_pp(image), rtol=0, atol=1e-6)
    model = ldmclip.create_model_from_pretrained(f"local-dir:{hub_dir}", return_transform=False, output_dict=True)
    assert isinstance(model, ldmclip.CLIP) and model.output_dict
    with pytest.raises(UserError, match="no pretrained weights"):
        ldmclip.create_model_from_pretrained(NAME)


def test_cache_dir_is_the_hugging_face_cache_of_hf_hub_names(hub_dir, tmp_path, offline_hub):
    cache = tmp_path / "elsewhere"
    files = {name: hub_dir / name for name in ("open_clip_config.json", "open_clip_model.safetensors")}
    fake_hub_cache(cache, "someone/tiny-clip", files)
    with pytest.raises(UserError, match="someone/tiny-clip"):  # not in the default cache
        ldmclip.create_model("hf-hub:someone/tiny-clip")
    ours = ldmclip.create_model("hf-hub:someone/tiny-clip", cache_dir=str(cache)).eval()
    theirs = open_clip.create_model("hf-hub:someone/tiny-clip", cache_dir=str(cache)).eval()
    _assert_same_features(ours, theirs, *_inputs())
    tokenizer = ldmclip.get_tokenizer("hf-hub:someone/tiny-clip", cache_dir=str(cache))
    assert tokenizer.context_length == 32
    model, _, _ = ldmclip.create_model_and_transforms(f"local-dir:{hub_dir}", pretrained="hf-hub:someone/tiny-clip",
                                                      cache_dir=str(cache))
    assert torch.equal(model.visual.proj, ours.visual.proj)


# ---------------------------------------------------------------------------------------------------------
# model methods: locking and gradient checkpointing


def _trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("groups", [0, 1, 2, 3, 4, 10])
def test_lock_image_tower_leaves_openclips_parameters_trainable(hub_dir, groups):
    ours, theirs = _pair(hub_dir)
    ours.lock_image_tower(unlocked_groups=groups)
    theirs.lock_image_tower(unlocked_groups=groups)
    assert _trainable(ours) == _trainable(theirs)
    assert any(name.startswith("visual.") for name in _trainable(ours)) == (groups > 0)


@pytest.mark.parametrize("layers", [0, 1, 2, 3, 10])
def test_lock_text_tower_leaves_openclips_parameters_trainable(hub_dir, layers):
    ours, theirs = _pair(hub_dir)
    ours.lock_text_tower(unlocked_layers=layers)
    theirs.lock_text_tower(unlocked_layers=layers)
    assert _trainable(ours) == _trainable(theirs)
    assert "token_embedding.weight" not in _trainable(ours) or layers >= 4
    with pytest.raises(ValueError, match="freeze_layer_norm=False"):
        ours.lock_text_tower(freeze_layer_norm=False)


def _gradients(model, images, tokens) -> dict[str, torch.Tensor]:
    model.zero_grad()
    image_features, text_features, scale = model(images, tokens)[:3]
    (scale * image_features @ text_features.T).logsumexp(dim=1).sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_set_grad_checkpointing_recomputes_blocks_and_gives_the_same_gradients(hub_dir):
    ours, theirs = _pair(hub_dir)
    images, tokens = _inputs()
    plain = _gradients(ours.train(), images, tokens)
    reference = _gradients(theirs.train(), images, tokens)
    ours.set_grad_checkpointing(True)
    calls = []
    hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops early: no post-hook)
             for block in [*ours.visual.transformer.resblocks, *ours.transformer.resblocks]]
    checkpointed = _gradients(ours, images, tokens)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * 4  # each of the 4 blocks ran again in backward
    assert checkpointed.keys() == plain.keys() == reference.keys()
    for name, grad in plain.items():
        assert relative_error(checkpointed[name], grad) <= 1e-5, name
        assert relative_error(checkpointed[name], reference[name]) <= 1e-5, name
    ours.set_grad_checkpointing(False)
    with torch.no_grad():  # nothing to recompute without gradients
        ours(images, tokens)


# ---------------------------------------------------------------------------------------------------------
# add_model_config: a JSON file or a folder of them, each under its file stem

_ADDED = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                          "patch_size": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def registries(monkeypatch):
    """Both registries as they were before the test: what a test adds is forgotten after it."""
    from ldmclip import registry

    monkeypatch.setattr(registry, "_ADDED_CONFIGS", {})
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))


def _write_config(path, **changes):
    import json

    path.write_text(json.dumps({**_ADDED, **changes}), encoding="utf-8")
    return path


def _assert_same_model(name):
    """create_model(name) builds the same architecture in both (same keys and shapes; same outputs on the
    same weights) and get_model_config/get_tokenizer agree."""
    torch.manual_seed(0)
    theirs = open_clip.create_model(name).eval()
    ours = ldmclip.create_model(name).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    config = open_clip.get_model_config(name)
    images, tokens = _inputs(config["vision_cfg"]["image_size"], config["text_cfg"]["context_length"])
    _assert_same_features(ours, theirs, images, tokens)
    assert ldmclip.get_model_config(name).to_dict()["embed_dim"] == config["embed_dim"]
    assert ldmclip.get_model_config(name).vision_cfg.image_size == config["vision_cfg"]["image_size"]
    texts = ["a photo of a cat", "word " * 40]
    assert torch.equal(ldmclip.get_tokenizer(name)(texts), open_clip.get_tokenizer(name)(texts))


def test_add_model_config_file_and_folder_like_openclips(registries, tmp_path):
    single = _write_config(tmp_path / "Added-Tiny-32.json")
    folder = tmp_path / "configs"
    folder.mkdir()
    _write_config(folder / "Added-Wide-32.json", embed_dim=48)
    _write_config(folder / "Added-Long-32.json", text_cfg={**_ADDED["text_cfg"], "context_length": 24})
    before = set(ldmclip.list_models())
    for path in (str(single), folder):  # a str and a Path, as OpenCLIP takes both
        ldmclip.add_model_config(path)
        open_clip.add_model_config(path)
    added = set(ldmclip.list_models()) - before
    assert added == {"Added-Tiny-32", "Added-Wide-32", "Added-Long-32"}
    assert added <= set(open_clip.list_models())
    for name in sorted(added):
        _assert_same_model(name)
    assert ldmclip.list_pretrained_tags_by_model("Added-Tiny-32") == []


def test_add_model_config_replaces_a_packaged_config_like_openclip(registries, tmp_path, caplog):
    path = _write_config(tmp_path / "ViT-B-32.json")
    with caplog.at_level("WARNING", logger="ldmclip.registry"):
        assert ldmclip.add_model_config(path) == ["ViT-B-32"]
    assert "replaces the packaged config 'ViT-B-32'" in caplog.text
    open_clip.add_model_config(path)
    assert ldmclip.list_models().count("ViT-B-32") == 1
    assert ldmclip.get_model_config("ViT-B-32").vision_cfg.width == 32
    _assert_same_model("ViT-B-32")


def test_add_model_config_bad_input_names_the_file_and_adds_nothing(registries, tmp_path):
    before = ldmclip.list_models()
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "other.json").write_text('{"model_cfg": {}}', encoding="utf-8")
    _write_config(tmp_path / "typo.json", vision_cfg={**_ADDED["vision_cfg"], "widht": 32})
    (tmp_path / "config.yaml").write_text("embed_dim: 32\n", encoding="utf-8")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_config(mixed / "Good-32.json")
    (mixed / "notes.json").write_text("[]", encoding="utf-8")
    for path, message in ((tmp_path / "missing.json", "not found"), (empty, "holds no .json"),
                          (tmp_path / "broken.json", "not a readable JSON"),
                          (tmp_path / "other.json", "no model config: a model config has embed_dim"),
                          (tmp_path / "typo.json", "unknown key vision_cfg.widht"),
                          (tmp_path / "config.yaml", "not a .json model config"),
                          (mixed, "notes.json is no model config")):
        with pytest.raises(UserError, match=message) as error:
            ldmclip.add_model_config(path)
        assert str(path) in str(error.value)
    assert ldmclip.list_models() == before  # the good file beside the bad one was not added either
