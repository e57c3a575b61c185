"""benchmarks/cache_compact.py at a tiny size (ViT-Tiny-64 towers, a dozen captions): every row is
there, the sizes are in the expected order and the measured errors stay within each format's bound
(no time is asserted)."""

import json

from benchmarks.cache_compact import main

HALF = 2.0 ** -11  # float16's relative rounding (the read dtype of fp16, int8 and fp8 caches)


def test_cache_compact_benchmark_at_tiny_size(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["--model", "ViT-Tiny-64", "--captions", "12", "--presets", "sd2", "flux", "--quiet",
                 "--shard-size", "5", "--json", str(out)]) == 0
    assert "| sd2 | int8 (float16) |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(r["preset"], r["dtype"]): r for r in result["rows"]}
    dtypes = ["fp32", "fp16", "bf16", "int8", "fp8", "fp8, no scale"]
    assert set(rows) == {(p, d) for p in ("sd2", "flux") for d in dtypes}
    for preset in ("sd2", "flux"):
        size = {d: rows[preset, d]["bytes_per_caption"] for d in dtypes[:5]}
        # (the header's dtype names differ by a few bytes)
        assert abs(size["int8"] - size["fp8"]) < 16 and abs(size["fp16"] - size["bf16"]) < 16
        assert size["int8"] < 0.6 * size["fp16"] and size["fp16"] < 0.6 * size["fp32"]
        err = {d: rows[preset, d]["errors"] for d in dtypes}
        assert set(err["fp32"]) == ({"hidden"} if preset == "sd2" else {"hidden", "pooled"})
        for name in err["fp32"]:
            assert err["fp32"][name]["rel_l2_max"] == 0.0
            assert 0 < err["fp16"][name]["max_abs_rel_max"] <= HALF
            # int8: |x̂ - x| <= scale / 2 = max|x| / 254; fp8 e4m3: <= 2**-4 |x| <= 2**-4 max|x|
            assert 0 < err["int8"][name]["max_abs_rel_max"] <= 1 / 254 * (1 + HALF) + HALF
            assert 0 < err["fp8"][name]["max_abs_rel_max"] <= 2 ** -4 * (1 + HALF) + HALF
            assert err["int8"][name]["rel_l2_mean"] < err["fp8"][name]["rel_l2_mean"]
