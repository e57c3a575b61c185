"""Smoke test of benchmarks/finetune_shift.py at tiny sizes (skips without Flickr8k and cifar10-test)."""

from __future__ import annotations

import json

import pytest

from benchmarks import finetune_shift
from benchmarks.common import find_flickr8k

pytestmark = pytest.mark.skipif(find_flickr8k() is None or finetune_shift.find_cifar10() is None,
                                reason="needs ../shared/data/flickr8k and cifar10-test (or $LDMCLIP_DATA)")


@pytest.mark.slow
def test_every_row_is_trained_scored_and_reported(tmp_path):
    out = tmp_path / "out.json"
    assert finetune_shift.main(["--pretrain-steps", "2", "--finetune-steps", "2", "--batch-size", "8",
                                "--train-per-class", "8", "--val-per-class", "2", "--heldout-per-class", "2",
                                "--eval-images", "10", "--sweep", "0,1", "--workers", "0",
                                "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = list(report["results"])
    assert names[:5] == ["start", "plain", "lock-image", "layer-decay 0.75", "ema 0.999"]
    assert names[5] == f"wise-ft (alpha {report['wise_ft_alpha']:g})" and report["wise_ft_alpha"] in (0.0, 1.0)
    for row in report["results"].values():
        assert 0 <= row["cifar_top1"] <= 100 and 0 <= row["flickr_recall_sum"] <= 600
        assert len([k for k in row if "_R@" in k]) == 6
    heldout = (tmp_path / "work" / "cifar_heldout.csv").read_text().splitlines()
    trained = (tmp_path / "work" / "cifar_train.csv").read_text().splitlines()
    assert len(heldout) == 1 + 10 * 2 and len(trained) == 1 + 10 * 8
    assert not {line.split(",")[0] for line in heldout[1:]} & {line.split(",")[0] for line in trained[1:]}
    assert trained[1].endswith(",a photo of a airplane")


def test_a_start_folder_that_is_not_a_model_is_refused_before_any_training(tmp_path):
    with pytest.raises(SystemExit, match="not a model folder"):
        finetune_shift.main(["--start", str(tmp_path), "--workdir", str(tmp_path / "work"), "--train-per-class", "2",
                             "--val-per-class", "1", "--heldout-per-class", "1"])
    assert not (tmp_path / "work" / "plain").exists()
