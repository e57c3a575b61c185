"""CLIP_benchmark's webdataset layouts (clip_benchmark 1.6.2's webdataset_builder) in ``ldmclip eval``,
written here by hand (no clip_benchmark needed): zero-shot with the dataset's classnames and ``{c}``
templates, retrieval with one caption per line of each sample's ``txt``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmclip
from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.core.formats import benchmark_shards
from ldmclip.eval import retrieval_metrics

from .conftest import CLASSES, draw, make_class_folder, png_bytes, write_tar

CAPTIONS_PER_IMAGE = 3


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_split(root: Path, samples: list[list[tuple[str, bytes]]], split: str = "test", shards: int = 1) -> Path:
    """``root/split/{0..shards-1}.tar`` + ``nshards.txt``, the samples dealt over the shards in order."""
    (root / split).mkdir(parents=True)
    per_shard = -(-len(samples) // shards)
    for n in range(shards):
        members = [m for sample in samples[n * per_shard:(n + 1) * per_shard] for m in sample]
        write_tar(root / split / f"{n}.tar", members)
    (root / split / "nshards.txt").write_text(f"{shards}\n")
    return root


def retrieval_images(count: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [draw(colour, shape, rng) for colour, shape in list(CLASSES.values())[:count]]


def captions_of(i: int) -> list[str]:
    return [f"a {name} number {i}" for name in list(CLASSES)[:CAPTIONS_PER_IMAGE]]


@pytest.fixture
def retrieval_root(tmp_path) -> Path:
    """A retrieval set as ``convert_retrieval_dataset`` writes it: one png + one txt of captions per sample."""
    samples = [[(f"s{i:07d}.png", png_bytes(image)), (f"s{i:07d}.txt", "\n".join(captions_of(i)).encode())]
               for i, image in enumerate(retrieval_images())]
    root = write_split(tmp_path / "wds_flickr", samples, shards=2)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def test_retrieval_reads_each_line_as_a_caption_of_its_image(retrieval_root, tmp_path, model_dir, capsys):
    """Each line of a sample's txt is one caption of that image; the numbers are the multi-caption metric
    (CLIP_benchmark's protocol) on the model's own features. Before, the txt was one long caption."""
    results = {}
    for name, spec in (("root", retrieval_root), ("split", retrieval_root / "test"),
                       ("shards", retrieval_root / "test" / "{0..1}.tar")):
        out = tmp_path / f"{name}.json"
        code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--retrieval", spec,
                                    "--precision", "fp32", "--workers", 0, "--batch-size", 4, "--json", out)
        assert code == 0, err
        results[name] = json.loads(out.read_text())["retrieval"]
        assert "one caption per line" in stdout and "span several lines" not in stdout
    rt = results["root"]
    assert rt["num_images"] == 6 and rt["num_captions"] == 6 * CAPTIONS_PER_IMAGE

    model, _, preprocess = ldmclip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = ldmclip.get_tokenizer(f"local-dir:{model_dir}")
    images = torch.stack([preprocess(image) for image in retrieval_images()])
    with torch.no_grad():
        expected = retrieval_metrics(model.encode_image(images, normalize=True),
                                     model.encode_text(tokenizer([c for i in range(6) for c in captions_of(i)]),
                                                       normalize=True),
                                     torch.arange(6).repeat_interleave(CAPTIONS_PER_IMAGE))
    for key, value in expected.items():
        for name in results:
            assert results[name][key] == pytest.approx(value, abs=1e-9), (name, key)


def test_multiline_captions_of_plain_shards_are_said(retrieval_root, tmp_path, model_dir, capsys):
    """The same tar without its CLIP_benchmark folder: one caption per sample, as for any webdataset, but
    the captions that span several lines are counted and the table says what to pass instead."""
    shutil.copy(retrieval_root / "test" / "0.tar", tmp_path / "copy.tar")
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--retrieval", tmp_path / "copy.tar",
                                "--precision", "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    rt = json.loads(out.read_text())["retrieval"]
    assert rt["num_images"] == rt["num_captions"] == 3 and rt["multiline_captions"] == 3
    assert "warning: 3 caption(s) span several lines" in stdout and "dataset_type.txt" in stdout


def write_zero_shot(root: Path, folder: Path, templates: list[str]) -> tuple[Path, list[str]]:
    """The class folder as ``convert_dataset`` writes it: png + integer cls per sample, classnames.txt
    (label order = sorted folder names, as ImageFolder) and the templates file."""
    names = sorted(p.name for p in folder.iterdir())
    samples = []
    for label, name in enumerate(names):
        for path in sorted((folder / name).iterdir()):
            key = f"s{len(samples):07d}"
            samples.append([(f"{key}.png", path.read_bytes()), (f"{key}.cls", str(label).encode())])
    write_split(root, samples)
    (root / "classnames.txt").write_text("\n".join(n.replace("_", " ") for n in names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root, names


def test_zero_shot_uses_the_datasets_classnames_and_c_templates(tmp_path, model_dir, capsys):
    """A CLIP_benchmark classification folder scores like the same images as class folders with the same
    names and the same templates written with '{}'."""
    folder = make_class_folder(tmp_path / "classes", per_class=2)
    templates = ["a photo of a {c}.", "a drawing of the {c}, small"]
    root, names = write_zero_shot(tmp_path / "wds_shapes", folder, templates)
    out = tmp_path / "z.json"
    code, stdout, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", root, "--precision",
                                "fp32", "--workers", 0, "--json", out)
    assert code == 0, err
    zs = json.loads(out.read_text())["zeroshot"]
    assert zs["num_images"] == 12 and zs["num_templates"] == 2 and zs["templates"] == "dataset"
    assert list(zs["per_class_accuracy"]) == [n.replace("_", " ") for n in names]

    (tmp_path / "names.txt").write_text("\n".join(n.replace("_", " ") for n in names) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(t.replace("{c}", "{}") for t in templates) + "\n")
    code, _, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", folder, "--classnames",
                           tmp_path / "names.txt", "--templates", tmp_path / "templates.txt", "--precision", "fp32",
                           "--workers", 0, "--json", tmp_path / "f.json")
    assert code == 0, err
    reference = json.loads((tmp_path / "f.json").read_text())["zeroshot"]
    for key in ("top1", "top5", "mean_per_class_accuracy", "per_class_accuracy", "confusion_matrix"):
        assert zs[key] == reference[key], key
    assert len({row.index(max(row)) for row in zs["confusion_matrix"]}) > 1  # not one class everywhere

    # --templates and --classnames still win over the dataset's own
    (tmp_path / "other.txt").write_text("".join(f"class {i}\n" for i in range(len(names))))
    code, _, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--zeroshot", root, "--templates", "simple",
                           "--classnames", tmp_path / "other.txt", "--workers", 0, "--json", out)
    assert code == 0, err
    zs = json.loads(out.read_text())["zeroshot"]
    assert zs["num_templates"] == 7 and list(zs["per_class_accuracy"]) == [f"class {i}" for i in range(len(names))]


def test_layout_detection(tmp_path, retrieval_root):
    assert benchmark_shards(tmp_path / "nothing") is None
    make_class_folder(tmp_path / "classes", per_class=1)
    assert benchmark_shards(tmp_path / "classes") is None  # an image folder stays one
    whole = benchmark_shards(retrieval_root)
    assert whole.kind == "retrieval" and whole.split == "test" and whole.root == retrieval_root
    assert whole.shards == str(retrieval_root / "test" / "{0..1}.tar")
    assert benchmark_shards(retrieval_root / "test") == whole
    one = benchmark_shards(retrieval_root / "test" / "1.tar")
    assert one.shards == str(retrieval_root / "test" / "1.tar") and one.kind == "retrieval"
    (retrieval_root / "dataset_type.txt").unlink()
    assert benchmark_shards(retrieval_root).kind == "classification"  # CLIP_benchmark's default
    shutil.copytree(retrieval_root / "test", retrieval_root / "train")
    assert benchmark_shards(retrieval_root).split == "test"
    shutil.rmtree(retrieval_root / "test")
    assert benchmark_shards(retrieval_root).split == "train"  # the only split
    shutil.copytree(retrieval_root / "train", retrieval_root / "val")
    with pytest.raises(UserError, match="name the split folder"):
        benchmark_shards(retrieval_root)


@pytest.mark.parametrize("case", ["retrieval_as_zeroshot", "classes_as_retrieval", "missing_shard", "bad_nshards",
                                  "multilabel", "unknown_type", "template_without_c", "blank_class",
                                  "no_classnames"])
def test_bad_benchmark_input_is_one_line(case, tmp_path, retrieval_root, model_dir, capsys):
    folder = make_class_folder(tmp_path / "classes", per_class=1)
    zero, _ = write_zero_shot(tmp_path / "wds_shapes", folder, ["a photo of a {c}."])
    option, data, message = {
        "retrieval_as_zeroshot": ("--zeroshot", retrieval_root, "pass it to --retrieval"),
        "classes_as_retrieval": ("--retrieval", zero, "pass it to --zeroshot"),
        "missing_shard": ("--retrieval", retrieval_root, "says 2 shard(s) but 1 are missing (e.g. 1.tar)"),
        "bad_nshards": ("--retrieval", retrieval_root, "expected the number of shards"),
        "multilabel": ("--zeroshot", zero, "multi-label classification is not supported"),
        "unknown_type": ("--zeroshot", zero, "unknown dataset type 'captions'"),
        "template_without_c": ("--zeroshot", zero, "must contain '{c}' once"),
        "blank_class": ("--zeroshot", zero, "line 2 is blank"),
        "no_classnames": ("--zeroshot", zero, "no classnames.txt beside the shards; pass --classnames"),
    }[case]
    if case == "missing_shard":
        (retrieval_root / "test" / "1.tar").unlink()
    elif case == "bad_nshards":
        (retrieval_root / "test" / "nshards.txt").write_text("two\n")
    elif case == "multilabel":
        (zero / "dataset_type.txt").write_text("multilabel\n")
    elif case == "unknown_type":
        (zero / "dataset_type.txt").write_text("captions\n")
    elif case == "template_without_c":
        (zero / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo of a {}.\n")
    elif case == "blank_class":
        names = (zero / "classnames.txt").read_text().splitlines()
        (zero / "classnames.txt").write_text("\n".join([names[0], "", *names[2:]]) + "\n")
    elif case == "no_classnames":
        (zero / "classnames.txt").unlink()
    code, _, err = run_cli(capsys, "--model", f"local-dir:{model_dir}", "--workers", 0, option, data)
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
