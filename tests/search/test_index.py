"""Building an index: embeddings, resuming, updating, unreadable files, refusing another model."""

from __future__ import annotations

import json

import pytest
import torch

from ldmclip.cli import main
from ldmclip.core.formats import name_to_text
from ldmclip.search import IndexMismatchError, SearchEngine, SearchIndex, SearchIndexError, find_images, model_identity

from .conftest import add_odd_names, add_unreadable, build, load, make_images


def test_index_holds_unit_embeddings_of_every_readable_image(built_index, model_name):
    index = SearchIndex.load(built_index)
    assert index.paths == ["blue/0.png", "blue/1.jpg", "green/0.png", "green/1.png", "red/0.png", "red/1.png",
                           "yellow/0.png", "yellow/1.png"]
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(8), atol=1e-5)
    # Each stored row is the model's embedding of that file (computed here image by image).
    model, transform = load(model_name)
    from PIL import Image
    with torch.no_grad():
        expected = model.encode_image(transform(Image.open(index.root / "green/1.png")).unsqueeze(0), normalize=True)
    assert torch.allclose(index.embeddings[3], expected[0], atol=1e-4)
    manifest = json.loads((built_index / "manifest.json").read_text())
    assert manifest["complete"] and manifest["files"] == 10 and manifest["images"] == 8
    assert manifest["skipped"] == {"empty_file": 1, "not_an_image": 1}
    assert manifest["model"]["sha256"] and manifest["model"]["config"]["embed_dim"] == 64


def test_rerun_keeps_finished_chunks_and_updates_changed_ones(tmp_path, model_name):
    images = make_images(tmp_path / "images")
    first = build(model_name, images, tmp_path / "index", chunk_size=3)
    assert (first.chunks, first.chunks_reused, first.images) == (3, 0, 8)
    again = build(model_name, images, tmp_path / "index", chunk_size=3)
    assert (again.chunks_reused, again.images) == (3, 8)
    # A new file that sorts last lands in the last chunk: only that chunk is redone.
    make_images(tmp_path / "more", per_colour=1)
    (tmp_path / "more" / "yellow" / "0.png").rename(images / "yellow" / "2.png")
    added = build(model_name, images, tmp_path / "index", chunk_size=3)
    assert (added.chunks_reused, added.images) == (2, 9)
    # A changed file (new size / time) has its chunk redone; a removed one shifts the chunks after it.
    (images / "green" / "1.png").write_bytes((images / "red" / "0.png").read_bytes())
    (images / "yellow" / "1.png").unlink()
    updated = build(model_name, images, tmp_path / "index", chunk_size=3)
    assert (updated.chunks_reused, updated.images) == (1, 8)
    index = SearchIndex.load(tmp_path / "index")
    assert "yellow/2.png" in index.paths and "yellow/1.png" not in index.paths
    assert torch.equal(index.embeddings[index.id_of("green/1.png")], index.embeddings[index.id_of("red/0.png")])
    assert len(list((tmp_path / "index" / "chunks").iterdir())) == updated.chunks


def test_interrupted_build_resumes_to_the_same_index(tmp_path, model_name):
    images = make_images(tmp_path / "images")
    reference = build(model_name, images, tmp_path / "reference", chunk_size=3)
    model, transform = load(model_name)
    calls = {"n": 0}

    def crash_on_fifth_image(image):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of the second chunk
        return transform(image)

    from ldmclip.search import build_index, model_identity
    with pytest.raises(KeyboardInterrupt):
        build_index(model, crash_on_fifth_image, images, tmp_path / "index", chunk_size=3, progress=False,
                    identity=model_identity(model, model_name, None))
    assert [p.name for p in (tmp_path / "index" / "chunks").iterdir()] == ["00000.safetensors"]
    with pytest.raises(SearchIndexError, match="not finished"):
        SearchIndex.load(tmp_path / "index")
    resumed = build(model_name, images, tmp_path / "index", chunk_size=3)
    assert resumed.chunks_reused == 1 and resumed.images == reference.images
    a, b = SearchIndex.load(tmp_path / "reference"), SearchIndex.load(tmp_path / "index")
    assert a.paths == b.paths and torch.equal(a.embeddings, b.embeddings)


def test_unreadable_files_are_skipped_and_counted_by_the_command(tmp_path, model_name, capsys):
    images = make_images(tmp_path / "images")
    add_unreadable(images)
    code = main(["index", str(images), "--model", model_name, "--out", str(tmp_path / "index"), "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "8 of 10 images indexed" in out
    assert "skipped 2 unreadable file(s): empty_file 1, not_an_image 1" in out and "broken.jpg: not_an_image" in out


def test_bad_inputs_are_clear_errors(tmp_path, model_name, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--model", model_name, "--out", str(tmp_path / "i")]) == 2
    assert "no image files under" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "nope"), "--model", model_name, "--out", str(tmp_path / "i")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    # Random weights would differ at search time: refused before anything is computed.
    images = make_images(tmp_path / "images")
    assert main(["index", str(images), "--model", "ViT-Tiny-64", "--out", str(tmp_path / "i")]) == 2
    assert "--pretrained is needed" in capsys.readouterr().err
    # --out must be a new folder or an index.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("precious")
    assert main(["index", str(images), "--model", model_name, "--out", str(tmp_path / "taken"), "--workers", "0"]) == 2
    assert "is not an ldmclip search index" in capsys.readouterr().err
    # Every file unreadable.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    assert main(["index", str(tmp_path / "junk"), "--model", model_name, "--out", str(tmp_path / "j"),
                 "--workers", "0"]) == 2
    assert "none of the 1 image files" in capsys.readouterr().err


