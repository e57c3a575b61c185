"""CLIP_benchmark 1.6.2 as a real client, run in a subprocess by ``test_clip_benchmark.py``.

``build CIFAR FLICKR OUT``: small CIFAR-10 zero-shot and Flickr8k retrieval sets, converted to
CLIP_benchmark's webdataset layout by its own converter (``clip_benchmark.webdataset_builder``).

``eval LIB MODEL OUT JSON``: CLIP_benchmark's own dataset reader and metrics on those sets, with
``open_clip`` the real OpenCLIP (``LIB=open_clip``) or ldmclip in its place (``LIB=ldmclip``:
``sys.modules["open_clip"] = ldmclip``), in fp32 (its ``--no_amp``), recall@1/5/10.

The steps are those of ``clip_benchmark.cli.run`` for a ``wds/`` dataset (load_clip, build_dataset,
a DataLoader over ``dataset.batched``, the task's ``evaluate``). ``clip_benchmark.cli`` itself is not
imported: its import of ``model_collection`` calls ``open_clip.list_pretrained()``, which is not this
branch's to provide. The one patch: CLIP_benchmark's ``zeroshot_classification.accuracy``, which calls
``float()`` on a 1-element array (an error on NumPy 2.x); the replacement computes the same value.
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


def evaluate(lib: str, model_name: str, out: Path) -> dict:
    if lib == "ldmclip":
        import ldmclip

        sys.modules["open_clip"] = ldmclip
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from clip_benchmark.models import load_clip

    assert open_clip.__name__ == lib, open_clip.__name__
    zeroshot_classification.accuracy = _accuracy
    torch.manual_seed(0)
    model, transform, tokenizer = load_clip(model_type="open_clip", model_name=model_name, pretrained=None,
                                            cache_dir=None, device="cpu")
    model.eval()
    results = {}
    for name, task in (("cifar10", "zeroshot_classification"), ("flickr8k", "zeroshot_retrieval")):
        dataset = build_dataset(dataset_name=f"wds/{name}", root=str(out / name), transform=transform, split="test",
                                download=True, task=task)
        loader = torch.utils.data.DataLoader(dataset.batched(BATCH_SIZE), batch_size=None, shuffle=False,
                                             num_workers=0)
        if task == "zeroshot_classification":
            results[name] = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes,
                                                             dataset.templates, device="cpu", amp=False)
        else:
            results[name] = zeroshot_retrieval.evaluate(model, loader, tokenizer, recall_k_list=RECALL_K,
                                                        device="cpu", amp=False)
    return results


def main(argv: list[str]) -> int:
    if argv[0] == "build":
        build(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif argv[0] == "eval":
        results = evaluate(argv[1], argv[2], Path(argv[3]))
        Path(argv[4]).write_text(json.dumps(results, indent=1))
    else:
        raise SystemExit(f"unknown step {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
