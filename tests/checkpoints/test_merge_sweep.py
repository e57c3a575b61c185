"""``ldmclip merge --sweep``: WiSE-FT's alphas evaluated in memory, the best one kept (eval.sweep)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import ldmclip
from ldmclip.checkpoints import interpolate_state_dicts
from ldmclip.cli import main
from ldmclip.data.synthetic import SyntheticZeroShot, synthetic_retrieval_pairs
from ldmclip.eval import select_alpha

ALPHAS = [0.0, 0.5, 1.0]
RUN = ["--precision", "fp32", "--device", "cpu", "--workers", "0", "--quiet", "--templates", "simple"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two random ViT-T-8-64 checkpoints, a 4-class folder (3 images each) and a 10-caption table."""
    root = tmp_path_factory.mktemp("sweep")
    models = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        models[name] = ldmclip.create_model("ViT-T-8-64")
        models[name].save_pretrained(root / name)
    classes = SyntheticZeroShot(image_size=64, per_class=3)
    for i in range(len(classes)):
        image, label = classes[i]
        if label < 4:
            folder = root / "classes" / classes.classnames[label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    (root / "images").mkdir()
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, (image, caption) in enumerate(synthetic_retrieval_pairs(10)):
            image.save(root / "images" / f"{i}.png")
            writer.writerow([f"{i}.png", caption])
    return root, models


def _data(root) -> list[str]:
    return ["--zeroshot", str(root / "classes"), "--retrieval", str(root / "captions.csv"),
            "--images", str(root / "images")]


def _eval(root, name: str, json_path) -> dict:
    assert main(["eval", "--model", f"local-dir:{root / name}", *_data(root), *RUN, "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text())


def test_sweep_matches_eval_at_the_ends_and_keeps_the_best_alpha(inputs, tmp_path, capsys):
    root, models = inputs
    out = tmp_path / "wise"
    assert main(["merge", str(root / "a"), str(root / "b"), "--sweep", ",".join(map(str, ALPHAS)), *_data(root),
                 *RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best alpha by mean" in printed and printed.count("%") > 3 * 8  # a row per alpha
    report = json.loads((out / "sweep.json").read_text())
    rows = report["alphas"]
    assert [row["alpha"] for row in rows] == ALPHAS
    for row, name in ((rows[0], "a"), (rows[-1], "b")):
        reference = _eval(root, name, tmp_path / f"{name}.json")
        for key, value in row["zeroshot"].items():
            assert value == reference["zeroshot"][key], (name, key)
        for key, value in row["retrieval"].items():
            assert value == reference["retrieval"][key], (name, key)
    for row in rows:
        recalls = [row["retrieval"][k] for k in row["retrieval"] if "_R@" in k]
        assert len(recalls) == 6
        assert row["mean_recall"] == pytest.approx(sum(recalls) / 6)
        assert row["mean"] == pytest.approx((row["zeroshot"]["top1"] + row["mean_recall"]) / 2)
    best = select_alpha(rows, "mean")
    assert report["best_alpha"] == best["alpha"]
    assert best["mean"] == max(row["mean"] for row in rows)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = load_file(str(out / "open_clip_model.safetensors"))
    expected = interpolate_state_dicts(models["a"].state_dict(), models["b"].state_dict(), best["alpha"])
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert ldmclip.create_model(f"local-dir:{out}").preprocess_cfg == models["a"].preprocess_cfg


def test_sweep_with_one_input_and_another_select_metric(inputs, tmp_path, capsys):
    root, models = inputs
    out = tmp_path / "wise"
    assert main(["merge", str(root / "a"), str(root / "b"), "--sweep", "1,0", "--retrieval", str(root / "captions.csv"),
                 "--images", str(root / "images"), "--select", "text_to_image_R@1", *RUN, "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["alphas"]
    assert [row["alpha"] for row in rows] == [1.0, 0.0] and all("zeroshot" not in row for row in rows)
    best = max(rows, key=lambda row: row["retrieval"]["text_to_image_R@1"])  # the first of ties, as select_alpha
    written = load_file(str(out / "open_clip_model.safetensors"))
    source = models["b"] if best["alpha"] == 1.0 else models["a"]
    assert all(torch.equal(written[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "0,1"], "--zeroshot DATA and/or --retrieval"),
    (["--sweep", "0,1.5", "--zeroshot", "X"], "from 0 (A) to 1 (B)"),
    (["--sweep", "0,a", "--zeroshot", "X"], "separated by commas"),
    (["--sweep", "0,1", "--alpha", "0.5", "--zeroshot", "X"], "exclude each other"),
    (["--alpha", "0.5", "--zeroshot", "X"], "add --sweep"),
    (["--sweep", "0,1", "--zeroshot", "CLASSES", "--select", "mean_recall"], "was not measured"),
])
def test_sweep_mistakes_are_one_line_errors(inputs, tmp_path, capsys, extra, message):
    root, _ = inputs
    extra = [str(root / "classes") if part == "CLASSES" else part for part in extra]
    code = main(["merge", str(root / "a"), str(root / "b"), *extra, *RUN, "--out", str(tmp_path / "c")])
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()
