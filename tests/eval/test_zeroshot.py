"""Zero-shot classification: parity with OpenCLIP 3.3.0, metrics, templates, class names, data sources."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import ldmclip
from ldmclip.eval import (OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES, build_zero_shot_classifier,
                          classification_metrics, confusion_matrix, evaluate_zero_shot, imagenet_classnames,
                          load_templates, open_zero_shot, plot_confusion_matrix, read_classnames)
from ldmclip.transforms import EvalTransform

from .conftest import CLASSES, draw, make_class_folder, png_bytes, write_tar

open_clip = pytest.importorskip("open_clip")


def test_builtin_templates_and_imagenet_names_are_openclips():
    from open_clip import zero_shot_metadata as meta

    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert list(SIMPLE_IMAGENET_TEMPLATES) == [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert imagenet_classnames() == list(meta.IMAGENET_CLASSNAMES)
    assert load_templates("simple") == list(SIMPLE_IMAGENET_TEMPLATES)


def test_classifier_equals_openclips_with_the_80_templates(model_dir):
    names = ["tench", "goldfish", "kite (bird of prey)", "yellow lady's slipper", "a dog"]
    ours = build_zero_shot_classifier(ldmclip.create_model(f"local-dir:{model_dir}").eval(),
                                      ldmclip.get_tokenizer(f"local-dir:{model_dir}"), names,
                                      OPENAI_IMAGENET_TEMPLATES, batch_size=96)
    theirs = open_clip.build_zero_shot_classifier(
        open_clip.create_model(f"local-dir:{model_dir}").eval(), open_clip.get_tokenizer(f"local-dir:{model_dir}"),
        names, open_clip.OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=2)
    assert ours.shape == theirs.shape == (64, len(names))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def openclip_zero_shot_run(model, classifier, loader) -> tuple[float, float]:
    """``open_clip_train.zero_shot.run`` (fp32, CPU). Its ``accuracy`` helper calls ``float()`` on a
    one-element numpy array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"),
    so the same arithmetic is spelled out here with ``.item()``."""
    top1 = top5 = n = 0.0
    with torch.inference_mode():
        for images, target in loader:
            logits = 100.0 * model(image=images)[0] @ classifier
            pred = logits.topk(5, 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            top1 += correct[:1].reshape(-1).float().sum().item()
            top5 += correct[:5].reshape(-1).float().sum().item()
            n += images.size(0)
    return top1 / n, top5 / n


def test_predictions_and_accuracy_equal_openclip_on_a_generated_class_folder(model_dir, class_folder):
    """Same weights, templates and images: ldmclip's end-to-end zero-shot evaluation (folder reading, its
    own transform, tokenizer and model) gives OpenCLIP's predictions image by image, and the top-1/top-5
    of OpenCLIP's evaluation loop (``open_clip_train.zero_shot.run``)."""
    from torchvision.datasets import ImageFolder

    name = f"local-dir:{model_dir}"
    model, _, preprocess = ldmclip.create_model_and_transforms(name)
    source = open_zero_shot(class_folder, preprocess)
    ours = evaluate_zero_shot(model.eval(), ldmclip.get_tokenizer(name), source, list(SIMPLE_IMAGENET_TEMPLATES),
                              batch_size=7, progress=False)

    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(name)
    oc_model.eval()
    folder = ImageFolder(str(class_folder), transform=oc_preprocess)
    assert folder.classes == source.classnames  # the same class indices as torchvision's ImageFolder
    classifier = open_clip.build_zero_shot_classifier(oc_model, open_clip.get_tokenizer(name), folder.classes,
                                                      open_clip.SIMPLE_IMAGENET_TEMPLATES)
    loader = torch.utils.data.DataLoader(folder, batch_size=6)
    with torch.no_grad():
        logits = torch.cat([100.0 * oc_model.encode_image(x, normalize=True) @ classifier for x, _ in loader])
    labels = torch.tensor(folder.targets)

    top = logits.topk(5, dim=1)
    margin = (top.values[:, 0] - top.values[:, 1]).min().item()
    assert margin > 1e-3, "near-tie between classes: a rounding difference could flip a prediction"
    assert len(set(top.indices[:, 0].tolist())) >= 3, "(almost) one class predicted everywhere: parity would be vacuous"
    assert torch.equal(ours["_tensors"]["labels"], labels)
    assert torch.equal(ours["_tensors"]["predictions"], top.indices)
    torch.testing.assert_close(ours["_tensors"]["classifier"], classifier, rtol=1e-5, atol=1e-6)

    top1, top5 = openclip_zero_shot_run(oc_model, classifier, loader)
    assert ours["top1"] == pytest.approx(top1, abs=1e-12)
    assert ours["top5"] == pytest.approx(top5, abs=1e-12)
    assert ours["num_images"] == len(folder) == 24 and ours["num_classes"] == 6


