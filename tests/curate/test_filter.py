"""ldmclip filter: exactly the selected keys, in order, every member byte-identical; resumable after a kill;
bad input refused or counted; train and cache-text read the new shards.

The scores folder is written here in the layout of ``ldmclip embed`` (random embeddings, chosen scores)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldmclip.curate.embed import embed_store

from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.curate.filter import filter_shards
from ldmclip.data.synthetic import SyntheticScenes
from ldmclip.data.writer import write_shards

N = 26  # samples in the packed shards (3 shards of 10, 10, 6), + 3 in the odd shard


def _members(path):
    """Every member of a tar file: (name, bytes), in stored order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def _jpeg(image):
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    scenes = SyntheticScenes(image_size=32, length=N + 3)
    items = [(i, _jpeg(scenes[i][0]), scenes[i][1], {"row": i, "note": "ünïcode"}) for i in range(N)]
    write_shards(items, root / "in", max_per_shard=10)
    # A shard of another writer: members in no sorted order, an upper-case and a two-dot suffix.
    odd = root / "in" / "shard-00003.tar"
    with tarfile.open(odd, "w") as tar:
        for i in range(N, N + 3):
            for suffix, data in [("txt", scenes[i][1].encode()), ("jpg", _jpeg(scenes[i][0])),
                                 ("seg.png", bytes([i]) * 7), ("JSON", b'{"odd": true}')]:
                info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = sorted((root / "in").glob("shard-*.tar"))
    rng = np.random.default_rng(1)
    keys = [f"{i:09d}" for i in range(N + 3)]
    clip = rng.uniform(0.1, 0.4, N + 3).astype(np.float32)
    aesthetic = rng.uniform(2, 8, N + 3).astype(np.float32)
    clip[[N, N + 2]], aesthetic[[N, N + 2]] = 0.3, 6  # the odd shard's scored samples are kept
    missing = {keys[4], keys[N + 1]}  # not scored: e.g. unreadable at embed time
    _write_scores(root / "scores", shards, keys, clip, aesthetic, missing)
    return {"root": root, "shards": [str(p) for p in shards], "keys": keys, "clip": clip, "aesthetic": aesthetic,
            "missing": missing, "scores": root / "scores"}


def _write_scores(scores, shards, keys, clip, aesthetic, missing, dedup=None):
    (scores / "metadata").mkdir(parents=True)
    (scores / "img_emb").mkdir()
    (scores / "manifest.json").write_text(json.dumps({"format": "ldmclip-embeddings"}))
    position = {k: i for i, k in enumerate(keys)}
    for shard in shards:
        name = Path(shard).stem
        rows = [position[m.split(".")[0]] for m, _ in _members(shard) if m.endswith(".txt")]
        rows = [r for r in rows if keys[r] not in missing]
        table = pa.table({"key": pa.array([keys[r] for r in rows]), "caption": pa.array(["c"] * len(rows)),
                          "clip_score": pa.array(clip[rows]), "width": pa.array([32] * len(rows), pa.int32()),
                          "height": pa.array([32] * len(rows), pa.int32()), "shard": pa.array([name] * len(rows)),
                          "aesthetic": pa.array(aesthetic[rows])})
        pq.write_table(table, scores / "metadata" / f"metadata_{name}.parquet")
        np.save(scores / "img_emb" / f"img_emb_{name}.npy", np.random.default_rng(0).normal(size=(len(rows), 8)))
        embed_store(scores).write_chunk(name, {}, {"counts": {"embedded": len(rows)}})  # the done marker, last
    if dedup is not None:
        (scores / "dedup").mkdir()
        pq.write_table(pa.table(dedup), scores / "dedup" / "dedup.parquet")


def _expected(data, kept_keys):
    """The input members of ``kept_keys`` in input order."""
    members = []
    for shard in data["shards"]:
        members += [(n, b) for n, b in _members(shard) if n.split(".")[0] in kept_keys]
    return members


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


WHERE = "clip_score >= 0.2 and aesthetic > 3"


def _selected(data):
    keys = data["keys"]
    return [k for i, k in enumerate(keys) if k not in data["missing"] and data["clip"][i] >= np.float32(0.2)
            and data["aesthetic"][i] > 3]


