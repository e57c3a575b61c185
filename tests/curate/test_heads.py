"""Score heads: both state-dict layouts (a Linear; LAION's improved-aesthetic-predictor MLP) from safetensors
and .pth, their column in ldmclip embed equal to the head applied by hand, and the errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ldmclip
from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.core.files import write_safetensors
from ldmclip.curate.embed import embed_shards, shard_files
from ldmclip.curate.heads import load_head, parse_head_option
from ldmclip.data.synthetic import SyntheticScenes
from ldmclip.data.writer import write_shards

MODEL = "ViT-Tiny-64"


class ImprovedAestheticMLP(nn.Module):
    """The layout of christophschuhmann/improved-aesthetic-predictor's MLP (its ReLUs are commented out),
    with the input width of the tiny test model."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = ldmclip.create_model_and_transforms(MODEL)
    return model.eval(), preprocess, ldmclip.get_tokenizer(MODEL)


def _shards(folder: Path) -> list[str]:
    scenes = SyntheticScenes("train", image_size=64, length=6, seed=0)

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        scenes[i][0].save(buf, "PNG")
        return buf.getvalue()

    return [str(p) for p in write_shards(((i, png(i), scenes[i][1], None) for i in range(6)), folder, max_per_shard=4)]


def _heads(width: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    return nn.Linear(width, 1), ImprovedAestheticMLP(width).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_both_layouts_load_and_compute_what_the_original_module_computes(tmp_path, suffix):
    linear, mlp = _heads(64)
    x = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    for name, module in (("linear", linear), ("mlp", mlp)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".safetensors":
            write_safetensors(path, module.state_dict())
        else:
            torch.save(module.state_dict(), path)
        head = load_head(path)
        with torch.no_grad():
            torch.testing.assert_close(head(x), module(x), rtol=0, atol=1e-6)
    assert [m.out_features for m in load_head(tmp_path / f"mlp{suffix}").modules() if isinstance(m, nn.Linear)] == \
        [1024, 128, 64, 16, 1]


def test_head_columns_equal_the_heads_applied_by_hand_to_the_stored_embeddings(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    linear, mlp = _heads(model.config.embed_dim)
    write_safetensors(tmp_path / "aesthetic.safetensors", mlp.state_dict())
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    shards = _shards(tmp_path / "in")
    out = tmp_path / "emb"
    embed_shards(model, preprocess, tokenizer, shards, out, dtype="fp32", precision="fp32", batch_size=3,
                 heads={"aesthetic": tmp_path / "aesthetic.safetensors", "linear": tmp_path / "linear.pth"})
    import pandas as pd

    for name in ("shard-00000", "shard-00001"):
        files = shard_files(out, name)
        emb = torch.from_numpy(np.load(files["img_emb"]))
        meta = pd.read_parquet(files["metadata"])
        assert list(meta.columns)[-2:] == ["aesthetic", "linear"] and str(meta["aesthetic"].dtype) == "float32"
        with torch.no_grad():
            np.testing.assert_allclose(meta["aesthetic"], mlp(emb)[:, 0].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(meta["linear"], linear(emb)[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_bad_heads_are_refused_before_any_work(tiny, tmp_path, capsys):
    model, preprocess, tokenizer = tiny
    shards = _shards(tmp_path / "in")
    torch.save(nn.Linear(768, 1).state_dict(), tmp_path / "vit-l.pth")  # LAION's ViT-L/14 width, not 64
    with pytest.raises(UserError, match="768-wide embeddings, but the model's embeddings are 64-wide"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", heads={"aesthetic": tmp_path / "vit-l.pth"})
    assert not (tmp_path / "emb").exists()
    head = nn.Linear(64, 1)
    with pytest.raises(UserError, match="built-in column"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", heads={"clip_score": head})
    torch.save({"fc.weight": torch.zeros(1, 64)}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="keys this reader does not know"):
        load_head(tmp_path / "odd.pt")
    torch.save(nn.Linear(64, 3).state_dict(), tmp_path / "three.pt")
    with pytest.raises(UserError, match="needs exactly one"):
        load_head(tmp_path / "three.pt")
    with pytest.raises(UserError, match="NAME=FILE"):
        parse_head_option("aesthetic.pth")
    with pytest.raises(UserError, match="letters, digits"):
        parse_head_option("my-score=a.pth")
    cli = ["embed", *shards, "--model", MODEL, "--random-init", "--quiet", "--workers", "0"]
    assert main([*cli, "--out", str(tmp_path / "e2"), "--head", f"a={tmp_path / 'vit-l.pth'}"]) == 2
    assert "768-wide" in capsys.readouterr().err
    assert main([*cli, "--out", str(tmp_path / "e2"), "--head", "a=x.pt", "--head", "a=y.pt"]) == 2
    assert "same NAME" in capsys.readouterr().err
