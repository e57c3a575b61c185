"""ldmclip embed: embeddings and CLIP score against the model itself, clip-retrieval's layout read by faiss,
byte-identical output after kill -9 + rerun and on two processes, bad input counted or refused."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmclip
from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.curate.embed import EmbedMismatchError, embed_shards, embed_store, shard_files
from ldmclip.data.synthetic import SyntheticScenes
from ldmclip.data.writer import write_shards

MODEL = "ViT-Tiny-64"
CLI = ["--model", MODEL, "--random-init", "--precision", "fp32", "--quiet", "--workers", "0"]


def _model():
    torch.manual_seed(0)  # the weights `--random-init` makes
    model, _, preprocess = ldmclip.create_model_and_transforms(MODEL)
    return model.eval(), preprocess, ldmclip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng(devices=[]):
        return _model()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _synthetic_shards(folder: Path, n: int, per_shard: int) -> list[str]:
    scenes = SyntheticScenes("train", image_size=64, length=n, seed=0)
    items = ((i, _png(scenes[i][0]), scenes[i][1], None) for i in range(n))
    return [str(p) for p in write_shards(items, folder, max_per_shard=per_shard)]


@pytest.fixture(scope="module")
def flickr_shards(tmp_path_factory):
    from tests.conftest import first_flickr8k_captions

    flickr, first = first_flickr8k_captions(24)
    folder = tmp_path_factory.mktemp("flickr_shards")
    items = ((name.split(".")[0], flickr / "images" / name, caption, None) for name, caption in first.items())
    return [str(p) for p in write_shards(items, folder, max_per_shard=10)], first


def _read_tar(path: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _rows(out: Path):
    import pandas as pd

    img = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    text = np.concatenate([np.load(p) for p in sorted((out / "text_emb").glob("*.npy"))])
    meta = pd.concat([pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet"))], ignore_index=True)
    return img, text, meta


def test_embeddings_equal_the_models_own_outputs_on_flickr8k(tiny, flickr_shards, tmp_path):
    model, preprocess, tokenizer = tiny
    shards, captions = flickr_shards
    report = embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", dtype="fp32", precision="fp32",
                          batch_size=4)
    assert report.written == ["shard-00000", "shard-00001", "shard-00002"] and not report.failed
    assert report.counts["embedded"] == report.counts["records"] == 24 and report.counts["skipped"] == {}
    img, text, meta = _rows(tmp_path / "emb")
    assert img.dtype == text.dtype == np.float32 and img.shape == text.shape == (24, model.config.embed_dim)
    assert list(meta.columns) == ["key", "caption", "clip_score", "width", "height", "shard"]
    assert str(meta["clip_score"].dtype) == "float32" and str(meta["width"].dtype) == "int32"

    # the reference: the shard's own bytes, decoded with PIL, preprocessed, encoded in one batch
    raw = {k: v for s in shards for k, v in _read_tar(s).items()}
    assert list(meta["key"]) == list(raw)  # shard order, sample order
    images = torch.stack([preprocess(Image.open(io.BytesIO(raw[k]["jpg"]))) for k in meta["key"]])
    with torch.no_grad():
        ref_img = model.encode_image(images, normalize=True)
        ref_text = model.encode_text(tokenizer([raw[k]["txt"].decode() for k in meta["key"]]), normalize=True)
    torch.testing.assert_close(torch.from_numpy(img), ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(text), ref_text, rtol=0, atol=1e-5)
    np.testing.assert_allclose(meta["clip_score"], (img * text).sum(1), atol=1e-6)
    assert list(meta["caption"]) == [captions[k + ".jpg"].strip() for k in meta["key"]]
    assert (meta["width"] == 224).all() and (meta["height"] == 224).all()
    assert list(meta["shard"]) == ["shard-00000"] * 10 + ["shard-00001"] * 10 + ["shard-00002"] * 4
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["format"] == "ldmclip-embeddings" and manifest["shards"] == report.written
    assert manifest["totals"]["embedded"] == 24 and manifest["dtype"] == "fp32"


def test_a_caption_table_gives_the_same_rows_as_its_shards(tiny, flickr_shards, tmp_path):
    import pandas as pd

    from tests.conftest import shared_data_dir

    model, preprocess, tokenizer = tiny
    shards, captions = flickr_shards
    table = tmp_path / "flickr.csv"
    pd.DataFrame({"image": list(captions), "caption": list(captions.values())}).to_csv(table, index=False)
    images = shared_data_dir() / "flickr8k" / "images"
    options = dict(dtype="fp32", precision="fp32", batch_size=4)
    embed_shards(model, preprocess, tokenizer, shards, tmp_path / "from_shards", **options)
    report = embed_shards(model, preprocess, tokenizer, table, tmp_path / "from_table", images=images, shard_size=10,
                          **options)
    assert report.written == ["flickr-00000", "flickr-00001", "flickr-00002"]
    a_img, a_text, a_meta = _rows(tmp_path / "from_shards")
    b_img, b_text, b_meta = _rows(tmp_path / "from_table")
    assert list(b_meta["key"]) == [f"{name}#{row}" for row, name in enumerate(captions)]  # CaptionTable's keys
    np.testing.assert_allclose(b_img, a_img, atol=1e-6)  # write_shards stored the JPEG bytes as they were
    np.testing.assert_allclose(b_text, a_text, atol=1e-6)
    assert list(b_meta["caption"]) == list(a_meta["caption"])
    # another --shard-size over the same folder would mix two cuttings of the table: refused
    with pytest.raises(EmbedMismatchError, match="shard-size"):
        embed_shards(model, preprocess, tokenizer, table, tmp_path / "from_table", images=images, shard_size=8,
                     **options)


def test_faiss_builds_an_index_from_the_output_as_it_is(tiny, flickr_shards, tmp_path):
    # autofaiss pins numpy<2 and cannot be installed beside this stack, so faiss is used directly the way
    # autofaiss reads an embedding folder: every img_emb/*.npy in sorted order, metadata in the same order.
    faiss = pytest.importorskip("faiss")
    model, preprocess, tokenizer = tiny
    embed_shards(model, preprocess, tokenizer, flickr_shards[0], tmp_path / "emb", precision="fp32", batch_size=8)
    img, _, meta = _rows(tmp_path / "emb")
    assert img.dtype == np.float16  # the default, as clip-retrieval stores
    vectors = np.ascontiguousarray(img.astype(np.float32))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, rows = index.search(vectors, 1)
    assert index.ntotal == len(meta) == 24
    assert list(meta["key"].iloc[rows[:, 0]]) == list(meta["key"])  # each one's nearest neighbour is itself
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)


def _synthetic_tar(path: Path, members: list[tuple[str, str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_bad_samples_are_counted_by_reason_and_a_truncated_shard_keeps_its_complete_samples(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    scenes = SyntheticScenes("train", image_size=64, length=8, seed=1)
    good = [(f"g{i}", _png(scenes[i][0]), scenes[i][1].encode()) for i in range(8)]
    (tmp_path / "in").mkdir()
    bad = _synthetic_tar(tmp_path / "in" / "bad.tar", [
        ("a", "png", good[0][1]), ("a", "txt", good[0][2]),
        ("b", "jpg", b"\xff\xd8 this is not a jpeg"), ("b", "txt", b"a corrupt image"),
        ("c", "png", good[1][1]),                                   # no caption
        ("d", "png", good[2][1]), ("d", "txt", b"   "),             # empty caption
        ("e", "txt", b"a caption without an image"),
    ])
    whole = _synthetic_tar(tmp_path / "in" / "cut.tar", [(k, ext, d) for k, img, cap in good
                                                         for ext, d in (("png", img), ("txt", cap))])
    data = Path(whole).read_bytes()
    Path(whole).write_bytes(data[: len(data) * 6 // 10])  # cut inside a later member
    not_tar = tmp_path / "in" / "junk.tar"
    not_tar.write_bytes(b"not a tar file at all" * 10)
    shards = [bad, whole, str(not_tar)]
    report = embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", precision="fp32", batch_size=2)
    assert report.written == ["bad", "cut"] and list(report.failed) == ["junk"]
    store = embed_store(tmp_path / "emb")
    assert store.chunk_names() == ["bad", "cut"]  # junk is not marked done: a rerun retries it
    counts = store.read_chunk_meta("bad")["counts"]
    assert counts["records"] == 5 and counts["embedded"] == 1
    assert counts["skipped"] == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1, "not_an_image": 1}
    cut = store.read_chunk_meta("cut")["counts"]
    assert 0 < cut["embedded"] < 8 and cut["skipped"] == {"truncated_shard": 1}
    import pandas as pd

    meta = pd.read_parquet(shard_files(tmp_path / "emb", "cut")["metadata"])
    assert list(meta["key"]) == [f"g{i}" for i in range(cut["embedded"])]  # the complete samples before the cut
    assert list(pd.read_parquet(shard_files(tmp_path / "emb", "bad")["metadata"])["key"]) == ["a"]
    assert not shard_files(tmp_path / "emb", "junk")["img_emb"].exists()
    # fixed, the failed shard is embedded by the rerun; the others are not redone
    _synthetic_tar(not_tar, [("z", "png", good[3][1]), ("z", "txt", good[3][2])])
    again = embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", precision="fp32", batch_size=2)
    assert again.written == ["junk"] and again.already_done == ["bad", "cut"] and not again.failed


def test_decoding_in_worker_processes_gives_the_same_bytes(tiny, tmp_path, capsys):
    model, preprocess, tokenizer = tiny
    shards = _synthetic_shards(tmp_path / "in", 7, 3)
    options = dict(precision="fp32", batch_size=2)
    embed_shards(model, preprocess, tokenizer, shards, tmp_path / "main", **options)
    report = embed_shards(model, preprocess, tokenizer, shards, tmp_path / "workers", workers=2, progress=True,
                          **options)
    assert report.written == ["shard-00000", "shard-00001", "shard-00002"] and report.counts["embedded"] == 7
    assert _tree(tmp_path / "workers") == _tree(tmp_path / "main")
    assert "7/7" in capsys.readouterr().err  # the bar's total comes from the shards' sizes.json


def test_a_rerun_removes_what_a_killed_run_left_and_redoes_an_unmarked_shard(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    shards = _synthetic_shards(tmp_path / "in", 4, 2)
    out = tmp_path / "emb"
    embed_shards(model, preprocess, tokenizer, shards, out, precision="fp32")
    reference = _tree(out)
    # a run killed after writing shard-00001's embeddings, before its marker, with temporaries in every folder
    embed_store(out).chunk_path("shard-00001").unlink()
    shard_files(out, "shard-00001")["metadata"].unlink()
    leftovers = [out / "img_emb" / ".img_emb_shard-00001.npy.tmp", out / "metadata" / ".metadata_shard-00001.parquet.tmp",
                 out / "done" / ".shard-00001.safetensors.tmp", out / ".manifest.json.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    again = embed_shards(model, preprocess, tokenizer, shards, out, precision="fp32")
    assert again.written == ["shard-00001"] and again.already_done == ["shard-00000"]
    assert not any(p.exists() for p in leftovers) and _tree(out) == reference


def test_a_rerun_with_another_setup_is_refused_naming_the_fields(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    shards = _synthetic_shards(tmp_path / "in", 4, 2)
    embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", dtype="fp32", precision="fp32")
    with pytest.raises(EmbedMismatchError, match=r"dtype: .*'fp32', this run 'fp16'"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", dtype="fp16", precision="fp32")
    head = torch.nn.Linear(model.config.embed_dim, 1)
    with pytest.raises(EmbedMismatchError, match="heads"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "emb", dtype="fp32", precision="fp32",
                     heads={"aesthetic": head})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other, _, _ = ldmclip.create_model_and_transforms(MODEL)
    with pytest.raises(EmbedMismatchError, match=r"model \(sha256 differ"):
        embed_shards(other.eval(), preprocess, tokenizer, shards, tmp_path / "emb", dtype="fp32", precision="fp32")
    # an unrelated folder is never written into, nor the folder of the input shards
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "notes", precision="fp32")
    with pytest.raises(UserError, match="folder of the input shards"):
        embed_shards(model, preprocess, tokenizer, shards, tmp_path / "in", precision="fp32")
    assert embed_shards(model, preprocess, tokenizer, shards, tmp_path / "in" / "emb", precision="fp32").written


def test_cli_writes_the_layout_and_a_json_summary(tmp_path, capsys):
    shards = _synthetic_shards(tmp_path / "in", 5, 3)
    out = tmp_path / "emb"
    assert main(["embed", *shards, "--out", str(out), *CLI, "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["written"] == ["shard-00000", "shard-00001"] and summary["counts"]["embedded"] == 5
    assert sorted(_tree(out)) == ["done/shard-00000.safetensors", "done/shard-00001.safetensors",
                                  "img_emb/img_emb_shard-00000.npy", "img_emb/img_emb_shard-00001.npy",
                                  "manifest.json", "metadata/metadata_shard-00000.parquet",
                                  "metadata/metadata_shard-00001.parquet", "text_emb/text_emb_shard-00000.npy",
                                  "text_emb/text_emb_shard-00001.npy"]
    capsys.readouterr()
    assert main(["embed", *shards, "--out", str(tmp_path / "in"), *CLI]) == 2
    assert "folder of the input shards" in capsys.readouterr().err
    assert main(["embed", *shards, "--out", str(tmp_path / "x"), "--model", MODEL]) == 2
    assert "--pretrained is needed" in capsys.readouterr().err


def _one_thread_main(argv: list[str]) -> int:
    """``ldmclip ...`` in this process with one thread, like the subprocesses (OMP_NUM_THREADS=1), so that
    both compute with the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