def test_keeps_exactly_the_selected_keys_in_order_with_every_member_byte_identical(data, tmp_path):
    out = tmp_path / "out"
    report = filter_shards(data["shards"], data["scores"], WHERE, out, shard_size=4)
    selected = _selected(data)
    assert 8 < len(selected) < N - 3  # the expression keeps some and drops some
    outputs = sorted(out.glob("*.tar"))
    assert [p.name for p in outputs] == [f"{k:05d}.tar" for k in range((len(selected) + 3) // 4)]
    got = [m for p in outputs for m in _members(p)]
    assert got == _expected(data, set(selected))  # names, bytes and order (the odd shard's too)
    assert any(n.endswith(".seg.png") for n, _ in got) and any(n.endswith(".JSON") for n, _ in got)
    assert any(n.endswith(".json") for n, _ in got)
    per_shard = [[n.split(".")[0] for n, _ in _members(p) if n.endswith((".txt"))] for p in outputs]
    assert [k for keys in per_shard for k in keys] == selected and all(len(k) == 4 for k in per_shard[:-1])
    assert json.loads((out / "sizes.json").read_text()) == {p.name: len(k) for p, k in zip(outputs, per_shard)}

    decisions = pq.read_table(out / "decisions.parquet").to_pylist()
    assert [d["key"] for d in decisions] == data["keys"]
    by_key = {d["key"]: d for d in decisions}
    for i, key in enumerate(data["keys"]):
        d = by_key[key]
        assert d["kept"] == (key in selected)
        if key in data["missing"]:
            assert d["reason"] == "not_scored"
        elif not d["kept"]:
            failed = [c for c, ok in [("clip_score >= 0.2", data["clip"][i] >= np.float32(0.2)),
                                      ("aesthetic > 3", data["aesthetic"][i] > 3)] if not ok]
            assert d["reason"] == "; ".join(failed)
        else:
            assert d["reason"] == "" and d["out_shard"] == f"{selected.index(key) // 4:05d}.tar"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == report.summary
    assert summary["kept"] == len(selected) and summary["dropped"] == N + 3 - len(selected)
    assert summary["dropped_by_reason"]["not_scored"] == 2 and summary["where"] == WHERE
    assert sum(summary["dropped_by_reason"].values()) == summary["dropped"]
    assert (out / "histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dedup_columns_are_joined_on_key(data, tmp_path):
    keys = [k for k in data["keys"] if k not in data["missing"]]
    keep = [i % 3 != 0 for i in range(len(keys))]
    scores = tmp_path / "scores"
    _write_scores(scores, data["shards"], data["keys"], data["clip"], data["aesthetic"], data["missing"],
                  dedup={"key": keys[::-1], "dup_group": list(range(len(keys))), "dup_group_size":
                         pa.array([1] * len(keys), pa.int32()), "dup_keep": keep[::-1]})
    filter_shards(data["shards"], scores, "dup_keep", tmp_path / "out", shard_size=100)
    kept = [n.split(".")[0] for n, _ in _members(tmp_path / "out" / "00000.tar") if n.endswith(".txt")]
    assert kept == [k for k, ok in zip(keys, keep) if ok]


def test_an_interrupted_run_resumes_to_the_same_bytes_and_another_where_is_refused(data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    filter_shards(data["shards"], data["scores"], WHERE, reference, shard_size=3)

    class Stop(Exception):
        pass

    def stop_after_two(name):
        if name == "00001.tar":
            raise Stop

    with pytest.raises(Stop):
        filter_shards(data["shards"], data["scores"], WHERE, out, shard_size=3, on_shard=stop_after_two)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    before = (out / "00000.tar").stat().st_mtime_ns
    report = filter_shards(data["shards"], data["scores"], WHERE, out, shard_size=3)
    assert report.resumed == ["00000.tar", "00001.tar"] and "00000.tar" not in report.written
    assert (out / "00000.tar").stat().st_mtime_ns == before
    assert _files(out) == _files(reference)

    with pytest.raises(UserError, match=r"another setup \(where: .*'clip_score >= 0.3'"):
        filter_shards(data["shards"], data["scores"], "clip_score >= 0.3", out, shard_size=3)
    with pytest.raises(UserError, match="shard_size"):
        filter_shards(data["shards"], data["scores"], WHERE, out, shard_size=5)
    assert _files(out) == _files(reference)  # nothing touched


KILLER = """
import os, signal, sys, tarfile
calls = [0]
add = tarfile.TarFile.addfile
def addfile(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of an output shard
    return add(self, *args, **kwargs)
tarfile.TarFile.addfile = addfile
from ldmclip.curate.filter import filter_shards
filter_shards(sys.argv[2].split(","), sys.argv[3], sys.argv[4], sys.argv[5], shard_size=3)
"""


def test_kill_9_in_the_middle_of_a_shard_then_rerun_gives_the_same_bytes(data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    filter_shards(data["shards"], data["scores"], WHERE, reference, shard_size=3)
    kill_at = int(np.random.default_rng().integers(2, 3 * 3 * 2))  # a member of one of the first shards
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(kill_at), ",".join(data["shards"]),
                             str(data["scores"]), WHERE, str(out)], env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # a half-written shard, hidden
    assert not (out / "summary.json").exists()
    filter_shards(data["shards"], data["scores"], WHERE, out, shard_size=3)
    assert _files(out) == _files(reference) and not any(p.name.startswith(".") for p in out.iterdir())


def test_out_inside_the_inputs_or_the_scores_is_refused_before_any_work(data, tmp_path):
    inside = Path(data["shards"][0]).parent / "kept"
    for out in (inside, Path(data["shards"][0]).parent, data["scores"] / "sub"):
        with pytest.raises(UserError, match="--out .* is inside"):
            filter_shards(data["shards"], data["scores"], WHERE, out)
        assert not inside.exists() and not (data["scores"] / "sub").exists()


def test_a_truncated_input_shard_keeps_the_complete_samples_before_the_cut(data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shards = []
    for shard in data["shards"]:
        shards.append(str(folder / Path(shard).name))
        Path(shards[-1]).write_bytes(Path(shard).read_bytes())
    cut = Path(shards[1])
    names = [n for n, _ in _members(cut)]
    with tarfile.open(cut) as tar:  # cut inside the image of the 5th sample of shard 1
        fifth = next(m for m in tar.getmembers() if m.name == names[12])
    cut.write_bytes(cut.read_bytes()[:fifth.offset_data + 100])
    out = tmp_path / "out"
    report = filter_shards(shards, data["scores"], "clip_score > 0", out, shard_size=100)
    cut_key = names[12].split(".")[0]
    before_cut = {n.split(".")[0] for n in names[:12]}
    handled = [k for k in data["keys"] if k not in data["missing"]
               and (k not in {n.split(".")[0] for n in names} or k in before_cut)]
    got = _members(out / "00000.tar")
    assert got == _expected(data, set(handled))
    assert "truncated" in report.summary["shard_problems"][shards[1]]
    assert report.summary["skipped"] == {"truncated_shard": 1}
    assert report.summary["dropped_by_reason"]["truncated_shard"] == 1
    decision = [d for d in pq.read_table(out / "decisions.parquet").to_pylist() if d["key"] == cut_key]
    assert decision == [{"key": cut_key, "shard": shards[1], "kept": False, "reason": "truncated_shard",
                         "out_shard": None}]


def test_cli_unknown_column_is_one_line_naming_the_columns(data, tmp_path, capsys):
    code = main(["filter", *data["shards"], "--scores", str(data["scores"]), "--where", "aesthetics >= 5",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown column 'aesthetics'" in err and "aesthetic (number)" in err
    assert not (tmp_path / "out").exists()


def test_cli_writes_shards_that_train_and_cache_text_read(data, tmp_path, capsys):
    from ldmclip.conditioning.cache_reader import TextEmbeddingCache

    out = tmp_path / "kept"
    assert main(["filter", *data["shards"], "--scores", str(data["scores"]), "--where", WHERE, "--out", str(out),
                 "--shard-size", "8", "--quiet", "--json", str(tmp_path / "summary.json")]) == 0
    printed = capsys.readouterr().out
    selected = _selected(data)
    assert f"kept {len(selected)} of {N + 3} samples" in printed and "dropped 2: not_scored" in printed
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == len(selected)
    last = len(sorted(out.glob("*.tar"))) - 1
    assert last >= 1
    pattern = str(out / f"{{00000..{last:05d}}}.tar")

    assert main(["cache-text", pattern, "--out", str(tmp_path / "cache"), "--preset", "sd2", "--model", "ViT-T-8-64",
                 "--random-init", "--precision", "fp32", "--quiet"]) == 0
    assert sorted(TextEmbeddingCache(tmp_path / "cache")) == sorted(selected)

    run = tmp_path / "run"
    assert main(["train", "--model", "ViT-T-8-64", "--data", pattern, "--out", str(run), "--steps", "2",
                 "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    assert (run / "metrics.jsonl").is_file()
