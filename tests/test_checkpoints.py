"""Every checkpoint layout loads with OpenCLIP's / transformers' numerics; bad checkpoints fail clearly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import ldmclip
from ldmclip.checkpoints import CheckpointError, read_state_dict
from ldmclip.core.errors import UserError
from tests.conftest import fake_hub_cache, relative_error
from tests.openclip_reference import open_clip, openclip_model, sample_inputs, save_openclip_hub


def assert_same_outputs(model, reference, image_size: int, context_length: int, text_only: bool = False):
    images, tokens = sample_inputs(image_size, context_length)
    model.eval()
    with torch.no_grad():
        assert relative_error(model.encode_text(tokens), reference.encode_text(tokens)) <= 1e-5
        if not text_only:
            assert relative_error(model.encode_image(images), reference.encode_image(images)) <= 1e-5


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu"])
def test_openclip_hub_folder_both_ways(name, tmp_path):
    reference = openclip_model(name)
    folder = save_openclip_hub(reference, name, tmp_path / "openclip")
    model = ldmclip.create_model(f"local-dir:{folder}")
    assert_same_outputs(model, reference, model.image_size, 77)
    del reference
    shutil.rmtree(folder)  # ViT-L/14 is 1.7 GB per copy: hold one at a time
    # and back: what ldmclip saves, OpenCLIP loads with the same outputs
    model.save_pretrained(tmp_path / "ours")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'ours'}").eval()
    assert_same_outputs(model, reloaded, model.image_size, 77)


TINY = "ViT-Tiny-64"


@pytest.fixture(scope="module")
def tiny_reference():
    return openclip_model(TINY)


def test_openclip_hub_folder_with_pickled_weights(tiny_reference, tmp_path):
    folder = save_openclip_hub(tiny_reference, TINY, tmp_path / "hub", weights="bin")
    model = ldmclip.create_model(f"local-dir:{folder}")
    assert_same_outputs(model, tiny_reference, 64, 32)
    model = ldmclip.create_model(TINY, pretrained=str(folder))
    assert_same_outputs(model, tiny_reference, 64, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_bare_state_dict_files(tiny_reference, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tiny_reference.state_dict(), str(path))
    else:
        torch.save(tiny_reference.state_dict(), path)
    assert_same_outputs(ldmclip.create_model(TINY, pretrained=path), tiny_reference, 64, 32)


def test_openclip_training_checkpoint_with_ddp_prefix(tiny_reference, tmp_path):
    # The dict open_clip_train writes: epoch, name, a DDP-prefixed state_dict, optimizer state.
    optimizer = torch.optim.AdamW(tiny_reference.parameters())
    tiny_reference(*sample_inputs(64, 32))[0].sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    state = {"module." + k: v for k, v in tiny_reference.state_dict().items()}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": optimizer.state_dict()}, path)
    assert_same_outputs(ldmclip.create_model(TINY, pretrained=path), tiny_reference, 64, 32)


def test_openclip_custom_text_layout(tmp_path):
    reference = openclip_model(TINY, force_custom_text=True)
    assert any(k.startswith("text.") for k in reference.state_dict())
    path = tmp_path / "custom.safetensors"
    from safetensors.torch import save_file

    save_file(reference.state_dict(), str(path))
    assert_same_outputs(ldmclip.create_model(TINY, pretrained=path), reference, 64, 32)


def test_torch_compile_prefix_is_stripped(tiny_reference):
    state = {"_orig_mod." + k: v for k, v in tiny_reference.state_dict().items()}
    from ldmclip.checkpoints import load_into_model, normalize_state_dict

    model = ldmclip.create_model(TINY)
    load_into_model(model, normalize_state_dict(state))
    assert_same_outputs(model, tiny_reference, 64, 32)


def test_image_size_change_resamples_positional_embedding(tiny_reference, tmp_path):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_reference.state_dict(), str(path))
    model = ldmclip.create_model(TINY, pretrained=path, image_size=96)
    assert model.visual.positional_embedding.shape == (1 + 36, 64)
    # OpenCLIP's own resampling of the same state dict gives the same table.
    bigger = open_clip.create_model(TINY, force_image_size=96)
    state = tiny_reference.state_dict()
    open_clip.model.resize_pos_embed(state, bigger)
    assert relative_error(model.visual.positional_embedding.detach(), state["visual.positional_embedding"]) <= 1e-6


# ---------------------------------------------------------------------------------------------
# transformers CLIPModel


HF_SIZES = {
    # name: (text width, text layers, text heads, context, vision width, vision layers, vision heads, image, patch, embed)
    "tiny": (64, 2, 2, 32, 64, 2, 2, 64, 16, 48),
    "ViT-B-16": (512, 12, 8, 77, 768, 12, 12, 224, 16, 512),  # openai/clip-vit-base-patch16's shapes
}


def hf_clip_model(activation: str, size: str = "tiny"):
    transformers = pytest.importorskip("transformers")
    tw, tl, th, ctx, vw, vl, vh, image, patch, embed = HF_SIZES[size]
    text = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                                       num_attention_heads=th, max_position_embeddings=ctx, hidden_act=activation,
                                       bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = transformers.CLIPVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                                           num_attention_heads=vh, image_size=image, patch_size=patch,
                                           hidden_act=activation)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=embed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("activation, size", [("gelu", "tiny"), ("quick_gelu", "tiny"), ("quick_gelu", "ViT-B-16")])
def test_transformers_clipmodel_folder(tmp_path, activation, size):
    reference = hf_clip_model(activation, size)
    reference.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    model = ldmclip.create_model(f"local-dir:{tmp_path / 'hf'}").eval()
    assert model.config.quick_gelu == (activation == "quick_gelu")
    assert model.config.embed_dim == HF_SIZES[size][-1]
    if size == "ViT-B-16":  # the converted config is the packaged OpenAI-style config
        assert model.config == ldmclip.get_model_config("ViT-B-16-quickgelu")
    images, tokens = sample_inputs(model.image_size, model.context_length)
    with torch.no_grad():
        theirs_text = _features(reference.get_text_features(input_ids=tokens))
        theirs_image = _features(reference.get_image_features(pixel_values=images))
        assert relative_error(model.encode_text(tokens), theirs_text) <= 1e-5
        assert relative_error(model.encode_image(images), theirs_image) <= 1e-5
        assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())


def test_transformers_weights_into_a_packaged_config(tmp_path):
    reference = hf_clip_model("gelu")
    reference.save_pretrained(tmp_path / "hf")
    model = ldmclip.create_model(f"local-dir:{tmp_path / 'hf'}")
    # the same HF weights through pretrained= and a JSON config describing the architecture
    model.save_pretrained(tmp_path / "ours")
    again = ldmclip.create_model(f"local-dir:{tmp_path / 'ours'}", pretrained=tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_hf_round_trip_of_state_dict_is_lossless(tiny_reference):
    from ldmclip.checkpoints import hf_to_openclip_state_dict, openclip_to_hf_state_dict

    state = tiny_reference.state_dict()
    back = hf_to_openclip_state_dict(openclip_to_hf_state_dict(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def record_safetensors_reads(monkeypatch) -> list[str]:
    """From now on, the name of every tensor ``read_state_dict`` reads from a safetensors file is
    appended to the returned list."""
    from ldmclip.checkpoints import state_dict as state_dict_module

    read: list[str] = []
    real_open = state_dict_module.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

        def get_slice(self, name):  # a shape from the header: not a read (checkpoints.sd asks for them)
            return self.handle.get_slice(name)

    monkeypatch.setattr(state_dict_module, "safe_open", Recording)
    return read


def _layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``state`` (OpenCLIP keys) written the way another tool would."""
    from ldmclip.checkpoints import openclip_to_hf_state_dict
    from ldmclip.models.text import is_text_key

    if layout == "ddp":
        return {f"module._orig_mod.{k}": v for k, v in state.items()}
    if layout == "custom-text":  # OpenCLIP's CustomTextCLIP
        return {f"text.{k}" if is_text_key(k) else k: v for k, v in state.items()}
    hf = openclip_to_hf_state_dict(state)
    if layout == "transformers-5-text":  # a CLIPTextModelWithProjection saved by transformers 5: no text_model.
        return {k.removeprefix("text_model."): v for k, v in hf.items()
                if k.startswith("text_model.") or k == "text_projection.weight"}
    return hf


