"""CLIP_benchmark 1.6.2 as a real client, run in a subprocess by ``test_clip_benchmark.py``.

``build CIFAR FLICKR OUT``: small CIFAR-10 zero-shot and Flickr8k retrieval sets, converted to
CLIP_benchmark's webdataset layout by its own converter (``clip_benchmark.webdataset_builder``).

``eval LIB MODEL OUT JSON``: CLIP_benchmark's own command line, ``clip_benchmark eval`` (its
``clip_benchmark.cli.main``, with its argparse parser), on those sets, with ``open_clip`` the real OpenCLIP
(``LIB=open_clip``) or ldmclip in its place (``LIB=ldmclip``: ``sys.modules["open_clip"] = ldmclip`` before
CLIP_benchmark is imported), in fp32 (``--no_amp``), recall@1/5/10. JSON gets each dataset's ``metrics``
from the result files CLIP_benchmark writes.

The one patch: CLIP_benchmark's ``zeroshot_classification.accuracy``, which calls ``float()`` on a
1-element array (an error on NumPy 2.x); the replacement computes the same value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

CIFAR_PER_CLASS = 10
FLICKR_IMAGES = 50
RECALL_K = [1, 5, 10]
BATCH_SIZE = 32
DATASETS = {"cifar10": "zeroshot_classification", "flickr8k": "zeroshot_retrieval"}  # CLIP_benchmark's tasks


class _Listing(torch.utils.data.Dataset):
    """(image path, label or captions) items with the ``classes``/``templates`` the converter saves."""

    def __init__(self, items: list, classes: list[str] | None = None, templates: list[str] | None = None) -> None:
        self.items, self.classes, self.templates = items, classes, templates

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def build(cifar: Path, flickr: Path, out: Path) -> None:
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset, path_to_bytes

    templates_file = Path(sys.modules["clip_benchmark.webdataset_builder"].__file__).parent / "datasets" / \
        "en_zeroshot_classification_templates.json"
    templates = json.loads(templates_file.read_text())["cifar10"]
    classes = sorted(p.name for p in cifar.iterdir() if p.is_dir())  # torchvision CIFAR10's order
    items = [(str(path), label) for label, name in enumerate(classes)
             for path in sorted((cifar / name).glob("*.jpg"))[:CIFAR_PER_CLASS]]
    convert_dataset(_Listing(items, classes, templates), "test", str(out / "cifar10"), transform=path_to_bytes,
                    verbose=False)

    import csv

    test = [line.strip() for line in (flickr / "test.txt").read_text().splitlines() if line.strip()]
    wanted = test[:FLICKR_IMAGES]
    captions: dict[str, list[str]] = {name: [] for name in wanted}
    with open(flickr / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["image"] in captions:
                captions[row["image"]].append(row["caption"])
    items = [(str(flickr / "images" / name), captions[name]) for name in wanted]
    convert_retrieval_dataset(_Listing(items), "test", str(out / "flickr8k"), transform=path_to_bytes,
                              verbose=False)


def _accuracy(output, target, topk=(1,)):
    """Top-k accuracies (fractions) of ``output`` [N, C] logits, the values CLIP_benchmark's accuracy()
    means to return (each target is among the top k at most once)."""
    hits = output.topk(max(topk), dim=1).indices == target[:, None]
    return [hits[:, :k].any(dim=1).float().mean().item() for k in topk]


def evaluate(lib: str, model_name: str, data: Path, out: Path) -> dict:
    """``clip_benchmark eval`` on both sets as a user types it; the metrics of the files it writes."""
    if lib == "ldmclip":
        import ldmclip

        sys.modules["open_clip"] = ldmclip
    import open_clip
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    assert open_clip.__name__ == lib, open_clip.__name__
    zeroshot_classification.accuracy = _accuracy
    out.mkdir(parents=True, exist_ok=True)
    sys.argv = ["clip_benchmark", "eval", "--dataset", *(f"wds/{name}" for name in DATASETS),
                "--dataset_root", f"{data}/{{dataset}}", "--model", model_name, "--no_amp", "--num_workers", "0",
                "--batch_size", str(BATCH_SIZE), "--recall_k", *map(str, RECALL_K),
                "--output", f"{out}/{{dataset}}_{{task}}.json", "--quiet"]
    cli.main()
    results = {}
    for name, task in DATASETS.items():
        dump = json.loads((out / f"{name}_{task}.json").read_text())
        assert dump["task"] == task and dump["model"] == model_name, dump
        results[name] = dump["metrics"]
    return results


def main(argv: list[str]) -> int:
    if argv[0] == "build":
        build(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif argv[0] == "eval":
        results = evaluate(argv[1], argv[2], Path(argv[3]), Path(argv[4]).with_suffix(""))
        Path(argv[4]).write_text(json.dumps(results, indent=1))
    else:
        raise SystemExit(f"unknown step {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
