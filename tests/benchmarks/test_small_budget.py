"""benchmarks/small_budget.py at tiny sizes: each variant gets the same samples and its own options."""

from __future__ import annotations

import json

import pytest

from benchmarks import small_budget
from ldmclip.train.config import TrainConfig


def test_variants_see_the_same_samples_with_their_own_options(tmp_path):
    out = tmp_path / "out.json"
    assert small_budget.main(["--variants", "--only", "baseline,batch 32,logit_scale lr 1e-2,ViT-T-8-64", "--steps",
                              "2", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [rows[name]["steps"] for name in rows] == [2, 4, 2, 2]  # 2 x 64 = 4 x 32 samples
    assert json.loads((tmp_path / "work" / "baseline" / "config.json").read_text())["model"] == TrainConfig.model
    assert json.loads((tmp_path / "work" / "ViT-T-8-64" / "config.json").read_text())["model"] == "ViT-T-8-64"
    config = json.loads((tmp_path / "work" / "batch_32" / "config.json").read_text())
    assert config["batch_size"] == 32 and config["steps"] == 4
    groups = json.loads((tmp_path / "work" / "logit_scale_lr_1e-2" / "config.json").read_text())["param_groups"]
    assert [(g["params"], g["lr"]) for g in groups if g["name"].startswith("rule1")] == [(1, 1e-2)]
    for row in rows.values():
        assert 0 <= row["zeroshot_colour_shape_top1"] <= 100 and row["wall_s"] > 0


def test_an_unknown_variant_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant"):
        small_budget.main(["--variants", "--only", "lr 9", "--steps", "2", "--workdir", str(tmp_path)])
