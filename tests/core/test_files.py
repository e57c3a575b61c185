"""The package's own safetensors writer: files that safetensors reads back exactly, written atomically."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldmclip.core.files import write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 7, generator=g).bfloat16(),
        "f16": torch.randn(2, generator=g).half(),
        "f64": torch.randn(1, 2, 3, generator=g).double(),
        "i64": torch.arange(-5, 5),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(6, 3, generator=g).t(),  # not contiguous
        "a.dotted.name": torch.ones(2, 2),
    }


def test_safetensors_reads_back_every_dtype_and_shape(tmp_path):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"format": "pt", "note": "ünïcode"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}


def test_header_is_padded_to_eight_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": torch.ones(3)})
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert header_length % 8 == 0
    assert len(data) == 8 + header_length + 3 * 4


def test_file_mode_follows_the_umask_and_no_temporary_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "t.safetensors", {"x": torch.ones(1)})
    finally:
        os.umask(old)
    # safetensors' own save_file makes 0o600 files; caches and indexes are shared, so a plain open()'s mode
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_an_unsupported_dtype_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(tmp_path / "t.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


# ---- a full disk: one DiskFullError naming the file, no temporary left, the old file intact


@pytest.mark.parametrize("writer", ["safetensors", "json", "torch"])
@pytest.mark.parametrize("after", [0, 100])  # nothing fits / the disk fills in the middle of the file
def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer, after):
    from ldmclip.core.files import DiskFullError, save_torch, write_json_atomic
    from tests.core.disk_full import fill_disk

    path = tmp_path / "out" / f"result.{writer}"
    write = {"safetensors": lambda: write_safetensors(path, _tensors()),
             "json": lambda: write_json_atomic(path, {"text": "x" * 1000}),
             "torch": lambda: save_torch(path, _tensors())}[writer]
    write()
    before = path.read_bytes()
    fill_disk(monkeypatch, after=after)
    with pytest.raises(DiskFullError) as error:
        write()
    message = str(error.value)
    assert message.startswith(f"disk full writing {path} (") and message.endswith(" MB free)")
    assert "\n" not in message
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .result.*.tmp
    assert path.read_bytes() == before  # the finished file is untouched


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import ldmclip.core.files

    def broken_open(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ldmclip.core.files, "open", broken_open, raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        write_safetensors(tmp_path / "x.safetensors", _tensors())


def test_human_bytes_in_powers_of_1000():
    from ldmclip.core.files import human_bytes

    assert [human_bytes(n) for n in (0, 999, 1000, 3_400_000, 2.5e9, 1.2e12, 5e15)] == [
        "0 B", "999 B", "1.0 KB", "3.4 MB", "2.5 GB", "1.2 TB", "5000.0 TB"]
