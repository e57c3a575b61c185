"""Compact storage in the text-embedding cache (int8 and fp8 e4m3 with a scale per token): the error
bounds that follow from each format, zeros, a cache that reads back within those bounds of the fp32
cache of the same captions, the files on disk, reruns and mismatches, and the command line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from tests.conditioning.conftest import TINY_MODEL
from ldmclip.cli import main
from ldmclip.conditioning import TextEmbeddingCache, build_text_cache
from ldmclip.conditioning.cache import CacheMismatchError
from ldmclip.conditioning.quantize import QMAX, QuantizedRows, dequantize, quantize
from ldmclip.core.errors import UserError

MODEL = TINY_MODEL
CAPTIONS = [f"a photo of {n} {thing}" for n in ("one", "two", "three") for thing in ("cat", "dog", "red car")]
COMPACT = ("int8", "fp8")
FP8_NORMAL = 2.0 ** -6       # e4m3's smallest normal value
FP8_REL = 2.0 ** -4          # half an ulp of a 3-bit mantissa, relative
FP8_SUBNORMAL_ABS = 2.0 ** -10  # half the subnormal spacing (2**-9)
SLACK = 1e-6                 # float32 rounding of x / scale and of q * scale



def _text_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(cond, source, out, **kw):
    kw.setdefault("precision", "fp32")
    return build_text_cache(cond, source, out, **kw)


def _spread(shape, seed=0) -> torch.Tensor:
    """Values over six orders of magnitude, both signs, as CLIP's outlier channels would give."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1])[torch.randperm(shape[-1], generator=g)]


def _assert_within_format_bound(approx: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, dtype: str,
                                extra_rel: float = 0.0) -> None:
    """|x̂ - x| within what the format allows (+ ``extra_rel`` * |x| for a float16 read)."""
    x = exact.double()
    err = (approx.double() - x).abs()
    s = scale.double().unsqueeze(-1)
    if dtype == "int8":
        bound = s / 2 * (1 + SLACK)
    else:
        normal = (x.abs() / s.clamp_min(1e-300)) >= FP8_NORMAL
        bound = torch.where(normal, FP8_REL * x.abs(), s * FP8_SUBNORMAL_ABS) * (1 + SLACK)
    # a float16 read rounds x̂ once more: relative 2**-11, absolute 2**-25 among float16's subnormals
    allowed_extra = extra_rel * (x.abs() + bound) + (2.0 ** -25 if extra_rel else 0.0)
    excess = err - bound - allowed_extra
    assert float(excess.max()) <= 0, f"{dtype}: error above the format's bound by {float(excess.max()):.3g}"


# ----------------------------------------------------------------------------------------------------
# the formats
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", COMPACT)
def test_round_trip_within_the_format_bound(dtype):
    x = _spread((3, 77, 96))
    values, scale = quantize(x, dtype)
    assert values.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[dtype]
    assert values.shape == x.shape and scale.shape == (3, 77) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(-1) / QMAX[dtype])
    approx = dequantize(values, scale)
    _assert_within_format_bound(approx, x, scale, dtype)
    # each token's largest value maps to the format's largest one, and comes back (nearly) exactly
    assert float(values.float().abs().amax(-1).min()) == QMAX[dtype]
    biggest = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(approx.gather(-1, biggest), x.gather(-1, biggest), rtol=1e-6, atol=0)


def test_int8_rounds_to_nearest():
    x = torch.tensor([[127.0, 0.49, 0.51, -0.5, -1.49, -126.6]])  # scale 1
    values, scale = quantize(x, "int8")
    assert float(scale) == 1.0
    assert values.tolist() == [[127, 0, 1, 0, -1, -127]]  # half to even, as torch.round


def test_fp8_relative_error_of_normal_values():
    x = torch.linspace(1.0, 448.0, 5000).unsqueeze(0)  # scale 1: all normal in e4m3
    values, scale = quantize(x, "fp8")
    assert float(scale) == 1.0
    rel = (dequantize(values, scale) - x).abs() / x
    assert float(rel.max()) <= FP8_REL
    assert float(rel.max()) > FP8_REL / 2  # the bound is tight: it is the format's, not a loose one


