"""OpenCLIP's pretrained tags (``pretrained="laion2b_s32b_b82k"``): the data against OpenCLIP 3.3.0's
registry, and resolution through a fake offline Hugging Face cache (nothing is downloaded)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import ldmclip
from ldmclip.checkpoints import CheckpointError, pretrained_registry
from ldmclip.core.errors import UserError
from tests.conftest import fake_hub_cache, relative_error
from tests.openclip_reference import open_clip, sample_inputs

from open_clip import pretrained as openclip_pretrained  # noqa: E402
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME  # noqa: E402

# The families ldmclip packages (issue 14): their tags are in the data, -quickgelu variants derived.
FAMILIES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
            "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"]
LAION_L14 = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
OPENAI_B16 = "timm/vit_base_patch16_clip_224.openai"
OPENAI = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _theirs(model: str, tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    return {"hf_hub": cfg["hf_hub"], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "interpolation": cfg["interpolation"], "resize_mode": cfg["resize_mode"],
            "quick_gelu": cfg.get("quick_gelu", False)}


# ---------------------------------------------------------------------------------------------
# the data is OpenCLIP's registry


def test_tag_data_is_openclips_registry_for_the_packaged_families():
    assert open_clip.__version__ == "3.3.0"  # the version the data was taken from (and the reference)
    data = pretrained_registry()
    wanted = [m for m in FAMILIES] + [f"{m}-quickgelu" for m in FAMILIES
                                      if f"{m}-quickgelu" in openclip_pretrained._PRETRAINED]
    assert list(data) == wanted
    for model, tags in data.items():
        assert list(tags) == open_clip.list_pretrained_tags_by_model(model), model
        for tag, cfg in tags.items():
            ours = {**cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
            assert ours == _theirs(model, tag), (model, tag)
            # every repository is named with OpenCLIP's default file names (none names its own file)
            assert cfg["hf_hub"].endswith("/"), (model, tag)


def test_tags_ask_for_the_files_openclip_asks_for():
    tag = ldmclip.registry.pretrained_tag("ViT-L-14", "laion2b_s32b_b82k")
    # OpenCLIP's download_pretrained_from_hf: the safetensors alternative first, then the default .bin
    assert tag.weights_files == (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
    assert tag.repo_id == LAION_L14


def test_list_pretrained_is_openclips_restricted_to_packaged_models():
    packaged = set(ldmclip.list_models())
    assert ldmclip.list_pretrained() == [p for p in open_clip.list_pretrained() if p[0] in packaged]
    assert ldmclip.list_pretrained(as_str=True) == [s for s in open_clip.list_pretrained(as_str=True)
                                                    if s.split(":")[0] in packaged]
    assert ("ViT-L-14", "laion2b_s32b_b82k") in ldmclip.list_pretrained()
    assert ("ViT-bigG-14", "laion2b_s39b_b160k") in ldmclip.list_pretrained()
    for model in ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-H-14", "ViT-Tiny-64", "no-such-model"]:
        assert ldmclip.list_pretrained_tags_by_model(model) == (
            open_clip.list_pretrained_tags_by_model(model) if model in packaged else []), model
    assert ldmclip.list_pretrained_models_by_tag("openai") == [
        m for m in open_clip.list_pretrained_models_by_tag("openai") if m in packaged]
    for model, tag in [("ViT-L-14", "laion2b_s32b_b82k"), ("ViT-B-16", "openai"), ("ViT-H-14", "dfn5b"),
                       ("ViT-B-32", "LAION400M-E32")]:  # OpenCLIP reads tags case-blind, '-' as '_'
        assert ldmclip.get_pretrained_cfg(model, tag) == _theirs(model, tag)
    assert ldmclip.get_pretrained_cfg("ViT-B-32", "nope") == {} == open_clip.get_pretrained_cfg("ViT-B-32", "nope")


@pytest.mark.parametrize("model", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "RN50-quickgelu"])
def test_resnet_tags_are_listed_once_their_configs_are_packaged(model):
    if model not in ldmclip.list_models():
        pytest.skip(f"{model}'s config is not packaged yet (the ResNet towers of issue 14 item 1)")
    assert ldmclip.list_pretrained_tags_by_model(model) == open_clip.list_pretrained_tags_by_model(model)
    tag = ldmclip.registry.pretrained_tag(model, "openai")
    assert tag.quick_gelu and tag.repo_id == open_clip.get_pretrained_cfg(model, "openai")["hf_hub"].rstrip("/")


# ---------------------------------------------------------------------------------------------
# errors: tags are never guessed


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(UserError) as error:
        ldmclip.create_model("ViT-B-32", pretrained="laion2b_s99b")
    message = str(error.value)
    assert "unknown pretrained tag 'laion2b_s99b' for ViT-B-32" in message
    assert "openai, laion400m_e31" in message and "datacomp_xl_s13b_b90k" in message


def test_a_tag_of_another_model_names_the_models_that_have_it():
    with pytest.raises(UserError) as error:
        ldmclip.create_model("ViT-B-32", pretrained="laion2b_s39b_b160k")
    assert "'laion2b_s39b_b160k' is a pretrained tag of ViT-bigG-14, not of ViT-B-32" in str(error.value)
    with pytest.raises(UserError, match="ViT-Tiny-64 has no pretrained tags"):
        ldmclip.create_model("ViT-Tiny-64", pretrained="openai")
    # the -quickgelu variant has only OpenCLIP's QuickGELU tags
    with pytest.raises(UserError, match="'laion2b_s32b_b82k' is a pretrained tag of ViT-L-14, not of ViT-L-14-quickgelu"):
        ldmclip.conditioning.load_text_tower("ViT-L-14-quickgelu", pretrained="laion2b_s32b_b82k")


def test_a_tag_with_a_json_config_is_refused_and_beside_a_hub_name_ignored(tmp_path, hub):
    # OpenCLIP ignores a tag beside a name that carries its weights (CLIP_benchmark always passes one);
    # load_text_tower is ldmclip's own and refuses it
    with pytest.warns(UserWarning, match=r"pretrained='openai' is ignored"):
        ldmclip.create_model(f"hf-hub:{LAION_L14}", pretrained="openai", load_weights=False)
    with pytest.raises(UserError, match=r"pretrained='openai' is an OpenCLIP pretrained tag.*an 'hf-hub:'"):
        ldmclip.conditioning.load_text_tower(f"hf-hub:{LAION_L14}", pretrained="openai")
    config = tmp_path / "mine.json"
    config.write_text(json.dumps(ldmclip.get_model_config("ViT-B-32").to_dict()))
    with pytest.raises(UserError, match=r"pretrained='openai' is an OpenCLIP pretrained tag.*ViT-B-32.*a JSON config"):
        ldmclip.create_model(str(config), pretrained="openai")
    # a file named like a tag is a file
    with pytest.raises(FileNotFoundError, match="pretrained weights not found: not_a_tag_or_file"):
        ldmclip.create_model(str(config), pretrained="not_a_tag_or_file")


# ---------------------------------------------------------------------------------------------
# the offline error names the right repository and the command


@pytest.mark.parametrize("model, tag, repo", [("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
                                              ("ViT-L-14", "laion2b_s32b_b82k", LAION_L14)])
def test_offline_and_not_cached_names_the_repository_and_the_command(model, tag, repo, offline_hub):
    with pytest.raises(CheckpointError) as error:
        ldmclip.create_model(model, pretrained=tag)
    message = str(error.value)
    assert f"huggingface-cli download {repo} open_clip_model.safetensors" in message
    assert f"hf download {repo} open_clip_model.safetensors" in message
    assert "open_clip_pytorch_model.bin where the repository has no open_clip_model.safetensors" in message
    assert "HF_HUB_OFFLINE=1 is set" in message and str(offline_hub) in message
    assert "\n" not in message and (model == "ViT-L-14" or "ViT-L-14" not in message)


def test_hf_hub_offline_set_after_import_is_respected(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set once huggingface_hub is imported (which reads it at import) still means no network."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []

    def cache_only(real):
        def call(*args, **kwargs):
            asked.append(kwargs.get("local_files_only", False))
            assert kwargs.get("local_files_only"), "the network was tried with HF_HUB_OFFLINE set"
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only(huggingface_hub.hf_hub_download))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only(huggingface_hub.snapshot_download))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 is set"):
        ldmclip.create_model("ViT-B-16", pretrained="openai")
    with pytest.raises(CheckpointError, match=r"HF_HUB_OFFLINE=1 is set.*huggingface-cli download nobody/not-there"):
        ldmclip.create_model("hf-hub:nobody/not-there")
    assert asked and all(asked)


# ---------------------------------------------------------------------------------------------
# resolution through a fake offline cache


def _openclip_shapes(name: str) -> dict[str, torch.Size]:
    """The state-dict shapes of OpenCLIP's own model ``name`` (built on the meta device: no init)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in open_clip.CLIP(**open_clip.get_model_config(name)).state_dict().items()}