def test_classification_metrics_and_confusion_matrix():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    top = torch.tensor([[0, 1], [1, 0], [0, 2], [1, 0], [2, 1], [0, 3]])
    metrics = classification_metrics(top, labels, num_classes=4, ks=(1, 2))
    assert metrics["top1"] == pytest.approx(3 / 6)
    assert metrics["top2"] == pytest.approx(5 / 6)
    assert metrics["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # class 3 has no images
    assert metrics["per_class_accuracy"] == [pytest.approx(2 / 3), 0.5, 0.0, None]
    matrix = confusion_matrix(top[:, 0], labels, 4)
    assert matrix.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], tmp_path / "sub" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(path.parent.glob("*.tmp"))


def test_template_files(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# my prompts\na photo of a {}.\n\n{{literal}} {} art\n", encoding="utf-8")
    assert load_templates(good) == ["a photo of a {}.", "{{literal}} {} art"]
    for bad in ("a photo of a cat", "{} and {}", "{name}"):
        (tmp_path / "bad.txt").write_text(bad + "\n")
        with pytest.raises(ValueError, match="exactly one"):
            load_templates(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no templates"):
        load_templates(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_templates("fancy")


def test_class_name_files(tmp_path):
    (tmp_path / "list.txt").write_text("great white shark\ntiger shark\n")
    assert read_classnames(tmp_path / "list.txt", ["n1", "n2"]) == ["great white shark", "tiger shark"]
    (tmp_path / "map.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert read_classnames(tmp_path / "map.txt", ["n01440764", "n01443537"]) == {
        "n01440764": "tench, Tinca tinca", "n01443537": "goldfish"}
    (tmp_path / "map.json").write_text(json.dumps({"a": "apple"}))
    assert read_classnames(tmp_path / "map.json") == {"a": "apple"}
    assert len(read_classnames("imagenet")) == 1000


def test_folder_with_wordnet_ids_and_a_mapping_file(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n02", "n01"):
        (tmp_path / "data" / wnid).mkdir(parents=True)
        draw((200, 0, 0), "ellipse", rng).save(tmp_path / "data" / wnid / "x.jpg")
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "data" / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "names.txt").write_text("n01\tgoldfish\nn02\ttench\nn03\tunused\n")
    source = open_zero_shot(tmp_path / "data", None, str(tmp_path / "names.txt"))
    assert source.keys == ["n01", "n02"] and source.classnames == ["goldfish", "tench"]
    assert "1 non-image files ignored" in source.description
    (tmp_path / "short.txt").write_text("n01\tgoldfish\n")
    with pytest.raises(ValueError, match="no name for 1 of the 2 class folders"):
        open_zero_shot(tmp_path / "data", None, str(tmp_path / "short.txt"))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="3 names for 2 class folders"):
        open_zero_shot(tmp_path / "data", None, str(tmp_path / "three.txt"))


def test_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        open_zero_shot(tmp_path, None)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    draw((0, 0, 0), "ellipse", np.random.default_rng(0)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(ValueError, match="1 class folder.* no images .*dog"):
        open_zero_shot(tmp_path, None)


def test_class_name_that_tokenizes_to_nothing(model_dir):
    model = ldmclip.create_model(f"local-dir:{model_dir}")
    tokenizer = ldmclip.get_tokenizer(f"local-dir:{model_dir}")
    with pytest.raises(ValueError, match="tokenize to nothing"):
        build_zero_shot_classifier(model, tokenizer, ["cat", "\x00\x01"], ["a photo of a {}."])
    with pytest.raises(ValueError, match="blank"):
        build_zero_shot_classifier(model, tokenizer, ["cat", "  "], ["a photo of a {}."])


def _evaluate(model_dir, source):
    model = ldmclip.create_model(f"local-dir:{model_dir}").eval()
    return evaluate_zero_shot(model, ldmclip.get_tokenizer(f"local-dir:{model_dir}"), source, ["a {}"],
                              batch_size=4, progress=False)


def test_csv_with_string_and_integer_labels_and_bad_rows(tmp_path, model_dir):
    rng = np.random.default_rng(0)
    for i in range(6):
        draw((200, 30, 30), "ellipse", rng).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "labels.csv").write_text("filepath,label\n0.png,cat\n1.png,dog\n2.png,cat\n3.png,\n,dog\n"
                                         "broken.png,dog\nmissing.png,cat\n")
    source = open_zero_shot(tmp_path / "labels.csv", EvalTransform(64))
    assert source.classnames == ["cat", "dog"]
    result = _evaluate(model_dir, source)
    assert result["num_images"] == 3
    assert result["skipped"]["reasons"] == {"missing_file": 1, "missing_image": 1, "missing_label": 1,
                                            "not_an_image": 1}

    (tmp_path / "ints.csv").write_text("image,class\n0.png,1\n1.png,0\n2.png,2\n")
    with pytest.raises(ValueError, match="integer labels: pass --classnames"):
        open_zero_shot(tmp_path / "ints.csv", None)
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="label 2 but only 2 class names"):
        open_zero_shot(tmp_path / "ints.csv", None, str(tmp_path / "names.txt"))
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    source = open_zero_shot(tmp_path / "ints.csv", EvalTransform(64), str(tmp_path / "names.txt"))
    assert source.classnames == ["cat", "dog", "bird"]
    assert _evaluate(model_dir, source)["num_images"] == 3

    (tmp_path / "nolabel.csv").write_text("image,caption\n0.png,cat\n")
    with pytest.raises(ValueError, match="no label column .*'image', 'caption'"):
        open_zero_shot(tmp_path / "nolabel.csv", None)


def test_webdataset_shards_with_cls(tmp_path, model_dir):
    rng = np.random.default_rng(0)
    names = list(CLASSES)[:4]
    members = []
    for i in range(7):
        members.append((f"{i:04d}.png", png_bytes(draw(*CLASSES[names[i % 4]], rng))))
        members.append((f"{i:04d}.cls", str(i % 4).encode()))
    members += [("0007.png", png_bytes(draw((0, 0, 0), "ellipse", rng))), ("0007.cls", b"9"),   # no such class
                ("0008.png", png_bytes(draw((0, 0, 0), "ellipse", rng)))]                       # no label
    write_tar(tmp_path / "shard-0.tar", members)
    (tmp_path / "names.json").write_text(json.dumps(names))
    source = open_zero_shot(str(tmp_path / "shard-{0..0}.tar"), EvalTransform(64), str(tmp_path / "names.json"))
    result = _evaluate(model_dir, source)
    assert result["num_images"] == 7 and result["num_classes"] == 4
    assert result["skipped"]["reasons"] == {"bad_label": 1, "missing_label": 1}


def test_an_excluded_class_changes_nothing_for_the_others(tmp_path, model_dir):
    """A class with files none of which can be read is left out of the classifier: the numbers are those
    of the same folder without that class (scored, it would take predictions from the others)."""
    with_dead = make_class_folder(tmp_path / "with", per_class=3)
    without = make_class_folder(tmp_path / "without", per_class=3)
    for path in (with_dead / "blue_circle").iterdir():
        path.write_bytes(b"not an image")
    shutil.rmtree(without / "blue_circle")
    dead, alive = (_evaluate(model_dir, open_zero_shot(folder, EvalTransform(64))) for folder in (with_dead, without))
    assert dead["excluded_classes"]["names"] == ["blue_circle"] and "excluded_classes" not in alive
    for key in ("num_images", "num_classes", "top1", "mean_per_class_accuracy", "per_class_accuracy",
                "confusion_matrix"):
        assert dead[key] == alive[key], key
    assert dead["num_classes"] == 5 and "top5" not in dead  # top-5 of 5 classes would be 1 by construction
    assert torch.equal(dead["_tensors"]["predictions"], alive["_tensors"]["predictions"])
    assert dead["skipped"]["reasons"] == {"not_an_image": 3}
