"""The resumable store (ldmclip.data.store): chunks with their metadata, the manifest, refusing damaged,
foreign or unrelated folders, cleaning a killed run's temporaries and the "same setup or refuse" check."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ldmclip.core.errors import UserError
from ldmclip.core.files import temp_name
from ldmclip.data.store import ChunkStore, StoreError, StoreMismatchError, differing_fields


class _MyError(UserError):
    pass


def _store(path, **kw) -> ChunkStore:
    return ChunkStore(path, "test-store", "parts", ".safetensors", kind="test store", **kw)


def _raw_meta(path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["ldmclip"]


def test_chunks_round_trip_and_only_finished_ones_are_listed(tmp_path):
    store = _store(tmp_path / "s")
    store.create()
    x = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    path = store.write_chunk("b", {"x": x}, {"keys": ["k1", "k2"], "n": 2})
    store.write_chunk("a", {"x": x[:1]}, {"keys": ["k0"], "n": 1})
    assert path == tmp_path / "s" / "parts" / "b.safetensors"
    temp_name(store.chunk_path("c")).write_bytes(b"half a chunk")  # what a SIGKILL leaves
    (store.chunks / "notes.txt").write_text("not a chunk")
    assert store.chunk_names() == ["a", "b"]
    meta, tensors = store.read_chunk("b")
    assert meta == {"keys": ["k1", "k2"], "n": 2} and torch.equal(tensors["x"], x)
    assert store.read_chunk_meta(store.chunk_path("a")) == {"keys": ["k0"], "n": 1}


def test_canonical_json_is_sorted_and_compact_the_other_keeps_order_and_text(tmp_path):
    canonical, plain = _store(tmp_path / "c"), _store(tmp_path / "p", canonical=False)
    meta = {"z": "é", "a": [1, 2]}
    for store in (canonical, plain):
        store.write_chunk("0", {"x": torch.zeros(1)}, meta)
        store.write_manifest({"format": "test-store", "z": "é", "a": 1})
    assert _raw_meta(canonical.chunk_path("0")) == '{"a":[1,2],"z":"\\u00e9"}'
    assert _raw_meta(plain.chunk_path("0")) == '{"z": "é", "a": [1, 2]}'
    manifest = canonical.manifest_path.read_text(encoding="utf-8")
    assert manifest == '{\n "a": 1,\n "format": "test-store",\n "z": "é"\n}\n'
    assert list(json.loads(plain.manifest_path.read_text(encoding="utf-8"))) == ["format", "z", "a"]


def test_manifest_missing_damaged_or_of_another_kind(tmp_path):
    store = _store(tmp_path, error=_MyError)
    assert store.read_manifest() is None
    assert _store(tmp_path / "missing").read_manifest() is None
    store.manifest_path.write_text("{not json")
    with pytest.raises(_MyError, match="damaged .not valid JSON"):
        store.read_manifest()
    store.manifest_path.write_text("[1, 2]")
    with pytest.raises(_MyError, match="not a JSON object"):
        store.read_manifest()
    store.manifest_path.write_text(json.dumps({"format": "another-format"}))
    with pytest.raises(_MyError, match="is not an ldmclip test store .manifest format 'another-format'"):
        store.read_manifest()
    store.write_manifest({"format": "test-store", "n": 1})
    assert store.read_manifest() == {"format": "test-store", "n": 1}


def test_unrelated_folders_are_refused_what_a_killed_first_run_leaves_is_not(tmp_path):
    store = _store(tmp_path / "s")
    store.check_unrelated()  # does not exist yet
    store.create()
    (store.path / ".manifest.json.tmp").write_text("{")  # killed before the first manifest was renamed
    temp_name(store.chunk_path("0")).write_bytes(b"")
    store.check_unrelated()
    (store.path / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match=r"not empty and holds no manifest.json.*thesis.tex"):
        store.check_unrelated()
    (store.path / "thesis.tex").unlink()
    store.write_chunk("0", {"x": torch.zeros(1)}, {})  # chunks without a manifest: not ours to add to
    with pytest.raises(StoreError, match="parts"):
        store.check_unrelated()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is not a folder"):
        _store(tmp_path / "file").check_unrelated()


def test_create_removes_only_temporaries(tmp_path):
    store = _store(tmp_path / "s")
    store.create()
    store.write_chunk("0", {"x": torch.zeros(1)}, {})
    leftovers = [temp_name(store.manifest_path), temp_name(store.chunk_path("1"))]
    for p in leftovers:
        p.write_bytes(b"partial")
    (store.path / ".keep").write_text("a user's hidden file")
    store.create()
    assert not any(p.exists() for p in leftovers)
    assert (store.path / ".keep").exists() and store.chunk_names() == ["0"]


def test_damaged_chunks_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    store = _store(tmp_path, error=_MyError)
    store.create()
    store.chunk_path("bad").write_bytes(b"garbage")
    with pytest.raises(_MyError, match=r"chunk .*bad.safetensors of the store is missing or damaged"):
        store.read_chunk_meta("bad")
    with pytest.raises(_MyError, match="missing or damaged"):
        store.read_chunk("absent")
    save_file({"x": torch.zeros(1)}, str(store.chunk_path("foreign")))  # a safetensors file, not ours
    with pytest.raises(_MyError, match="no 'ldmclip' metadata"):
        store.read_chunk_meta("foreign")


def test_same_setup_or_refuse_names_what_differs(tmp_path):
    store = _store(tmp_path / "s", mismatch=_MyError)
    made = {"dtype": "fp16", "shape": [77, 768], "identity": {"model": "A", "sha256": "1", "layer": -2}}
    store.check_same(made, {**made, "shape": (77, 768), "ignored": 1}, ["dtype", "shape", "identity"])
    wanted = {**made, "dtype": "bf16", "identity": {**made["identity"], "sha256": "2", "layer": -1}}
    assert differing_fields(made, wanted, ["dtype", "shape", "identity"]) == ["dtype", "identity"]
    with pytest.raises(_MyError) as caught:
        store.check_same(made, wanted, ["dtype", "shape", "identity"], contents="embeddings")
    message = str(caught.value)
    assert "dtype: store has 'fp16', this run 'bf16'" in message
    assert "identity (layer, sha256 differ)" in message and "shape" not in message
    assert message.startswith(f"{tmp_path / 's'} holds embeddings made with another setup")
    # the default classes are user errors: the command line prints them as one line
    with pytest.raises(StoreMismatchError) as default:
        _store(tmp_path).check_same({"a": 1}, {"a": None}, ["a"])
    assert isinstance(default.value, UserError) and isinstance(default.value, StoreError)
