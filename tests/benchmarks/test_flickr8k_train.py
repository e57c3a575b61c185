"""benchmarks/flickr8k_train.py at tiny sizes: ldmclip's own recipe reaches its run (skips without Flickr8k)."""

from __future__ import annotations

import json

import pytest

from benchmarks import flickr8k_train
from benchmarks.common import find_flickr8k

pytestmark = pytest.mark.skipif(find_flickr8k() is None, reason="needs ../shared/data/flickr8k (or $LDMCLIP_DATA)")


def test_the_ldmclip_recipe_reaches_its_run_and_the_recall_sum_is_reported(tmp_path):
    out = tmp_path / "out.json"
    assert flickr8k_train.main(["--only", "ldmclip", "--steps", "3", "--batch-size", "8", "--eval-images", "10",
                                "--workers", "0", "--ldmclip-args", "--lr 7e-4 --patch-dropout 0.25",
                                "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    config = json.loads((tmp_path / "work" / "ldmclip" / "config.json").read_text())
    assert config["lr"] == 7e-4 and config["patch_dropout"] == 0.25 and config["steps"] == 3
    row = json.loads(out.read_text())["results"]["ldmclip"]
    recalls = [v for k, v in row.items() if "R@" in k]
    assert len(recalls) == 6 and row["recall_sum"] == pytest.approx(100 * sum(recalls))
