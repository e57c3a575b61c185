"""Text towers written back into single-file SD checkpoints (checkpoints.sd_write, export --format
sd-single-file): each layout built as the read tests build it (random tiny towers + a few non-text
tensors, fp16 and fp32), read, changed, written back and read again; every other byte unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ldmclip
from ldmclip.checkpoints import CheckpointError, find_text_encoders, read_text_encoders, sd_write, write_text_encoders
from ldmclip.core.files import temp_name, write_safetensors
from ldmclip.registry import _packaged_tower_configs, load_text_tower
from tests.checkpoints import test_sd_single_file as sdr

transformers = pytest.importorskip("transformers")

L_NAME, G_NAME = sdr.L_NAME, sdr.G_NAME
METADATA = {"format": "pt", "modelspec.title": "tiny test model", "ss_training_comment": "ünïcode {json: 1}"}
T5 = {"text_encoders.t5xxl.transformer.shared.weight": torch.randn(10, 8)}
POSITION_IDS = {"position_ids": torch.arange(32).unsqueeze(0)}  # an int64 buffer some SD 1.x files keep


def _layout(layout: str) -> dict[str, torch.Tensor]:
    """The text tensors of one single-file layout (random tiny towers)."""
    clip_l, big_g = sdr.hf_keys(sdr.hf_tower()), sdr.openclip_text_keys(sdr.openclip_tower())
    if layout == "sd1":
        return sdr.prefixed("cond_stage_model.transformer.",
                            {**clip_l, "text_model.embeddings.position_ids": POSITION_IDS["position_ids"]})
    if layout == "sd1-no-text-model":
        return sdr.prefixed("cond_stage_model.transformer.", {k.removeprefix("text_model."): v for k, v in clip_l.items()})
    if layout == "sd2":
        return sdr.prefixed("cond_stage_model.model.", big_g)
    if layout == "sdxl":
        return {**sdr.prefixed("conditioner.embedders.0.transformer.", clip_l),
                **sdr.prefixed("conditioner.embedders.1.model.", big_g)}
    if layout == "sdxl-refiner":
        return sdr.prefixed("conditioner.embedders.0.model.", big_g)
    if layout == "sd3":
        clip_g = sdr.hf_keys(sdr.hf_tower(G_NAME, projection=True))
        return {**T5, **sdr.prefixed("text_encoders.clip_l.transformer.", sdr.hf_keys(sdr.hf_tower(projection=True))),
                **sdr.prefixed("text_encoders.clip_g.transformer.", clip_g)}
    if layout == "clip_l-alone":
        return clip_l
    assert layout == "clip_g-alone-openclip"
    return big_g


def single_file(path: Path, layout: str, dtype: torch.dtype = torch.float32) -> Path:
    """A .safetensors file of ``layout`` in ``dtype`` (the non-text tensors keep mixed dtypes, as real files do)."""
    text = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _layout(layout).items()}
    filler = {} if layout.endswith("alone") or layout.endswith("openclip") else {
        **sdr.FILLER, "model.diffusion_model.time_embed.0.weight": torch.randn(6, 4).half(),
        "first_stage_model.quant_conv.bias": torch.arange(5, dtype=torch.int32)}
    save_file({k: v.contiguous() for k, v in {**filler, **text}.items()}, str(path), metadata=METADATA)
    return path


def header(path: Path) -> bytes:
    """The length prefix and the JSON header, as bytes."""
    data = path.read_bytes()
    return data[:8 + int.from_bytes(data[:8], "little")]


def text_keys(path: Path) -> set[str]:
    return {key for found in find_text_encoders(path) for key, _ in found.keys}


def tensor_hashes(path: Path, keys) -> dict[str, str]:
    """sha256 of each tensor's bytes, read through safetensors itself (not through the code under test)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: hashlib.sha256(f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k in keys}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed(encoder) -> dict[str, torch.Tensor]:
    """The encoder's tower "fine-tuned": every weight moved, in fp32 (as a trained tower is)."""
    return {k: v.float() + 0.01 * torch.randn(v.shape) for k, v in encoder.state.items()}


# the tiny config of each encoder of each layout (the family's own configs are real-sized)
CONFIGS = {"sd1": {"text_encoder": L_NAME}, "sd1-no-text-model": {"text_encoder": L_NAME},
           "sd2": {"text_encoder": G_NAME}, "sdxl": {"text_encoder": L_NAME, "text_encoder_2": G_NAME},
           "sdxl-refiner": {"text_encoder_2": G_NAME}, "sd3": {"text_encoder": L_NAME, "text_encoder_2": G_NAME},
           "clip_l-alone": {"text_encoder": L_NAME}, "clip_g-alone-openclip": {"text_encoder": G_NAME}}
