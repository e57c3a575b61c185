"""benchmarks/embed_throughput.py at a tiny size (a ViT-T-8-64, 8 Flickr8k photos) with its OpenCLIP +
webdataset baseline: every row is there, and the baseline's embeddings equal ldmclip's fp32 ones (the
check that both sides do the same work; no time is asserted)."""

import json

import pytest

from benchmarks.common import find_flickr8k
from benchmarks.embed_throughput import main


@pytest.mark.skipif(find_flickr8k() is None, reason="Flickr8k not found (../shared/data/flickr8k or $LDMCLIP_DATA)")
def test_embed_benchmark_at_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    assert main(["--images", "8", "--per-shard", "4", "--model", "ViT-T-8-64", "--batch-size", "4", "--workers", "0",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"ldmclip", "ldmclip_fp32", "baseline"}
    assert result["rows"]["baseline"]["tool"].startswith("OpenCLIP 3.3.0")
    assert all(row["images_per_s"] > 0 for row in result["rows"].values())
    check = result["agreement_fp32_vs_baseline"]
    assert check["keys_a"] == check["keys_b"] == check["keys_common"] == 8
    assert check["min_cosine"] > 0.9999  # both store fp16