KILL_CLI = [*CLI, "--batch-size", "2", "--dtype", "fp16"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_byte_identical_files(tmp_path):
    shards = _synthetic_shards(tmp_path / "in", 60, 4)  # 15 shards
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert _one_thread_main(["embed", *shards, "--out", str(reference), *KILL_CLI]) == 0
    rng = random.Random(1234)
    kills, seen = 0, []
    done = out / "done"
    # the killed runs decode in a worker process (--workers 1): the bytes may not depend on it
    command = [sys.executable, "-m", "ldmclip", "embed", *shards, "--out", str(out), *KILL_CLI, "--workers", "1"]
    for _ in range(3):
        finished = len(list(done.glob("*.safetensors"))) if done.is_dir() else 0
        target = rng.randint(finished, min(finished + 4, 10))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and \
                (not done.is_dir() or len(list(done.glob("*.safetensors"))) < target):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next shard's encoding or writing
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        seen.append(len(list(done.glob("*.safetensors"))))
    assert kills >= 2 and seen[-1] < 15, f"the runs finished before they could be killed ({seen} shards)"
    assert _one_thread_main(["embed", *shards, "--out", str(out), *KILL_CLI]) == 0
    assert _tree(out) == _tree(reference)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_files_as_one(tmp_path):
    shards = _synthetic_shards(tmp_path / "in", 15, 3)  # 5 shards: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
    assert _one_thread_main(["embed", *shards, "--out", str(tmp_path / "single"), *KILL_CLI]) == 0
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID")
    base = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("SLURM")}
    base.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
    command = [sys.executable, "-m", "ldmclip", "embed", *shards, "--out", str(tmp_path / "ranks"), *KILL_CLI]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "[rank 0] embedded 3 shard(s)" in outputs[0][0] and "[rank 1] embedded 2 shard(s)" in outputs[1][0]
    assert _tree(tmp_path / "ranks") == _tree(tmp_path / "single")