LAYOUTS = list(CONFIGS)


def read(path: Path, layout: str) -> dict:
    """Every encoder of the file, as ldmclip reads it (OpenCLIP names, the file's dtype)."""
    packaged = _packaged_tower_configs()
    out = {}
    for encoder, name in CONFIGS[layout].items():
        out.update(read_text_encoders(path, packaged, (name, packaged[name]), encoder))
    return out


def weight_names(path: Path) -> dict[str, set[str]]:
    """The OpenCLIP names each encoder of the file stores (a CLIPTextModel slot has no projection)."""
    return {found.encoder: {name for _, name in found.keys} for found in find_text_encoders(path)}


# -- the round trip: read -> change -> write back -> read gives the new weights; nothing else changes --

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_back_gives_the_new_weights_and_keeps_every_other_byte(tmp_path, layout, dtype):
    path = single_file(tmp_path / "model.safetensors", layout, dtype)
    before = file_sha256(path)
    others = sorted(set(header_keys(path)) - text_keys(path) - {"__metadata__"})
    old = read(path, layout)
    new = {encoder: changed(encoder_read) for encoder, encoder_read in old.items()}
    out = tmp_path / "new.safetensors"
    result = write_text_encoders(path, out, new)

    assert result.out == out and set(result.replaced) == set(old)
    assert result.replaced == {e: len(f.keys) for e, f in {f.encoder: f for f in find_text_encoders(path)}.items()}
    again = read(out, layout)
    for encoder, names in weight_names(path).items():
        for name in names:
            written = again[encoder].state[name]
            assert written.dtype == dtype
            assert torch.equal(written, new[encoder][name].to(dtype)), (encoder, name)  # exact in the file's dtype
            assert not torch.equal(written, old[encoder].state[name]), (encoder, name)
    # the header (key order, dtypes, shapes, offsets and __metadata__) is the input's, byte for byte
    assert header(out) == header(path) and header_keys(out) == header_keys(path)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == METADATA
    assert tensor_hashes(out, others) == tensor_hashes(path, others)
    assert out.stat().st_size == path.stat().st_size
    assert file_sha256(path) == before  # the input was only read
    assert not temp_name(out).exists()


def header_keys(path: Path) -> list[str]:
    return list(json.loads(header(path)[8:]))


def test_only_the_named_encoder_changes(tmp_path):
    path = single_file(tmp_path / "sdxl.safetensors", "sdxl", torch.float16)
    old = read(path, "sdxl")
    clip_l_keys = [key for key, _ in find_text_encoders(path)[0].keys]
    write_text_encoders(path, tmp_path / "new.safetensors", {"text_encoder_2": changed(old["text_encoder_2"])})
    assert tensor_hashes(tmp_path / "new.safetensors", clip_l_keys) == tensor_hashes(path, clip_l_keys)
    assert not torch.equal(read(tmp_path / "new.safetensors", "sdxl")["text_encoder_2"].state["ln_final.weight"],
                           old["text_encoder_2"].state["ln_final.weight"])


def test_an_ldmclip_tower_written_into_an_fp16_file_loads_back(tmp_path, caplog):
    """A fine-tuned ldmclip TextTransformer (fp32) into an fp16 SD 1.x file: load_text_tower of the new file
    is that tower rounded to fp16; a whole CLIP's text tower is taken from it, its image tower ignored."""
    path = single_file(tmp_path / "sd1.safetensors", "sd1", torch.float16)
    tower = load_text_tower(L_NAME, path)
    with torch.no_grad():
        for param in tower.parameters():
            param.add_(0.01 * torch.randn_like(param))
    write_text_encoders(path, tmp_path / "new.safetensors", {"text_encoder": tower})
    loaded = load_text_tower(L_NAME, tmp_path / "new.safetensors")
    for name, value in tower.text_state_dict().items():
        if name != "text_projection":  # the file has none: it stays the identity
            assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    clip = ldmclip.create_model(L_NAME)
    with caplog.at_level("WARNING"):
        write_text_encoders(path, tmp_path / "clip.safetensors", {"text_encoder": clip})
    assert "text_projection is not written" in caplog.text
    assert torch.equal(load_text_tower(L_NAME, tmp_path / "clip.safetensors").token_embedding.weight,
                       clip.token_embedding.weight.half().float())


def test_no_tensor_is_loaded_through_safetensors(tmp_path, monkeypatch):
    """Streamed: the untouched tensors' bytes are copied, never read as tensors."""
    from tests.test_checkpoints import record_safetensors_reads

    path = single_file(tmp_path / "sdxl.safetensors", "sdxl")
    new = {e: changed(enc) for e, enc in read(path, "sdxl").items()}
    reads = record_safetensors_reads(monkeypatch)
    write_text_encoders(path, tmp_path / "new.safetensors", new)
    assert reads == []


