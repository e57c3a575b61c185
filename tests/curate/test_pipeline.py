"""The whole dataset pass from the command line, as a user runs it on Flickr8k shards: `ldmclip embed` with a
head and `--dedup`, then `ldmclip filter` on the CLIP score, the head and the kept duplicate, then `ldmclip
train` on the new shards. Each step reads what the one before wrote, as it is."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmclip.cli import main
from ldmclip.data.writer import write_shards

MODEL = "ViT-T-8-64"  # random-init features that still tell Flickr8k photos apart (see test_dedup.py)
THRESHOLD = "0.9995"
N = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """N Flickr8k photos in 2 shards, plus one of them again under another key, re-encoded as JPEG at quality 70."""
    from tests.conftest import first_flickr8k_captions

    flickr, first = first_flickr8k_captions(N)
    names = list(first)
    copy = io.BytesIO()
    Image.open(flickr / "images" / names[3]).convert("RGB").save(copy, "JPEG", quality=70)
    items = [(n.split(".")[0].replace("_", "x"), (flickr / "images" / n).read_bytes(), first[n], None) for n in names]
    items.insert(11, ("planted-copy", copy.getvalue(), first[names[3]], None))
    folder = tmp_path_factory.mktemp("shards")
    paths = write_shards(iter(items), folder, max_per_shard=11, reencode="never")
    return {"paths": [str(p) for p in paths], "keys": [k for k, *_ in items], "original": items[3][0]}


def _read_column(folder: Path, sub: str, column: str) -> list:
    import pyarrow.parquet as pq

    return [v for f in sorted((folder / sub).glob("*.parquet")) for v in pq.read_table(f).column(column).to_pylist()]


def test_embed_dedup_filter_train(shards, tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = torch.nn.Linear(128, 1)  # ViT-T-8-64's embedding width
    save_file({"weight": head.weight.detach(), "bias": head.bias.detach()}, tmp_path / "head.safetensors")
    emb = tmp_path / "emb"
    assert main(["embed", *shards["paths"], "--model", MODEL, "--random-init", "--out", str(emb), "--dtype", "fp32",
                 "--precision", "fp32", "--workers", "0", "--quiet", "--head", f"score={tmp_path / 'head.safetensors'}",
                 "--dedup", THRESHOLD]) == 0
    capsys.readouterr()

    keys = _read_column(emb, "metadata", "key")
    assert keys == shards["keys"]  # every sample, in shard order
    dedup_keys, keep = _read_column(emb, "dedup", "key"), _read_column(emb, "dedup", "dup_keep")
    assert dedup_keys == keys
    dropped = {k for k, kept in zip(keys, keep) if not kept}
    assert len(dropped) == 1 and dropped <= {"planted-copy", shards["original"]}  # the pair, nothing else
    groups = dict(zip(keys, _read_column(emb, "dedup", "dup_group")))
    assert groups["planted-copy"] == groups[shards["original"]]

    # the head column is the head applied by hand to the stored embeddings
    stored = np.concatenate([np.load(f) for f in sorted((emb / "img_emb").glob("*.npy"))])
    by_hand = head(torch.from_numpy(stored)).detach().squeeze(1).numpy()
    np.testing.assert_allclose(_read_column(emb, "metadata", "score"), by_hand, rtol=1e-5, atol=1e-6)

    scores = dict(zip(keys, _read_column(emb, "metadata", "clip_score")))
    cut = float(np.median(list(scores.values())))
    where = f"dup_keep and clip_score >= {cut!r}"
    kept_dir = tmp_path / "kept"
    assert main(["filter", *shards["paths"], "--scores", str(emb), "--where", where, "--out", str(kept_dir),
                 "--shard-size", "6", "--quiet"]) == 0
    expected = [k for k, kept in zip(keys, keep) if kept and scores[k] >= cut]
    out_shards = sorted(kept_dir.glob("*.tar"))
    got = [m.split(".")[0] for s in out_shards for m in _member_names(s) if m.endswith(".txt")]
    assert got == expected
    assert json.loads((kept_dir / "summary.json").read_text())["kept"] == len(expected)
    capsys.readouterr()

    pattern = str(kept_dir / f"{{00000..{len(out_shards) - 1:05d}}}.tar")
    assert main(["train", "--model", MODEL, "--data", pattern, "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert f"{len(out_shards)} shards, {len(expected)} samples" in printed.out + printed.err  # from sizes.json


def _member_names(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def test_dedup_and_filter_refuse_a_shard_without_its_done_marker(tmp_path):
    """A run killed after a shard's data files but before its marker: the shard is not finished, so dedup and
    filter must not read it as if it were (the rerun of embed redoes it)."""
    from ldmclip.core.errors import UserError
    from ldmclip.curate.dedup import dedup_folder
    from ldmclip.curate.filter import filter_shards
    from ldmclip.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes("train", image_size=32, length=6, seed=0)
    items = []
    for i in range(6):
        buf = io.BytesIO()
        scenes[i][0].save(buf, "PNG")
        items.append((i, buf.getvalue(), scenes[i][1], None))
    paths = [str(p) for p in write_shards(iter(items), tmp_path / "shards", max_per_shard=3)]
    emb = tmp_path / "emb"
    assert main(["embed", *paths, "--model", MODEL, "--random-init", "--out", str(emb), "--workers", "0", "--quiet"]) == 0
    markers = sorted((emb / "done").glob("*.safetensors"))
    assert len(markers) == 2
    dedup_folder(emb, 0.99)  # finished: read
    markers[1].unlink()
    with pytest.raises(UserError, match=f"shard\\(s\\) {markers[1].stem} are not finished"):
        dedup_folder(emb, 0.99)
    with pytest.raises(UserError, match="not finished"):
        filter_shards(paths, emb, "clip_score > -1", tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