def _snapshot(cache, repo_id: str, config: dict | None = None):
    """A fake cached repository (with its open_clip_config.json where given); weights are written into it."""
    files = {}
    if config is not None:
        (cache.parent / "config.json").write_text(json.dumps(config))
        files["open_clip_config.json"] = cache.parent / "config.json"
    fake_hub_cache(cache, repo_id, files)
    return next((cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    """One cache for the module: ViT-L-14's laion2b repo (OpenCLIP's .bin, fp16, a different constant in
    each tensor: 428M parameters cost no init) and ViT-B-16's openai repo (random fp32 safetensors)."""
    from safetensors.torch import save_file

    cache = tmp_path_factory.mktemp("tags") / "hf-cache"
    cache.mkdir()
    mean, std = INCEPTION
    snapshot = _snapshot(cache, LAION_L14, {"model_cfg": open_clip.get_model_config("ViT-L-14"),
                                            "preprocess_cfg": {"mean": mean, "std": std}})
    shapes = _openclip_shapes("ViT-L-14")
    torch.save({k: torch.full(shape, (i % 97 + 1) / 512, dtype=torch.float16) for i, (k, shape) in enumerate(shapes.items())},
               snapshot / "open_clip_pytorch_model.bin")
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(shape, generator=generator) for k, shape in _openclip_shapes("ViT-B-16").items()}
    state["logit_scale"] = torch.tensor(4.6)
    save_file(state, str(_snapshot(cache, OPENAI_B16) / "open_clip_model.safetensors"))
    return cache


@pytest.fixture
def hub(fake_cache, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return fake_cache


def test_laion2b_tag_for_vit_l_14_is_the_hf_hub_model(hub):
    from ldmclip.registry import resolve_pretrained

    # the same weights file, mean/std and config as the hf-hub: name
    weights, preprocess = resolve_pretrained("laion2b_s32b_b82k", "ViT-L-14")
    hub_weights, hub_preprocess = resolve_pretrained(f"hf-hub:{LAION_L14}")
    assert weights == hub_weights and weights.name == "open_clip_pytorch_model.bin"
    assert {k: tuple(preprocess[k]) for k in ("mean", "std")} == {k: tuple(hub_preprocess[k]) for k in ("mean", "std")}
    assert ldmclip.get_model_config(f"hf-hub:{LAION_L14}") == ldmclip.get_model_config("ViT-L-14")

    model = ldmclip.create_model("ViT-L-14", pretrained="laion2b_s32b_b82k")  # built once: 428M parameters
    assert not model.config.quick_gelu and model.config == ldmclip.get_model_config(f"hf-hub:{LAION_L14}")
    cached = torch.load(weights, mmap=True, weights_only=True)
    state = model.state_dict()
    assert state.keys() == cached.keys()
    assert all(torch.equal(state[k], cached[k].float()) for k in cached)  # the cached file's weights
    assert (tuple(model.preprocess_cfg["mean"]), tuple(model.preprocess_cfg["std"])) == INCEPTION
    assert model.preprocess_cfg["interpolation"] == "bicubic" and model.preprocess_cfg["size"] == 224


def test_openai_tag_for_vit_b_16_builds_quickgelu_with_openais_mean_std(hub, caplog):
    with caplog.at_level(logging.INFO, logger="ldmclip.registry"):
        model, _, preprocess = ldmclip.create_model_and_transforms("ViT-B-16", pretrained="openai")
    assert model.config.quick_gelu and model.config.activation == "quick_gelu"
    assert "trained with QuickGELU" in caplog.text
    assert (tuple(model.preprocess_cfg["mean"]), tuple(model.preprocess_cfg["std"])) == OPENAI
    assert preprocess.mean == pytest.approx(OPENAI[0]) and preprocess.std == pytest.approx(OPENAI[1])

    # OpenCLIP on the same cache. For "ViT-B-16" + "openai" it only warns of the QuickGELU mismatch and
    # builds GELU; its model with these weights is ViT-B-16 with force_quick_gelu (ViT-B-16-quickgelu)
    theirs = open_clip.create_model("ViT-B-16", pretrained="openai", force_quick_gelu=True, cache_dir=str(hub)).eval()
    images, tokens = sample_inputs(224, batch=1)
    model.eval()
    with torch.no_grad():
        assert relative_error(model.encode_image(images), theirs.encode_image(images)) <= 1e-5
        assert relative_error(model.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-5
    for key in ("mean", "std", "interpolation", "resize_mode"):
        got, want = model.preprocess_cfg[key], theirs.visual.preprocess_cfg[key]
        assert (tuple(got) if key in ("mean", "std") else got) == want, key

    # the text tower alone takes the tag the same way
    tower = ldmclip.conditioning.load_text_tower("ViT-B-16", pretrained="openai").eval()
    with torch.no_grad():
        assert relative_error(tower.encode_text(tokens), model.encode_text(tokens)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# the command line's --pretrained goes through the same resolution


@pytest.mark.parametrize("pretrained, phrase", [
    ("laion2b_s99b", "unknown pretrained tag 'laion2b_s99b' for ViT-B-32"),
    ("openai", "huggingface-cli download timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors"),
])
def test_cli_pretrained_tag_errors_are_one_line(pretrained, phrase, tmp_path, offline_hub, capsys):
    from ldmclip.cli import main

    out = tmp_path / "te"
    assert main(["export", "--format", "transformers", "--model", "ViT-B-32", "--pretrained", pretrained,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldmclip export: error: ") and phrase in err, err
    assert not out.exists()


def test_resnet_tag_through_the_cache_equals_openclip(offline_hub):
    """RN50 + yfcc15m (QuickGELU, OpenAI mean/std) from timm/resnet50_clip.yfcc15m, as OpenCLIP loads it."""
    if "RN50" not in ldmclip.list_models():
        pytest.skip("RN50's config is not packaged yet (the ResNet towers of issue 14 item 1)")
    from safetensors.torch import save_file

    from tests.openclip_reference import openclip_model

    reference = openclip_model("RN50-quickgelu")  # real BatchNorm statistics, not random ones
    snapshot = _snapshot(offline_hub, "timm/resnet50_clip.yfcc15m")
    save_file(reference.state_dict(), str(snapshot / "open_clip_model.safetensors"))
    model = ldmclip.create_model("RN50", pretrained="yfcc15m").eval()
    assert model.config.quick_gelu
    assert (tuple(model.preprocess_cfg["mean"]), tuple(model.preprocess_cfg["std"])) == OPENAI
    theirs = open_clip.create_model("RN50-quickgelu", pretrained="yfcc15m", cache_dir=str(offline_hub)).eval()
    images, tokens = sample_inputs(224, batch=1)
    with torch.no_grad():
        assert relative_error(model.encode_image(images), theirs.encode_image(images)) <= 1e-5
        assert relative_error(model.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-5