def test_a_crash_while_writing_leaves_no_half_file(tmp_path, monkeypatch):
    path = single_file(tmp_path / "sdxl.safetensors", "sdxl")
    new = {e: changed(enc) for e, enc in read(path, "sdxl").items()}
    out = tmp_path / "new.safetensors"
    out.write_bytes(b"an older output")
    real_copy, calls = sd_write._copy, []

    def crash(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("the machine went down")
        real_copy(*args)

    monkeypatch.setattr(sd_write, "_copy", crash)
    before = file_sha256(path)
    with pytest.raises(OSError, match="went down"):
        write_text_encoders(path, out, new)
    assert out.read_bytes() == b"an older output" and not temp_name(out).exists()
    assert file_sha256(path) == before


# -- bad input: one clear error naming what was found; nothing written, the input unchanged ----------

def _refused(path: Path, out: Path, towers: dict, match: str) -> None:
    before, existed = file_sha256(path), out.exists()
    with pytest.raises(CheckpointError, match=match) as error:
        write_text_encoders(path, out, towers)
    assert "\n" not in str(error.value)
    assert file_sha256(path) == before and out.exists() == existed and not temp_name(out).exists()


def test_the_output_is_the_input(tmp_path, monkeypatch):
    path = single_file(tmp_path / "sd1.safetensors", "sd1", torch.float16)
    towers = {e: changed(enc) for e, enc in read(path, "sd1").items()}
    (tmp_path / "link.safetensors").symlink_to(path)
    os.link(path, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    for out in (path, tmp_path / "link.safetensors", Path("sd1.safetensors"), tmp_path / "sub" / ".." / path.name,
                tmp_path / "hard.safetensors"):
        _refused(path, out, towers, r"is the input checkpoint .*sd1.safetensors: write to a new file")
    # the temporary name beside the output: opening it for writing would truncate the input
    temporary = tmp_path / ".new.safetensors.tmp"
    temporary.write_bytes(path.read_bytes())
    before = file_sha256(temporary)
    with pytest.raises(CheckpointError, match="is the input checkpoint"):
        write_text_encoders(temporary, tmp_path / "new.safetensors", towers)
    assert file_sha256(temporary) == before and not (tmp_path / "new.safetensors").exists()
    _refused(path, tmp_path / "new.ckpt", towers, "the output .*new.ckpt must be a .safetensors file")


def test_a_file_without_a_text_encoder_or_without_that_encoder(tmp_path):
    unet = tmp_path / "unet.safetensors"
    save_file(sdr.FILLER, str(unet))
    _refused(unet, tmp_path / "new.safetensors", {"text_encoder": {}},
             r"unet.safetensors holds no CLIP text encoder to replace .*3 tensors: model.diffusion_model")
    path = single_file(tmp_path / "sd1.safetensors", "sd1")
    tower = changed(read(path, "sd1")["text_encoder"])
    _refused(path, tmp_path / "new.safetensors", {"text_encoder_2": tower},
             "has no text encoder 'text_encoder_2'; it has: text_encoder")
    _refused(path, tmp_path / "new.safetensors", {"text_encoder": {"visual.conv1.weight": torch.zeros(1)}},
             "the tower given for text_encoder has no text-tower tensors")


def test_a_tower_of_another_shape(tmp_path):
    path = single_file(tmp_path / "sdxl.safetensors", "sdxl", torch.float16)
    towers = read(path, "sdxl")
    big_g = changed(towers["text_encoder_2"])
    _refused(path, tmp_path / "new.safetensors", {"text_encoder": big_g},
             r"the tower given for text_encoder \(width 128, 4 blocks.*\) does not fit text_encoder "
             r"\(conditioner.embedders.0.transformer.\*\) of the sdxl checkpoint .*\(width 64.*nothing was written")
    fewer = {k: v for k, v in big_g.items() if not k.startswith("transformer.resblocks.3.")}
    _refused(path, tmp_path / "new.safetensors", {"text_encoder_2": fewer},
             r"\(width 128, 3 blocks.*first difference transformer.resblocks.3.attn.in_proj_bias: missing")
    wider = {**big_g, "positional_embedding": torch.zeros(77, 128)}
    _refused(path, tmp_path / "new.safetensors", {"text_encoder_2": wider},
             r"context length 77.*positional_embedding: \(77, 128\) in the tower")
    # a good tower beside a bad one: still nothing written
    _refused(path, tmp_path / "new.safetensors", {"text_encoder_2": big_g, "text_encoder": big_g}, "does not fit")


def test_a_half_written_or_pickled_input(tmp_path):
    path = single_file(tmp_path / "sdxl.safetensors", "sdxl")
    tower = changed(read(path, "sdxl")["text_encoder"])
    path.write_bytes(path.read_bytes()[:-100])
    _refused(path, tmp_path / "new.safetensors", {"text_encoder": tower},
             "cannot read .*sdxl.safetensors: not a complete .safetensors file")
    ckpt = sdr.write(tmp_path / "sd1.ckpt", _layout("sd1"))
    _refused(ckpt, tmp_path / "new.safetensors", {"text_encoder": tower},
             r"sd1.ckpt is a pickled checkpoint \(.ckpt\).*convert it to .safetensors first")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        write_text_encoders(tmp_path / "missing.safetensors", tmp_path / "new.safetensors", {})


# -- the command line ------------------------------------------------------------------------------

def _text_tower_file(path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    tower = ldmclip.create_model(name)
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith("visual.")}
    write_safetensors(path, state)
    return path, state


def test_cli_writes_both_sdxl_towers(tmp_path, capsys):
    from ldmclip.cli import main

    path = single_file(tmp_path / "sdxl.safetensors", "sdxl", torch.float16)
    final = tmp_path / "final"
    clip_l = ldmclip.create_model(L_NAME)
    clip_l.save_pretrained(final)  # the final/ folder an ldmclip run writes
    big_g_file, big_g = _text_tower_file(tmp_path / "bigg.safetensors", G_NAME)
    out = tmp_path / "new.safetensors"
    assert main(["export", "--format", "sd-single-file", "--into", str(path), "--model", f"local-dir:{final}",
                 "--model-2", G_NAME, "--pretrained-2", str(big_g_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "text_encoder (" in printed and "text_encoder_2 (" in printed
    again = read(out, "sdxl")
    assert torch.equal(again["text_encoder"].state["token_embedding.weight"], clip_l.token_embedding.weight.half())
    assert torch.equal(again["text_encoder_2"].state["text_projection"], big_g["text_projection"].half())
    assert header(out) == header(path)
    # --encoder: one tower for the file's second encoder alone
    out_2 = tmp_path / "only-bigg.safetensors"
    assert main(["export", "--format", "sd-single-file", "--into", str(path), "--encoder", "text_encoder_2",
                 "--model", G_NAME, "--pretrained", str(big_g_file), "--out", str(out_2)]) == 0
    clip_l_keys = [key for key, _ in find_text_encoders(path)[0].keys]
    assert tensor_hashes(out_2, clip_l_keys) == tensor_hashes(path, clip_l_keys)


@pytest.mark.parametrize("case", ["same-file", "exists", "shape", "no-encoder-2", "dtype", "into-elsewhere"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case):
    from ldmclip.cli import main

    path = single_file(tmp_path / "sd1.safetensors", "sd1", torch.float16)
    big_g_file, _ = _text_tower_file(tmp_path / "bigg.safetensors", G_NAME)
    l_file, _ = _text_tower_file(tmp_path / "clip_l.safetensors", L_NAME)
    (tmp_path / "link.safetensors").symlink_to(path)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    tower = ["--model", L_NAME, "--pretrained", str(l_file)]
    argv, phrase = {
        "same-file": (["--into", str(path), "--out", str(tmp_path / "link.safetensors"), *tower],
                      "is the input checkpoint"),
        "exists": (["--into", str(path), "--out", str(tmp_path / "exists.safetensors"), *tower], "already exists"),
        "shape": (["--into", str(path), "--out", str(tmp_path / "new.safetensors"), "--model", G_NAME,
                   "--pretrained", str(big_g_file)], "does not fit text_encoder (cond_stage_model.transformer.*)"),
        "no-encoder-2": (["--into", str(path), "--out", str(tmp_path / "new.safetensors"), *tower, "--model-2",
                          G_NAME, "--pretrained-2", str(big_g_file)], "--model-2/--pretrained-2 replace text_encoder_2"),
        "dtype": (["--into", str(path), "--out", str(tmp_path / "new.safetensors"), *tower, "--dtype", "fp16"],
                  "--dtype is not for --format sd-single-file"),
        "into-elsewhere": (["--format", "transformers", "--into", str(path), "--out", str(tmp_path / "te"), *tower],
                           "--into and --encoder are for --format sd-single-file"),
    }[case]
    before = file_sha256(path)
    fmt = [] if case == "into-elsewhere" else ["--format", "sd-single-file"]
    assert main(["export", *fmt, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldmclip export: error: ") and phrase in err, err
    assert file_sha256(path) == before and not (tmp_path / "new.safetensors").exists()
