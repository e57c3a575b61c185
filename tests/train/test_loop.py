"""The trainer end to end on a small caption table: outputs, validation, bad samples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldmclip
from ldmclip.train import TrainConfig, train
from ldmclip.train.loop import TrainingError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _table(tmp_path, broken: int = 0):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,caption"]
    for index in range(16):
        name = list(COLOURS)[index % 4]
        pixels = np.full((40, 50, 3), COLOURS[name], dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index}.jpg")
        rows += [f"{index}.jpg,a {name} square", f"{index}.jpg,something {name}"]
    for index in range(broken):
        (images / f"bad{index}.jpg").write_bytes(b"not a jpeg")
        rows.append(f"bad{index}.jpg,a broken picture")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "captions.csv", images


def _config(tmp_path, table, images, **overrides) -> TrainConfig:
    values = dict(model="ViT-Tiny-64", data=str(table), images=str(images), val_data=str(table), val_size=8,
                  steps=4, batch_size=8, workers=0, warmup=1, output=str(tmp_path / "run"), eval_every=2,
                  save_every=2, log_every=1, progress=False, precision="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def test_table_training_writes_every_output_and_validates(tmp_path, capsys):
    table, images = _table(tmp_path)
    result = train(_config(tmp_path, table, images))
    run = tmp_path / "run"
    printed = capsys.readouterr().out
    # the run starts by saying where, what, on what and with which data
    start = printed[:printed.index("validation at step")]
    for expected in (f"run folder:  {run}", "model:       ViT-Tiny-64, ", " parameters", "device:      cpu",
                     "precision:   fp32", f"table {table} (32 image-caption rows", "4 steps",
                     f"table {table} (8 images, 16 captions)"):
        assert expected in start, expected
    for name in ("metrics.jsonl", "training_curves.png", "summary.json", "config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert 0.0 <= val[-1]["image_to_text_R@1"] <= 1.0
    assert result.metrics["text_to_image_R@10"] == 1.0  # 8 images: every image is in the top 10
    # people read percentages, in the validation lines as in the summary; metrics.jsonl keeps fractions
    line = next(line for line in printed.splitlines() if line.startswith("validation at step 4:"))
    assert f"image_to_text_R@1 {100 * val[-1]['image_to_text_R@1']:.2f}%" in line
    assert "text_to_image_R@10 100.00%" in line
    reloaded = ldmclip.create_model(f"local-dir:{result.final_model}")
    assert reloaded.state_dict().keys() == ldmclip.create_model("ViT-Tiny-64").state_dict().keys()


def test_unreadable_images_are_counted_not_fatal(tmp_path):
    table, images = _table(tmp_path, broken=3)
    result = train(_config(tmp_path, table, images, eval_every=0, steps=6))
    assert sum(result.skipped.values()) >= 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == result.skipped


def test_mostly_unreadable_data_stops_with_a_clear_error(tmp_path):
    table, images = _table(tmp_path, broken=0)
    for path in images.iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="could not be used"):
        train(_config(tmp_path, table, images, eval_every=0, val_data=None, steps=40))


def test_validation_on_webdataset_shards(tmp_path):
    from ldmclip.data.writer import write_shards
    from ldmclip.train.data import build_validation
    from ldmclip.transforms import PreprocessConfig

    table, images = _table(tmp_path)
    captions = [f"a {list(COLOURS)[index % 4]} square number {index}" for index in range(16)]
    write_shards([(index, images / f"{index}.jpg", captions[index], None) for index in range(16)],
                 tmp_path / "shards", max_per_shard=5)
    cfg = _config(tmp_path, table, images, val_data=str(tmp_path / "shards" / "shard-{00000..00003}.tar"),
                  val_size=12, eval_every=0, steps=2)
    tokenizer = ldmclip.get_tokenizer(cfg.model)
    validation = build_validation(cfg, tokenizer, PreprocessConfig(image_size=64))
    # the first 12 pairs in shard order, one caption each, paired with their own image
    assert validation.images.shape == (12, 3, 64, 64)
    assert validation.tokens.equal(tokenizer(captions[:12]))
    assert validation.text_to_image.tolist() == list(range(12))
    result = train(cfg)
    assert 0.0 < result.metrics["text_to_image_R@10"] <= 1.0


def test_validation_shards_with_no_readable_pairs_is_a_clear_error(tmp_path):
    from ldmclip.data.writer import write_shards

    table, images = _table(tmp_path)
    write_shards([(0, images / "0.jpg", "one red square", None)], tmp_path / "shards")
    with pytest.raises(ValueError, match="fewer than two readable"):
        train(_config(tmp_path, table, images, val_data=str(tmp_path / "shards" / "shard-00000.tar"), steps=1))


def test_a_run_that_fails_before_its_first_checkpoint_removes_the_folder_it_created(tmp_path):
    table, images = _table(tmp_path)
    with pytest.raises(ValueError, match="--images"):
        train(dataclasses.replace(_config(tmp_path, table, images), images=None))
    assert not (tmp_path / "run").exists()


def test_a_failed_run_keeps_a_folder_the_user_already_had(tmp_path):
    table, images = _table(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--images"):
        train(dataclasses.replace(_config(tmp_path, table, images), images=None))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_failed_run_keeps_a_folder_holding_checkpoints(tmp_path):
    from ldmclip.train.loop import _remove_unfinished_run_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002.pt.tmp").write_bytes(b"partial")  # not a checkpoint
    _remove_unfinished_run_folder(run)
    assert not run.exists()
    (run / "checkpoints").mkdir(parents=True)
    torch.save({}, run / "checkpoints" / "step_00000002.pt")
    _remove_unfinished_run_folder(run)
    assert (run / "checkpoints" / "step_00000002.pt").is_file()


def test_table_validation_equals_ldmclip_eval_retrieval_on_the_same_table(tmp_path):
    """One implementation: the trainer's validation and ``ldmclip eval`` score the same table alike."""
    from ldmclip.eval import evaluate_retrieval, open_retrieval
    from ldmclip.train.data import build_validation
    from ldmclip.transforms import EvalTransform, PreprocessConfig

    table, images = _table(tmp_path)
    cfg = _config(tmp_path, table, images, val_size=1000)
    torch.manual_seed(0)
    model = ldmclip.create_model(cfg.model).eval()
    tokenizer = ldmclip.get_tokenizer(cfg.model)
    preprocess = PreprocessConfig.from_dict(model.preprocess_cfg)
    validation = build_validation(cfg, tokenizer, preprocess)
    got = validation.evaluate(model, torch.device("cpu"))
    source = open_retrieval(table, EvalTransform(preprocess.image_size, preprocess.mean, preprocess.std),
                            image_root=images)
    expected = evaluate_retrieval(model, tokenizer, source, progress=False)
    assert set(got) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    for key, value in got.items():
        assert value == pytest.approx(expected[key], abs=1e-12), key