@pytest.mark.parametrize("dtype", COMPACT)
def test_zeros_stay_zero_and_an_all_zero_token_divides_by_nothing(dtype):
    x = _spread((2, 5, 16))
    x[0, :, ::3] = 0.0   # exact zeros inside tokens
    x[1, 2] = 0.0        # a token that is all zeros
    values, scale = quantize(x, dtype)
    approx = dequantize(values, scale)
    assert torch.isfinite(approx).all() and torch.isfinite(scale).all()
    assert (approx[0, :, ::3] == 0).all() and (approx[1, 2] == 0).all() and float(scale[1, 2]) == 0.0
    values, scale = quantize(torch.zeros(4, 8), dtype)  # pooled rows of zeros
    assert (dequantize(values, scale) == 0).all() and (scale == 0).all()


@pytest.mark.parametrize("dtype", COMPACT)
def test_filling_rows_batch_by_batch_equals_quantising_all_at_once(dtype):
    x = _spread((10, 7, 32), seed=1)
    rows = QuantizedRows(10, (7, 32), dtype)
    for start in range(0, 10, 3):
        rows[start:start + 3] = x[start:start + 3]
    values, scale = quantize(x, dtype)
    assert torch.equal(rows.values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(rows.scale, scale)


def test_quantize_rejects_a_float_dtype():
    with pytest.raises(ValueError, match="compact"):
        quantize(torch.ones(2, 2), "fp16")


# ----------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, sdxl):
    """The fp32 cache of CAPTIONS (3 shards, last one short)."""
    root = tmp_path_factory.mktemp("ref")
    src = _text_file(root / "captions.txt", CAPTIONS)
    _build(sdxl, src, root / "fp32", dtype="fp32", batch_size=4, shard_size=4)
    return src, TextEmbeddingCache(root / "fp32")


@pytest.mark.parametrize("dtype", COMPACT)
def test_a_compact_cache_reads_back_within_the_bound_of_the_fp32_cache(tmp_path, sdxl, reference, dtype):
    src, ref = reference
    _build(sdxl, src, tmp_path / "cache", dtype=dtype, batch_size=4, shard_size=4)
    exact = TextEmbeddingCache(tmp_path / "cache", dtype=torch.float32)
    default = TextEmbeddingCache(tmp_path / "cache")
    assert exact.manifest["dtype"] == exact.stored_dtype == dtype and "scales" in exact.manifest
    assert default.dtype == torch.float16 and exact.dtype == torch.float32
    assert list(exact.keys()) == list(ref.keys()) and exact.shard_names == ref.shard_names
    assert exact.manifest["hidden_shape"] == ref.manifest["hidden_shape"]
    assert exact.manifest["pooled_dim"] == ref.manifest["pooled_dim"]
    for key in ref:
        want, got, half = ref[key], exact[key], default[key]
        assert set(got) == set(want) == {"hidden", "pooled"}
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == torch.float32
            assert half[name].dtype == torch.float16
            scale = want[name].abs().amax(-1) / QMAX[dtype]
            _assert_within_format_bound(got[name], want[name], scale, dtype)
            _assert_within_format_bound(half[name].float(), want[name], scale, dtype, extra_rel=2.0 ** -11)
    # the empty prompt is kept exact (float32 on disk)
    for name, tensor in ref.empty_prompt().items():
        assert torch.equal(exact.empty_prompt()[name], tensor)
        assert default.empty_prompt()[name].dtype == torch.float16
    # batches, the Dataset and the join give the same dequantised tensors
    batch = default.get_batch(["1", "5"])
    assert batch["hidden"].shape == (2, *ref["1"]["hidden"].shape) and batch["hidden"].dtype == torch.float16
    assert torch.equal(batch["pooled"][1], default["5"]["pooled"])
    item = default.dataset()[2]
    assert item["key"] == "3" and torch.equal(item["hidden"], default["3"]["hidden"])
    joined = list(default.join([{"__key__": "2"}, {"__key__": "missing"}], missing="empty"))
    assert torch.equal(joined[0]["hidden"], default["2"]["hidden"])
    assert torch.equal(joined[1]["hidden"], default.empty_prompt()["hidden"])


@pytest.mark.parametrize("dtype, stored", [("int8", "I8"), ("fp8", "F8_E4M3")])
def test_shard_files_hold_values_and_scales(tmp_path, sdxl, reference, dtype, stored):
    src, ref = reference
    _build(sdxl, src, tmp_path / "cache", dtype=dtype, batch_size=4, shard_size=4)
    shard = tmp_path / "cache" / "shards" / "captions-00000.safetensors"
    with safe_open(str(shard), "pt") as f:
        assert set(f.keys()) == {"hidden", "hidden_scale", "pooled", "pooled_scale"}
        hidden, pooled = f.get_slice("hidden"), f.get_slice("pooled")
        assert hidden.get_dtype() == pooled.get_dtype() == stored
        rows, tokens, width = hidden.get_shape()
        assert f.get_slice("hidden_scale").get_shape() == [rows, tokens]
        assert f.get_slice("pooled_scale").get_shape() == [rows] and f.get_slice("pooled_scale").get_dtype() == "F32"
    with safe_open(str(tmp_path / "cache" / "empty_prompt.safetensors"), "pt") as f:
        assert f.get_slice("hidden").get_dtype() == "F32"
    # one byte per value and 4 per token: about a quarter of the fp32 shard
    ratio = shard.stat().st_size / (ref.path / "shards" / "captions-00000.safetensors").stat().st_size
    assert 0.25 < ratio < 0.27


@pytest.mark.parametrize("dtype", COMPACT)
def test_rerun_and_resume_give_byte_identical_files(tmp_path, sdxl, reference, dtype):
    src, _ = reference
    _build(sdxl, src, tmp_path / "a", dtype=dtype, batch_size=4, shard_size=4)
    _build(sdxl, src, tmp_path / "b", dtype=dtype, batch_size=4, shard_size=4)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    (tmp_path / "b" / "shards" / "captions-00001.safetensors").unlink()
    report = _build(sdxl, src, tmp_path / "b", dtype=dtype, batch_size=4, shard_size=4)
    assert report.written == ["captions-00001"]
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_resuming_with_another_dtype_is_refused(tmp_path, sdxl, reference):
    src, _ = reference
    _build(sdxl, src, tmp_path / "int8", dtype="int8", shard_size=4)
    for other in ("fp8", "fp16"):
        with pytest.raises(CacheMismatchError, match="dtype"):
            _build(sdxl, src, tmp_path / "int8", dtype=other, shard_size=4)
    _build(sdxl, src, tmp_path / "fp16", dtype="fp16", shard_size=4)
    with pytest.raises(CacheMismatchError, match="dtype"):
        _build(sdxl, src, tmp_path / "fp16", dtype="fp8", shard_size=4)
    assert TextEmbeddingCache(tmp_path / "int8").manifest["dtype"] == "int8"


def test_compact_caches_carry_the_format_version_that_can_read_them(tmp_path, sdxl, reference, monkeypatch):
    """int8/fp8 shards need their scales applied: they are format 2, which an ldmclip that reads only format 1
    refuses with "upgrade" instead of returning unscaled integers; fp16/bf16/fp32 caches stay format 1."""
    from ldmclip.conditioning import cache_reader
    from ldmclip.conditioning.cache import CacheError

    src, ref = reference
    assert ref.manifest["format_version"] == 1
    _build(sdxl, src, tmp_path / "int8", dtype="int8", shard_size=4)
    compact = TextEmbeddingCache(tmp_path / "int8")
    assert compact.manifest["format_version"] == 2
    monkeypatch.setattr(cache_reader, "FORMAT_VERSION", 1)  # a reader of the first format only
    with pytest.raises(CacheError, match="upgrade ldmclip"):
        TextEmbeddingCache(tmp_path / "int8")
    assert TextEmbeddingCache(ref.path).manifest["dtype"] == "fp32"


class _LoudConditioner:
    """A stand-in conditioner whose outputs exceed float16's range (65504)."""

    def __call__(self, captions):
        return SimpleNamespace(hidden=torch.full((len(captions), 4, 8), 1e5), pooled=None, truncated=0)

    def empty_prompt(self):
        return SimpleNamespace(hidden=torch.zeros(1, 4, 8), pooled=None)

    def identity(self):
        return {"preset": "loud"}


def test_values_beyond_float16_are_refused_for_compact_dtypes(tmp_path):
    src = _text_file(tmp_path / "c.txt", ["a"])
    with pytest.raises(UserError, match="65504.*bf16 or fp32"):
        _build(_LoudConditioner(), src, tmp_path / "cache", dtype="int8")
    _build(_LoudConditioner(), src, tmp_path / "fp32", dtype="fp32")  # fp32 keeps them
    assert float(TextEmbeddingCache(tmp_path / "fp32")["1"]["hidden"].max()) == 1e5


def test_reader_dtype_argument(tmp_path, reference):
    _, ref = reference
    as_bf16 = TextEmbeddingCache(ref.path, dtype=torch.bfloat16)
    assert as_bf16["1"]["hidden"].dtype == torch.bfloat16 == as_bf16.empty_prompt()["hidden"].dtype
    assert ref["1"]["hidden"].dtype == torch.float32 == ref.dtype  # float caches: the stored dtype
    with pytest.raises(ValueError, match="floating"):
        TextEmbeddingCache(ref.path, dtype=torch.int8)


def test_cli_dtype_int8(tmp_path, capsys):
    src = _text_file(tmp_path / "c.txt", CAPTIONS[:3])
    options = ["--preset", "sd2", "--model", MODEL, "--precision", "fp32", "--quiet", "--random-init"]
    assert main(["cache-text", str(src), "--out", str(tmp_path / "int8"), *options, "--dtype", "int8"]) == 0
    assert main(["cache-text", str(src), "--out", str(tmp_path / "fp32"), *options, "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["cache-text", str(src), "--out", str(tmp_path / "int8"), *options, "--dtype", "fp8"]) == 2
    assert "dtype" in capsys.readouterr().err
    compact, exact = TextEmbeddingCache(tmp_path / "int8"), TextEmbeddingCache(tmp_path / "fp32")
    assert compact.stored_dtype == "int8" and not compact.has_pooled
    for key in exact:
        want = exact[key]["hidden"]
        scale = want.abs().amax(-1) / QMAX["int8"]
        _assert_within_format_bound(compact[key]["hidden"].float(), want, scale, "int8", extra_rel=2.0 ** -11)


class _RecordingHandle:
    """Wraps a safe_open handle and records which tensor rows are read."""

    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def get_slice(self, name):
        handle, reads = self.handle, self.reads

        class _Slice:
            def __getitem__(self, index):
                reads.append((name, index))
                return handle.get_slice(name)[index]

        return _Slice()


def test_reading_a_key_reads_its_rows_and_scale_rows_only(tmp_path, sdxl, reference, monkeypatch):
    src, _ = reference
    _build(sdxl, src, tmp_path / "cache", dtype="int8", shard_size=4)
    cache = TextEmbeddingCache(tmp_path / "cache")
    reads: list = []
    original = cache._handle
    monkeypatch.setattr(cache, "_handle", lambda number: _RecordingHandle(original(number), reads))
    _, row = cache.location("6")
    cache["6"]
    assert sorted(reads) == sorted((name, row) for name in ("hidden", "hidden_scale", "pooled", "pooled_scale"))
