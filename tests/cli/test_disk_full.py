"""A full disk (a mocked ENOSPC in core.files' writes) ends `train`, `cache-text` and `index` with one line
"disk full writing PATH (N MB free)", exit status 2, and leaves no temporary and nothing recorded as done."""

from __future__ import annotations

import pytest
from PIL import Image

import ldmclip
from ldmclip.cli import main
from ldmclip.core.files import write_safetensors
from tests.core.disk_full import fill_disk

TINY = "ViT-T-8-64"


def _disk_full_line(capsys, command: str, path_part: str) -> str:
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # (cache-text says what it starts on stderr first)
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith(f"ldmclip {command}: error: disk full writing "), err
    assert path_part in last and last.endswith(" MB free)")
    return last


def _temporaries(root) -> list[str]:
    return [p.name for p in root.rglob(".*.tmp")]


def test_train_with_a_full_disk_at_the_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fill_disk(monkeypatch, after=1000, where=lambda path: path.name.endswith(".pt.tmp"))
    assert main(["train", "--model", TINY, "--out", str(run), "--steps", "2", "--save-every", "1",
                 "--batch-size", "4", "--val-size", "4", "--workers", "0", "--quiet"]) == 2
    _disk_full_line(capsys, "train", str(run / "checkpoints" / "step_00000001.pt"))
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # no checkpoint, no temporary


def test_cache_text_with_a_full_disk(tmp_path, monkeypatch, capsys):
    src = tmp_path / "c.txt"
    src.write_text("a photo of a cat\na photo of a dog\n")
    out = tmp_path / "cache"
    fill_disk(monkeypatch, after=0, where=lambda path: path.parent.name == "shards")
    assert main(["cache-text", str(src), "--out", str(out), "--preset", "sd2", "--model", TINY, "--random-init",
                 "--precision", "fp32", "--quiet"]) == 2
    _disk_full_line(capsys, "cache-text", str(out / "shards" / "c-00000.safetensors"))
    assert _temporaries(out) == [] and list((out / "shards").iterdir()) == []  # no shard recorded as done


def test_index_with_a_full_disk(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
    weights = tmp_path / "w.safetensors"
    write_safetensors(weights, ldmclip.create_model(TINY).state_dict())
    out = tmp_path / "index"
    fill_disk(monkeypatch, after=0, where=lambda path: path.parent.name == "chunks")
    assert main(["index", str(images), "--model", TINY, "--pretrained", str(weights), "--out", str(out)]) == 2
    _disk_full_line(capsys, "index", str(out / "chunks"))
    assert _temporaries(out) == []
    chunks = out / "chunks"
    assert not chunks.exists() or list(chunks.iterdir()) == []


@pytest.mark.parametrize("writer", ["json"])
def test_the_manifest_of_a_full_disk_run_is_not_half_written(tmp_path, monkeypatch, writer):
    from ldmclip.core.files import DiskFullError, write_json_atomic

    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"shards": ["a"]})
    fill_disk(monkeypatch, after=5)
    with pytest.raises(DiskFullError):
        write_json_atomic(path, {"shards": ["a", "b"]})
    assert path.read_text() == '{\n "shards": [\n  "a"\n ]\n}\n'