@pytest.mark.parametrize("layout", ["openclip", "ddp", "custom-text", "transformers", "transformers-5-text"])
def test_read_state_dict_with_a_key_filter_reads_only_those_tensors(tiny_reference, tmp_path, layout, monkeypatch):
    from safetensors.torch import save_file

    from ldmclip.checkpoints import openclip_key_names
    from ldmclip.models.text import is_text_key

    state = _layout(tiny_reference.state_dict(), layout)
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    whole = read_state_dict(tmp_path / "w.safetensors")
    # the names alone give the names of the whole read (q/k/v share their in_proj name)
    assert {n for n in openclip_key_names(list(state)).values() if n is not None} == set(whole)
    wanted = {k: v for k, v in whole.items() if is_text_key(k)}
    assert wanted and (len(wanted) < len(whole)) == (layout != "transformers-5-text")
    read = record_safetensors_reads(monkeypatch)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        got = read_state_dict(path, keys=is_text_key)
        assert got.keys() == wanted.keys() and all(torch.equal(got[k], v) for k, v in wanted.items()), path
    assert read and all(is_text_key(n) for n in openclip_key_names(read).values())  # nothing else was read
    assert read_state_dict(tmp_path / "w.safetensors", keys=lambda key: False) == {}


# ---------------------------------------------------------------------------------------------
# hf-hub: through the Hugging Face cache, offline


