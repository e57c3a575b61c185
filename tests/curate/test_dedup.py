"""Near-duplicate groups (curate.dedup, ``ldmclip dedup``): planted pairs and chains in random vectors, exact
and approximate search, the kept member, the embedding-folder contract, and planted copies of real photos."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ldmclip.curate.embed import embed_store

from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.curate.dedup import LOW_RECALL, dedup_folder, find_near_duplicates

pytest.importorskip("faiss")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

THRESHOLD = 0.95


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def keys_of(n: int) -> list[str]:
    return [f"{i:05d}" for i in range(n)]


def planted_vectors(n: int = 300, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Random unit vectors (in 32 dimensions the closest of 300 are far below 0.95) with two planted pairs and
    a chain 100~101~102 whose ends are below the threshold (cos 2θ = 0.88) but join through the middle."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, dim)))
    for a, b in ((10, 11), (20, 21)):
        x[b] = unit(x[a] + 0.05 * rng.standard_normal(dim))
    u = x[100]
    w = rng.standard_normal(dim)
    w = unit(w - (w @ u) * u)  # a direction orthogonal to u
    cos = 0.97
    x[101] = cos * u + np.sqrt(1 - cos**2) * w
    x[102] = np.cos(2 * np.arccos(cos)) * u + np.sin(2 * np.arccos(cos)) * w
    return x, {(10, 11), (20, 21), (100, 101), (101, 102)}


def test_exact_search_finds_exactly_the_planted_pairs_and_the_chain():
    x, planted = planted_vectors()
    assert x[100] @ x[102] < THRESHOLD < x[100] @ x[101]
    result = find_near_duplicates(x, THRESHOLD, keys=keys_of(len(x)))
    assert result.method == "exact" and result.recall is None
    assert {tuple(p) for p in result.pairs.tolist()} == planted
    groups = {}
    for row, group in enumerate(result.group.tolist()):
        groups.setdefault(group, set()).add(row)
    multi = sorted(sorted(members) for members in groups.values() if len(members) > 1)
    assert multi == [[10, 11], [20, 21], [100, 101, 102]]
    assert result.groups == 3 and result.not_kept == 4
    assert result.group_size[[10, 20, 100, 0]].tolist() == [2, 2, 3, 1]
    assert len(groups) == len(x) - 4
    # Group ids are numbered in the order of each group's smallest key (here the row order).
    assert result.group.tolist() == sorted(result.group.tolist())


def test_the_kept_member_is_the_top_score_then_the_smallest_key():
    x, _ = planted_vectors()
    keys = keys_of(len(x))
    keys[10], keys[11] = "zz", "aa"             # a tie: the later row has the smaller key
    scores = np.zeros(len(x))
    scores[[20, 21]] = [0.1, 0.3]                 # the second of the pair scores higher
    scores[[100, 101, 102]] = [0.2, 0.2, 0.5]     # the chain's end is kept
    scores[5] = np.nan                            # NaN: a singleton is kept all the same
    result = find_near_duplicates(x, THRESHOLD, keys=keys, scores=scores)
    kept = {row for row in (10, 11, 20, 21, 100, 101, 102) if result.keep[row]}
    assert kept == {11, 21, 102}
    assert result.keep[5] and result.keep.sum() == len(x) - 4


def test_groups_do_not_depend_on_the_row_order():
    x, _ = planted_vectors()
    keys = keys_of(len(x))
    scores = np.random.default_rng(1).random(len(x))
    scores[[10, 11]] = 0.5  # a tie, broken by key whatever the order
    reference = find_near_duplicates(x, THRESHOLD, keys=keys, scores=scores)
    order = np.random.default_rng(2).permutation(len(x))
    permuted = find_near_duplicates(x[order], THRESHOLD, keys=[keys[i] for i in order], scores=scores[order])
    back = np.argsort(order)
    assert np.array_equal(permuted.group[back], reference.group)
    assert np.array_equal(permuted.keep[back], reference.keep)
    assert np.array_equal(permuted.group_size[back], reference.group_size)


def _hand_recall(x: np.ndarray, found: np.ndarray, sample: np.ndarray, threshold: float) -> float:
    """Of the (sampled query, other row) pairs with cosine >= threshold, the fraction among the found pairs."""
    cosine = x[sample].astype(np.float64) @ x.astype(np.float64).T
    links = {tuple(p) for p in found.tolist()}
    truth = [(int(q), int(j)) for qi, q in enumerate(sample) for j in np.flatnonzero(cosine[qi] >= threshold) if j != q]
    assert truth, "the sample must hold near-duplicates for the recall to mean something"
    return sum((min(q, j), max(q, j)) in links for q, j in truth) / len(truth)


def _many_pairs(n: int = 2000, pairs: int = 150, dim: int = 32, noise: float = 0.05) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((n, dim)))
    planted = set()
    for a in range(0, 2 * pairs, 2):
        x[a + 1] = unit(x[a] + noise * rng.standard_normal(dim))
        planted.add((a, a + 1))
    return x.astype(np.float32), planted


def test_approximate_search_finds_the_planted_pairs_and_measures_its_recall():
    x, planted = _many_pairs()
    result = find_near_duplicates(x, 0.9, keys=keys_of(len(x)), exact_limit=100, recall_queries=500)
    assert result.method == "approximate"
    assert {tuple(p) for p in result.pairs.tolist()} == planted
    assert len(result.recall_queries) == 500 and result.recall_pairs > 0
    assert result.recall == pytest.approx(_hand_recall(x, result.pairs, result.recall_queries, 0.9)) == 1.0


def test_a_low_recall_is_measured_as_counted_by_hand_and_warned_about():
    # In 16 dimensions one probed cluster of 51 misses about a tenth of the pairs (split across two clusters).
    x, _ = _many_pairs(dim=16, noise=0.07)
    exact = {tuple(p) for p in find_near_duplicates(x, 0.9, keys=keys_of(len(x))).pairs.tolist()}
    with pytest.warns(UserWarning, match="recall"):
        result = find_near_duplicates(x, 0.9, keys=keys_of(len(x)), exact_limit=100, nprobe=1, recall_queries=1000)
    found = {tuple(p) for p in result.pairs.tolist()}
    assert found < exact
    assert 0 < result.recall < LOW_RECALL
    assert result.recall == pytest.approx(_hand_recall(x, result.pairs, result.recall_queries, 0.9))
    assert "low" in result.note


def test_bad_threshold_and_missing_faiss_are_one_line_errors(monkeypatch):
    x, _ = planted_vectors()
    with pytest.raises(UserError, match="cosine similarity"):
        find_near_duplicates(x, 1.5, keys=keys_of(len(x)))
    with pytest.raises(UserError, match="one key per row"):
        find_near_duplicates(x, THRESHOLD, keys=["a"])
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed: import faiss raises ImportError
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        find_near_duplicates(x, THRESHOLD, keys=keys_of(len(x)))


# ----------------------------------------------------------------------------------------------------
# The embedding folder (the layout `ldmclip embed` writes)


def write_embedding_folder(path: Path, shards: dict[str, tuple[np.ndarray, list[str], dict[str, np.ndarray]]]) -> Path:
    """The files of an ``ldmclip embed`` output folder: per shard NAME, img_emb/text_emb .npy (float16) and a
    metadata parquet with key, caption, clip_score, width, height, shard and any extra columns."""
    (path / "img_emb").mkdir(parents=True)
    (path / "text_emb").mkdir()
    (path / "metadata").mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": "ldmclip-embeddings"}))
    for name, (embeddings, keys, extra) in shards.items():
        np.save(path / "img_emb" / f"img_emb_{name}.npy", embeddings.astype(np.float16))
        np.save(path / "text_emb" / f"text_emb_{name}.npy", embeddings.astype(np.float16))
        n = len(keys)
        columns = {"key": pa.array(keys, pa.string()), "caption": pa.array(["a photo"] * n, pa.string()),
                   "clip_score": pa.array(np.full(n, 0.3, np.float32)), "width": pa.array(np.full(n, 64, np.int32)),
                   "height": pa.array(np.full(n, 64, np.int32)), "shard": pa.array([name] * n, pa.string())}
        columns.update({column: pa.array(values.astype(np.float32)) for column, values in extra.items()})
        pq.write_table(pa.table(columns), path / "metadata" / f"metadata_{name}.parquet")
        embed_store(path).write_chunk(name, {}, {"counts": {"embedded": n}})  # the shard's done marker, last
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    x, _ = planted_vectors()
    keys = keys_of(len(x))
    aesthetic = np.zeros(len(x))
    aesthetic[[10, 11]] = [1.0, 2.0]
    # Two shards, split inside the chain 100~101~102 so that a group spans shards.
    return write_embedding_folder(tmp_path / "emb", {"00000": (x[:101], keys[:101], {"aesthetic": aesthetic[:101]}),
                                                     "00001": (x[101:], keys[101:], {"aesthetic": aesthetic[101:]})})


def test_dedup_folder_writes_the_groups_and_a_rerun_gives_the_same_bytes(folder):
    result = dedup_folder(folder, THRESHOLD, keep_by="aesthetic")
    table = pq.read_table(folder / "dedup" / "dedup.parquet")
    assert table.column_names == ["key", "dup_group", "dup_group_size", "dup_keep"]
    assert [str(t) for t in table.schema.types] == ["string", "int64", "int32", "bool"]
    assert table.column("key").to_pylist() == keys_of(300)
    keep = dict(zip(table.column("key").to_pylist(), table.column("dup_keep").to_pylist()))
    assert (keep["00010"], keep["00011"]) == (False, True)  # the higher aesthetic score
    assert table.column("dup_group_size").to_pylist()[100:103] == [3, 3, 3]
    summary = json.loads((folder / "dedup" / "summary.json").read_text())
    assert summary["threshold"] == THRESHOLD and summary["method"] == "exact" and summary["recall"] is None
    assert (summary["groups"], summary["not_kept"], summary["keep_by"]) == (3, 4, "aesthetic") == \
        (result.groups, result.not_kept, "aesthetic")
    before = {name: (folder / "dedup" / name).read_bytes() for name in ("dedup.parquet", "summary.json")}
    dedup_folder(folder, THRESHOLD, keep_by="aesthetic")
    assert {name: (folder / "dedup" / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (folder / "dedup").iterdir()) == ["dedup.parquet", "summary.json"]  # no temporaries


def test_dedup_folder_refuses_what_is_not_an_embedding_folder(tmp_path, folder):
    with pytest.raises(UserError, match="not an embedding folder"):
        dedup_folder(tmp_path / "missing", THRESHOLD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an embedding folder"):
        dedup_folder(tmp_path / "empty", THRESHOLD)
    with pytest.raises(UserError, match="not a numeric metadata column; the numeric columns are clip_score, width"):
        dedup_folder(folder, THRESHOLD, keep_by="caption")
    (folder / "manifest.json").write_text(json.dumps({"format": "ldmclip-search-index"}))
    with pytest.raises(UserError, match="format 'ldmclip-search-index'"):
        dedup_folder(folder, THRESHOLD)


def test_dedup_folder_refuses_shards_whose_rows_do_not_line_up(folder):
    np.save(folder / "img_emb" / "img_emb_00001.npy", np.zeros((5, 32), np.float16))
    with pytest.raises(UserError, match="shard 00001: 5 embeddings but 199 metadata rows"):
        dedup_folder(folder, THRESHOLD)
    (folder / "metadata" / "metadata_00001.parquet").unlink()
    with pytest.raises(UserError, match="embeddings without metadata"):
        dedup_folder(folder, THRESHOLD)


def test_cli_writes_the_files_and_prints_a_summary(folder, capsys):
    assert main(["dedup", str(folder), "--threshold", str(THRESHOLD), "--quiet", "--json", "-"]) == 0
    out = capsys.readouterr().out
    assert "3 group(s) of near-duplicates among 300 samples" in out and "4 sample(s) not kept" in out
    assert "exact search" in out
    assert json.loads(out[out.index("{"):])["not_kept"] == 4
    assert (folder / "dedup" / "dedup.parquet").is_file() and (folder / "dedup" / "summary.json").is_file()


def test_cli_approximate_search_prints_its_recall(folder, capsys):
    assert main(["dedup", str(folder), "--threshold", str(THRESHOLD), "--exact-limit", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "approximate search (FAISS IVF-Flat" in out and "recall 1.000" in out


def test_cli_on_a_folder_that_is_not_an_embedding_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["dedup", str(tmp_path / "photos"), "--threshold", "0.95"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ldmclip dedup: error:") and "not an embedding folder" in error and "\n" not in error


# ----------------------------------------------------------------------------------------------------
# Real photos


def _jpeg_again(image, quality: int):
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_flickr8k_planted_copies_are_found_and_nothing_else(flickr8k, tmp_path):
    """300 Flickr8k test photos and 10 planted copies under new keys (9 re-encoded as JPEG at quality 30-90,
    one resized to 160×160), embedded by a random-init ViT-T-8-64 image tower.

    Why this model and threshold: random-init towers map all photos close together (a shared mean
    direction), but a ViT still tells photos apart at a fine scale. Measured on these images: the closest
    distinct photo of each photo has cosine at most 0.9977 (median 0.991), a planted copy at least 0.99987
    from its original, so 1 - cosine differs by a factor of about 17 and 0.9995 lies well between (float16
    storage moves cosines by ~1e-5). ViT-Tiny-64 separates less (0.9982 vs 0.99986) and a tiny random-init
    ResNet not at all (every cosine rounds to 1.0). The test checks that gap first, so it fails loudly
    rather than passing by luck if the model's initialisation changes."""
    import torch
    from PIL import Image

    import ldmclip

    names = sorted((flickr8k / "test.txt").read_text().split())[:300]
    images = [Image.open(flickr8k / "images" / name).convert("RGB") for name in names]
    keys = [Path(name).stem for name in names]
    sources = list(range(0, 300, 30))
    for copy, source in enumerate(sources):
        resized = copy == len(sources) - 1
        images.append(images[source].resize((160, 160), Image.BICUBIC) if resized
                      else _jpeg_again(images[source], (30, 50, 70, 90)[copy % 4]))
        keys.append(f"copy{copy:02d}")
    torch.manual_seed(0)
    model, _, preprocess = ldmclip.create_model_and_transforms("ViT-T-8-64")
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model.encode_image(torch.stack([preprocess(im) for im in images[i:i + 64]]),
                                                   normalize=True) for i in range(0, len(images), 64)]).numpy()
    threshold = 0.9995
    cosine = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    np.fill_diagonal(cosine, -1)
    distinct_max = cosine[:300, :300].max(axis=1)
    planted_min = min(cosine[300 + copy, source] for copy, source in enumerate(sources))
    print(f"max cosine between distinct photos: max {distinct_max.max():.5f}, median {np.median(distinct_max):.5f}; "
          f"planted pairs: min {planted_min:.5f}")
    assert distinct_max.max() < threshold - 2e-4 and planted_min > threshold + 1e-4

    half = len(keys) // 2  # two shards, the copies in the second
    folder = write_embedding_folder(tmp_path / "emb", {"a": (embeddings[:half], keys[:half], {}),
                                                       "b": (embeddings[half:], keys[half:], {})})
    result = dedup_folder(folder, threshold)
    table = pq.read_table(folder / "dedup" / "dedup.parquet").to_pydict()
    groups: dict[int, set[str]] = {}
    for key, group in zip(table["key"], table["dup_group"]):
        groups.setdefault(group, set()).add(key)
    found = sorted(sorted(members) for members in groups.values() if len(members) > 1)
    expected = sorted(sorted({keys[source], f"copy{copy:02d}"}) for copy, source in enumerate(sources))
    assert found == expected
    assert result.not_kept == 10 and result.groups == 10


def test_embed_reuses_the_options_as_dedup_threshold(folder, capsys):
    """``ldmclip embed --dedup THRESHOLD`` adds the same options under its own flag and calls run_dedup."""
    import argparse

    from ldmclip.cli.dedup import add_dedup_options, run_dedup

    parser = argparse.ArgumentParser()
    parser.add_argument("--quiet", action="store_true")
    add_dedup_options(parser, threshold_flag="--dedup", required=False)
    assert parser.parse_args([]).dedup_threshold is None  # embed without --dedup: no dedup step
    args = parser.parse_args(["--dedup", str(THRESHOLD), "--keep-by", "aesthetic", "--quiet"])
    summary = run_dedup(args, folder, command="embed")
    assert summary["not_kept"] == 4 and summary["keep_by"] == "aesthetic"
    assert capsys.readouterr().out.startswith("ldmclip embed: 3 group(s)")
