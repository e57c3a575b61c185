"""The training config: flags, files, and their precedence."""

from __future__ import annotations

import argparse
import json

import pytest

from ldmclip.cli.train import add_arguments as add_train_arguments
from ldmclip.cli.train import config_from_args
from ldmclip.train.config import TrainConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_and_flags():
    assert _parse([]) == TrainConfig()
    cfg = _parse(["--batch-size", "32", "--lr", "3e-4", "--lock-image", "--tile-size", "none", "--compile", "no"])
    assert cfg.batch_size == 32 and cfg.lr == 3e-4 and cfg.lock_image is True
    assert cfg.tile_size is None and cfg.compile is False


def test_yaml_and_json_files_with_flags_winning(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: ViT-B-16\nbatch-size: 256\nwarmup: 7\n")
    cfg = _parse(["--config", str(yaml_file), "--warmup", "3"])
    assert cfg.model == "ViT-B-16" and cfg.batch_size == 256 and cfg.warmup == 3
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"loss": "siglip"}))
    assert _parse(["--config", str(json_file)]).loss == "siglip"


def test_unknown_option_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        _parse(["--config", str(path)])


def test_bad_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        _parse(["--loss", "triplet"])