def test_hf_hub_name_loads_from_cache_offline(tiny_reference, tmp_path, offline_hub):
    folder = save_openclip_hub(tiny_reference, TINY, tmp_path / "hub")
    fake_hub_cache(offline_hub, "someone/tiny-clip",
                    {n: folder / n for n in ("open_clip_config.json", "open_clip_model.safetensors")})
    model = ldmclip.create_model("hf-hub:someone/tiny-clip")
    assert_same_outputs(model, tiny_reference, 64, 32)
    model = ldmclip.create_model(TINY, pretrained="hf-hub:someone/tiny-clip")
    assert_same_outputs(model, tiny_reference, 64, 32)


def test_hf_hub_name_with_a_sub_folder(tiny_reference, tmp_path, offline_hub):
    # a diffusers-style repo: the model sits in a folder of the repository (e.g. text_encoder/)
    folder = save_openclip_hub(tiny_reference, TINY, tmp_path / "hub")
    fake_hub_cache(offline_hub, "someone/pipeline",
                    {f"models/tiny/{n}": folder / n for n in ("open_clip_config.json", "open_clip_model.safetensors")})
    model = ldmclip.create_model("hf-hub:someone/pipeline/models/tiny")
    assert_same_outputs(model, tiny_reference, 64, 32)
    with pytest.raises(CheckpointError, match="has no folder 'models/other'"):
        ldmclip.create_model("hf-hub:someone/pipeline/models/other")
    with pytest.raises(CheckpointError, match="not a repository name"):
        ldmclip.create_model("hf-hub:just-a-name")


def test_hf_hub_not_cached_offline_is_a_clear_error(offline_hub):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        ldmclip.create_model("hf-hub:nobody/not-there")


# ---------------------------------------------------------------------------------------------
# bad checkpoints


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ldmclip-pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = Path("/tmp/ldmclip-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ldmclip.create_model(TINY, pretrained=path)
    assert not marker.exists()


def test_mismatched_checkpoint_names_keys_and_suggests_config(tiny_reference, tmp_path):
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_reference.state_dict(), str(path))
    with pytest.raises(CheckpointError) as error:
        ldmclip.create_model("ViT-S-8-64", pretrained=path)
    message = str(error.value)
    assert "missing keys" in message and "transformer.resblocks.{2..5}.ln_1.weight" in message
    assert "mis-shaped keys" in message and "token_embedding.weight: checkpoint (49408, 64) vs model (49408, 256)" in message
    assert "looks like: ViT-Tiny-64" in message


def test_unexpected_keys_are_reported(tiny_reference, tmp_path):
    state = dict(tiny_reference.state_dict())
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): visual.extra_head.weight"):
        ldmclip.create_model(TINY, pretrained=path)


def test_missing_files_and_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        ldmclip.create_model(TINY, pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="'laion2b_s32b_b82k' is a pretrained tag of ViT-L-14, not of ViT-Tiny-64"):
        ldmclip.create_model(TINY, pretrained="laion2b_s32b_b82k")  # tests/models/test_pretrained_tags.py: tags
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ldmclip.create_model(f"local-dir:{tmp_path}")
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError):
        read_state_dict(path)


def test_save_pretrained_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = ldmclip.create_model(TINY)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["open_clip_config.json",
                                                                    "open_clip_model.safetensors"]


@pytest.mark.parametrize("with_keys", [False, True])  # read whole, or only the text tower (load_text_tower)
@pytest.mark.parametrize("cut", [0, 7, 100, "half"])
def test_a_truncated_safetensors_file_is_a_checkpoint_error_naming_it(tiny_reference, tmp_path, with_keys, cut):
    from ldmclip.core.files import write_safetensors
    from ldmclip.models.text import is_text_key

    path = tmp_path / "cut.safetensors"
    write_safetensors(path, tiny_reference.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(CheckpointError, match=f"cannot read {path}: ") as error:
        read_state_dict(path, keys=is_text_key if with_keys else None)
    assert ("empty (0 bytes)" if cut == 0 else "truncated") in str(error.value)
