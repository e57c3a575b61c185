"""Numbers out of range are one line naming the flag (exit 2), checked before anything starts: never a
ZeroDivisionError or 'length must be >= 0, got -320' from deep inside a run."""

from __future__ import annotations

import pytest

from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.train import train
from ldmclip.train.config import TrainConfig


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--steps", "-5", "--steps must be at least 1, got -5"),
    ("--accum", "0", "--accum must be at least 1, got 0"),
    ("--log-every", "0", "--log-every must be at least 1, got 0"),
    ("--epochs", "0", "--epochs must be more than 0, got 0"),
    ("--lr", "-1", "--lr must be at least 0, got -1"),
    ("--beta2", "1", "--beta2 must be from 0 to 1 (less than 1), got 1"),
    ("--patch-dropout", "1.5", "--patch-dropout must be from 0 to 1 (less than 1), got 1.5"),
    ("--layer-decay", "0", "--layer-decay must be more than 0 and at most 1, got 0"),
    ("--ema", "1", "--ema must be more than 0 and less than 1, got 1"),
    ("--workers", "-1", "--workers must be at least 0, got -1"),
    ("--val-size", "0", "--val-size must be at least 1, got 0"),
])
def test_train_numbers_out_of_range_are_one_line_naming_the_flag(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "run"
    assert main(["train", flag, value, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ldmclip train: error: {expected}"), err
    assert not out.exists()  # refused before the run folder is made


def test_train_from_python_validates_too(tmp_path):
    with pytest.raises(UserError, match="--batch-size must be at least 1, got 0"):
        train(TrainConfig(batch_size=0, output=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_numbers_in_a_config_file_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: -5\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "--steps must be at least 1, got -5" in capsys.readouterr().err


def test_the_defaults_and_switched_off_values_are_valid():
    TrainConfig().validate()
    TrainConfig(steps=3, grad_clip=0.0, tile_size=None, save_every=0, eval_every=0, warmup=0, workers=0,
                keep_checkpoints=0, max_bad_fraction=1.0, lr=0.0).validate()


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--model", "ViT-T-8-64", "--zeroshot", "{tmp}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "--model", "ViT-T-8-64", "--zeroshot", "{tmp}", "--workers", "-1"], "--workers must be 0 or more"),
    (["index", "{tmp}", "--model", "ViT-T-8-64", "--out", "{tmp}/i", "--chunk-size", "0"], "--chunk-size must be"),
    (["index", "{tmp}", "--model", "ViT-T-8-64", "--out", "{tmp}/i", "--batch-size", "-3"], "--batch-size and"),
    (["cache-text", "{tmp}/c.txt", "--out", "{tmp}/c", "--preset", "sd2", "--model", "ViT-T-8-64", "--random-init",
      "--batch-size", "0"], "--batch-size and --shard-size must be at least 1"),
    (["cache-text", "{tmp}/c.txt", "--out", "{tmp}/c", "--preset", "sd2", "--model", "ViT-T-8-64", "--random-init",
      "--shard-size", "-1"], "--batch-size and --shard-size must be at least 1"),
])
def test_other_commands_refuse_zero_or_negative_numbers_in_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "c.txt").write_text("a cat\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err) and expected in err[-1] and err[-1].startswith(f"ldmclip {argv[0]}: error:")