def test_an_index_of_another_model_is_refused(tmp_path, model_name, other_model_name, built_index, capsys):
    images = make_images(tmp_path / "images")
    build(model_name, images, tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="built with another model"):
        build(other_model_name, images, tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="differs in: weights"):
        SearchEngine.open(built_index, other_model_name)
    assert main(["search", str(built_index), "a red disc", "--model", other_model_name]) == 2
    err = capsys.readouterr().err
    assert "built with another model" in err and "Traceback" not in err
    # Same model, another image folder: also refused (the ids would mean other files).
    with pytest.raises(IndexMismatchError, match="is an index of"):
        build(model_name, make_images(tmp_path / "others"), tmp_path / "index")


def test_find_images_is_recursive_sorted_and_skips_hidden_files(tmp_path):
    make_images(tmp_path / "images")
    (tmp_path / "images" / ".cache").mkdir()
    (tmp_path / "images" / ".cache" / "x.png").write_bytes(b"")
    (tmp_path / "images" / "UPPER.JPEG").write_bytes(b"")
    paths = [f.path for f in find_images(tmp_path / "images")]
    assert paths == sorted(paths) and "UPPER.JPEG" in paths and not any(".cache" in p for p in paths)
    assert len(paths) == 9


def test_damaged_or_missing_indexes_are_clear_errors(tmp_path, built_index):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        SearchIndex.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(SearchIndexError, match="damaged"):
        SearchIndex.load(tmp_path / "bad")
    import shutil
    copy = shutil.copytree(built_index, tmp_path / "copy")
    (copy / "chunks" / "00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(SearchIndexError, match="00001.safetensors of the index is missing or damaged"):
        SearchIndex.load(copy)


def test_model_weights_sha256_covers_both_towers():
    # The index's hash must change with the image tower too (the conditioner's weights_sha256 hashes the
    # text tower alone): an index is made of image embeddings.
    import ldmclip
    from ldmclip.search.index import model_weights_sha256

    torch.manual_seed(0)
    model = ldmclip.create_model("ViT-Tiny-64")
    before = model_weights_sha256(model)
    assert model_identity(model, "ViT-Tiny-64", None)["sha256"] == before
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] += 1.0
    changed_image = model_weights_sha256(model)
    with torch.no_grad():
        model.token_embedding.weight[0, 0] += 1.0
    assert len({before, changed_image, model_weights_sha256(model)}) == 3


def _folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_names_that_are_not_utf8_or_hold_a_newline_are_indexed_and_a_rerun_changes_nothing(tmp_path, model_name,
                                                                                            capsys):
    """A Latin-1 name once aborted every run (the chunk signature encoded it as UTF-8): now both odd names are
    indexed as good images, stored as text (``\\xNN``) that leads back to the file, and a rerun keeps it all."""
    images = make_images(tmp_path / "images")
    odd = add_odd_names(images)
    command = ["index", str(images), "--model", model_name, "--out", str(tmp_path / "index"), "--workers", "0",
               "--chunk-size", "4", "--dtype", "fp32"]
    assert main(command) == 0
    assert "10 of 10 images indexed" in capsys.readouterr().out
    first = _folder_bytes(tmp_path / "index")
    index = SearchIndex.load(tmp_path / "index")
    assert "red/caf\\xe9.png" in index.paths and "green/new\nline.png" in index.paths
    for name in odd:
        i = index.id_of(name_to_text(name))
        assert index.file(i) == images / name and index.file(i).read_bytes() == (images / name).read_bytes()
    assert main(command) == 0
    assert "3 chunk(s), 3 kept from an earlier run" in capsys.readouterr().out
    assert _folder_bytes(tmp_path / "index") == first


def test_links_to_folders_are_not_followed_and_a_dangling_link_is_counted(tmp_path, model_name):
    images = make_images(tmp_path / "images")
    (images / "red" / "uplink").symlink_to("..")
    (images / "gone.png").symlink_to("nowhere.png")
    result = build(model_name, images, tmp_path / "index")
    assert result.files == 9 and result.images == 8 and result.skipped == {"missing_file": 1}



def test_a_resnet_model_indexes_and_searches(tmp_path):
    """The search index runs on a ResNet image tower as on a ViT: ``ldmclip index`` with a ResNet
    model, each row its image's embedding, and ``SearchEngine.open`` loads and checks the ResNet."""
    from PIL import Image

    from ldmclip.models import CLIP, CLIPConfig
    from tests.models.test_resnet import TINY_RN, randomize

    torch.manual_seed(0)
    # randomised BatchNorm statistics and gains: a fresh ResNet starts every block as the identity
    name = f"local-dir:{randomize(CLIP(CLIPConfig.from_dict(TINY_RN))).save_pretrained(tmp_path / 'rn')}"
    images = make_images(tmp_path / "images")
    assert main(["index", str(images), "--model", name, "--out", str(tmp_path / "index"), "--workers", "0",
                 "--quiet"]) == 0
    engine = SearchEngine.open(tmp_path / "index")  # the index's model (a ResNet) is loaded and checked
    model, transform = load(name)
    assert engine.index.paths and all(p.endswith((".png", ".jpg")) for p in engine.index.paths)
    with torch.no_grad():
        for row, path in enumerate(engine.index.paths):
            expected = model.encode_image(transform(Image.open(images / path)).unsqueeze(0), normalize=True)
            assert torch.allclose(engine.index.embeddings[row], expected[0], atol=2e-3), path  # stored fp16
    hit = engine.search_image(str(images / "red/1.png"), k=1)[0]
    assert hit.score == pytest.approx(1.0, abs=1e-3)
