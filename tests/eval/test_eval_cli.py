"""``ldmclip eval`` end to end on generated folders, tables and shards, and its bad-input handling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import ldmclip
from ldmclip.cli import main
from ldmclip.eval import retrieval_metrics

from .conftest import CLASSES, draw, make_caption_table, make_class_folder, png_bytes, write_tar


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_zeroshot_and_retrieval_end_to_end(tmp_path, model_dir, capsys):
    folder = make_class_folder(tmp_path / "classes", per_class=3)
    (folder / "red_circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    table = make_caption_table(tmp_path / "flickr", images=10, captions_per_image=3)
    (tmp_path / "split.txt").write_text("\n".join(f"im{i:03d}.png" for i in range(8)) + "\n")
    out = tmp_path / "results" / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", folder,
                                "--templates", "simple", "--retrieval", table,
                                "--images", tmp_path / "flickr" / "images",
                                "--split", tmp_path / "split.txt", "--precision", "fp32", "--workers", 1,
                                "--batch-size", 5, "--json", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert not list(out.parent.glob("*.tmp"))

    zs = results["zeroshot"]
    assert zs["num_images"] == 18 and zs["num_classes"] == 6 and zs["num_templates"] == 7
    assert zs["skipped"]["reasons"] == {"not_an_image": 1}
    assert set(zs["per_class_accuracy"]) == {name.replace(" ", "_") for name in CLASSES}
    assert 0 <= zs["top1"] <= zs["top5"] <= 1 and 0 <= zs["mean_per_class_accuracy"] <= 1
    assert np.array(zs["confusion_matrix"]).sum() == 18
    png = out.parent / "r_confusion.png"
    assert zs["confusion_matrix_png"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"

    rt = results["retrieval"]
    assert rt["num_images"] == 8 and rt["num_captions"] == 24  # the split keeps 8 of the 10 images
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= rt[f"{direction}_R@1"] <= rt[f"{direction}_R@5"] <= rt[f"{direction}_R@10"] <= 1
        assert 1 <= rt[f"{direction}_median_rank"] <= rt["num_captions"]
    assert rt["text_to_image_R@10"] == 1.0  # only 8 images to rank
    assert results["precision"] == "fp32" and results["model"] == f"local-dir:{model_dir}"

    assert "zero-shot classification" in stdout and "top-1" in stdout and "mean per-class" in stdout
    assert "image→text" in stdout and "text→image" in stdout and "8 images × 24 captions" in stdout
    assert "skipped: 1 of 19 (not_an_image 1)" in stdout
    assert "random weights" not in stdout  # a local-dir: model brings its weights


def test_retrieval_numbers_equal_the_metric_on_directly_computed_features(tmp_path, model_dir, capsys):
    """The CLI's retrieval numbers are the metric of the model's own features (nothing lost on the way)."""
    table = make_caption_table(tmp_path, images=9, captions_per_image=2)
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--retrieval", table, "--precision", "fp32",
                           "--workers", 0, "--json", out, "--images", tmp_path / "images")
    assert code == 0, err
    rt = json.loads(out.read_text())["retrieval"]

    model, _, preprocess = ldmclip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = ldmclip.get_tokenizer(f"local-dir:{model_dir}")
    from PIL import Image

    images = torch.stack([preprocess(Image.open(tmp_path / "images" / f"im{i:03d}.png")) for i in range(9)])
    captions = [line.split(",", 1)[1] for line in table.read_text().splitlines()[1:]]
    with torch.no_grad():
        expected = retrieval_metrics(model.encode_image(images, normalize=True),
                                     model.encode_text(tokenizer(captions), normalize=True),
                                     torch.arange(9).repeat_interleave(2))
    for key, value in expected.items():
        assert rt[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_on_webdataset_shards_and_captions_without_tokens(tmp_path, model_dir, capsys):
    rng = np.random.default_rng(0)
    members = []
    for i in range(6):
        members += [(f"{i:04d}.png", png_bytes(draw((200, 20 * i, 20), "ellipse", rng))),
                    (f"{i:04d}.txt", f"a red circle number {i}".encode())]
    members += [("0006.png", png_bytes(draw((0, 0, 0), "ellipse", rng))), ("0006.txt", b"\x00\x01"),
                ("0007.png", b"garbage"), ("0007.txt", b"a broken picture")]
    write_tar(tmp_path / "s-0.tar", members)
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--retrieval", tmp_path / "s-{0..0}.tar",
                                "--precision", "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    rt = json.loads(out.read_text())["retrieval"]
    assert rt["num_images"] == rt["num_captions"] == 6
    assert rt["skipped"]["reasons"] == {"caption_without_tokens": 1, "not_an_image": 1}


def test_table_caption_that_tokenizes_to_nothing_is_left_out(tmp_path, model_dir, capsys):
    table = make_caption_table(tmp_path, images=4, captions_per_image=2)
    with open(table, "a", encoding="utf-8") as f:
        f.write('im000.png,"\x01\x02"\n')
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--retrieval", table, "--images",
                                tmp_path / "images", "--precision", "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    rt = json.loads(out.read_text())["retrieval"]
    assert rt["num_images"] == 4 and rt["num_captions"] == 8
    assert rt["captions_skipped"] == {"caption_without_tokens": 1}
    assert "captions left out: 1 (caption_without_tokens)" in stdout


@pytest.mark.parametrize("case", ["nothing", "empty_folder", "empty_class", "missing_columns", "bad_templates",
                                  "missing_data", "split_without_retrieval", "retrieval_folder"])
def test_bad_input_is_a_clear_error(case, tmp_path, model_dir, capsys):
    model = ["--model", f"local-dir:{model_dir}", "--workers", 0]
    folder = make_class_folder(tmp_path / "classes", per_class=1)
    if case == "empty_class":
        (folder / "zz_empty").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("image,label\na.png,cat\n")
    (tmp_path / "t.txt").write_text("a photo\n")
    args, message = {
        "nothing": ([], "nothing to evaluate"),
        "empty_folder": (["--zeroshot", tmp_path / "empty"], "no class sub-folders"),
        "empty_class": (["--zeroshot", folder], "class folder(s) have no images (zz_empty)"),
        "missing_columns": (["--retrieval", tmp_path / "bad.csv"], "no caption column"),
        "bad_templates": (["--zeroshot", folder, "--templates", tmp_path / "t.txt"], "exactly one '{}'"),
        "missing_data": (["--zeroshot", tmp_path / "nope"], "not found"),
        "split_without_retrieval": (["--zeroshot", folder, "--split", tmp_path / "t.txt"], "--split"),
        "retrieval_folder": (["--retrieval", folder], "is a folder"),
    }[case]
    code, _, err = run_cli(capsys, *model, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_a_directory_symlink_loop_counts_each_image_once(tmp_path, model_dir, capsys):
    """``red_circle/uplink -> ..`` once made the walk count every image again at each level (5,043
    images instead of 123, all of one class); links to folders are not followed, a dangling link is a
    counted missing file."""
    folder = make_class_folder(tmp_path / "classes", per_class=2)
    (folder / "red_circle" / "uplink").symlink_to("..")
    (folder / "blue_circle" / "gone.png").symlink_to("nowhere.png")
    # A class folder and a file whose names are not UTF-8 (Latin-1 'é'): the class is named as text.
    (folder / "cyan_square").rename(folder / os.fsdecode(b"cyan_squar\xe9"))
    (folder / "green_square" / "000.png").rename(folder / "green_square" / os.fsdecode(b"\xe9.png"))
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", folder, "--templates",
                                "simple", "--precision", "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    zs = json.loads(out.read_text())["zeroshot"]
    assert zs["num_images"] == 12 and zs["num_classes"] == 6
    assert zs["skipped"]["reasons"] == {"missing_file": 1}
    assert np.array(zs["confusion_matrix"]).sum(axis=1).tolist() == [2] * 6
    assert "1 links to folders not followed" in zs["data"]
    assert "cyan_squar\\xe9" in zs["per_class_accuracy"]


def test_a_class_whose_images_are_all_unreadable_is_excluded_and_said(tmp_path, model_dir, capsys):
    folder = make_class_folder(tmp_path / "classes", per_class=2)
    for path in (folder / "cyan_square").iterdir():
        path.write_bytes(b"\x89PNG not really")
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", folder, "--templates",
                                "simple", "--precision", "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    zs = json.loads(out.read_text())["zeroshot"]
    assert zs["num_classes"] == 5 and zs["num_images"] == 10
    assert zs["excluded_classes"] == {"count": 1, "reason": "no readable image", "names": ["cyan_square"]}
    assert "cyan_square" not in zs["per_class_accuracy"] and len(zs["confusion_matrix"]) == 5
    assert zs["skipped"]["reasons"] == {"not_an_image": 2}
    assert "excluded 1 class(es), no readable image: cyan_square" in stdout


def test_no_readable_image_in_any_class_is_one_line(tmp_path, model_dir, capsys):
    folder = make_class_folder(tmp_path / "classes", per_class=1)
    for path in folder.glob("*/*"):
        path.write_bytes(b"")
    code, _, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", folder, "--workers", 0)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no readable image" in err and str(folder) in err and "empty_file 6" in err
