"""WiSE-FT: interpolating two checkpoints of one architecture (checkpoints.merge, ``ldmclip merge``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ldmclip
from ldmclip.checkpoints import CheckpointError, interpolate_state_dicts
from ldmclip.cli import main


def _pair():
    torch.manual_seed(1)
    a = ldmclip.create_model("ViT-Tiny-64")
    torch.manual_seed(2)
    b = ldmclip.create_model("ViT-Tiny-64")
    return a, b


def _bits(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes: bit-identical means equal bytes (torch.equal calls -0.0 and 0.0 equal)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "open_clip_model.safetensors"))


def test_alpha_0_and_1_return_the_inputs_bit_for_bit_and_one_half_the_mean():
    a, b = _pair()
    sa, sb = a.state_dict(), b.state_dict()
    sa["visual.proj"][0, 0] = -0.0  # arithmetic would make these 0.0 and NaN
    sb["visual.proj"][0, 1] = float("inf")
    sa["counter"], sb["counter"] = torch.tensor([3, 4]), torch.tensor([7, 8])  # an integer buffer: A's
    for alpha, expected in ((0.0, sa), (1.0, sb)):
        merged = interpolate_state_dicts(sa, sb, alpha)
        for key in sa:
            want = sa[key] if key == "counter" else expected[key]
            assert merged[key].dtype == want.dtype
            assert _bits(merged[key]) == _bits(want), (alpha, key)
    sb["visual.proj"][0, 1] = 1.0
    half = interpolate_state_dicts(sa, sb, 0.5)
    for key in sa:
        if key != "counter":
            torch.testing.assert_close(half[key], (sa[key] + sb[key]) / 2, rtol=1e-6, atol=1e-7)
    assert torch.equal(half["counter"], sa["counter"])
    third = interpolate_state_dicts(sa, sb, 0.25)
    torch.testing.assert_close(third["logit_scale"], 0.75 * sa["logit_scale"] + 0.25 * sb["logit_scale"])


def test_different_architectures_are_refused_with_the_reason():
    a = ldmclip.create_model("ViT-Tiny-64").state_dict()
    b = ldmclip.create_model("ViT-T-8-64").state_dict()
    with pytest.raises(CheckpointError, match="not the same architecture"):
        interpolate_state_dicts(a, b, 0.5)
    fewer = {k: v for k, v in a.items() if not k.startswith("visual.transformer.resblocks.1.")}
    with pytest.raises(CheckpointError, match="only in the first"):
        interpolate_state_dicts(a, fewer, 0.5)
    with pytest.raises(CheckpointError, match="alpha"):
        interpolate_state_dicts(a, a, 1.5)


def test_merge_command_reads_any_layout_and_writes_the_hub_layout(tmp_path, capsys):
    a, b = _pair()
    a.save_pretrained(tmp_path / "a")
    torch.save({"state_dict": {f"module.{k}": v for k, v in b.state_dict().items()}}, tmp_path / "b.pt")  # DDP layout
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b.pt"), "--model", "ViT-Tiny-64", "--alpha", "0.5",
                 "--out", str(tmp_path / "c")]) == 0
    merged = _weights(tmp_path / "c")
    expected = interpolate_state_dicts(a.state_dict(), b.state_dict(), 0.5)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert ldmclip.create_model(f"local-dir:{tmp_path / 'c'}").preprocess_cfg == a.preprocess_cfg
    assert not list(tmp_path.glob(".c.tmp*"))
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--alpha", "0", "--out", str(tmp_path / "d")]) == 0
    assert all(torch.equal(v, _weights(tmp_path / "a")[k]) for k, v in _weights(tmp_path / "d").items())


def test_merge_command_refuses_other_architectures_and_an_existing_out(tmp_path, capsys):
    ldmclip.create_model("ViT-Tiny-64").save_pretrained(tmp_path / "a")
    ldmclip.create_model("ViT-T-8-64").save_pretrained(tmp_path / "b")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) != 0
    assert "not the same architecture" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "b")]) != 0
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "a" / "open_clip_model.safetensors"),
                 "--out", str(tmp_path / "e")]) != 0
    assert "--model" in capsys.readouterr().err
