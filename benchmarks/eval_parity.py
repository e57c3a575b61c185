"""Zero-shot classification and retrieval on real images: ldmclip's numbers and OpenCLIP 3.3.0's, side by side.

Both libraries load the same weights (a folder in the OpenCLIP hub layout) and evaluate them with their
own code: image reading and preprocessing, tokenizer, model, classifier, metric.

* Zero-shot, on CIFAR-10's test images (one folder per class): ldmclip's ``evaluate_zero_shot`` against
  OpenCLIP's ``build_zero_shot_classifier`` + torchvision's ``ImageFolder`` + the loop of
  ``open_clip_train.zero_shot.run``. Reports top-1/top-5 and the share of images whose top-5 predictions
  agree exactly (1.0 expected in fp32).
* Retrieval, on Flickr8k's test split (1,000 images × 5,000 captions): ldmclip's ``evaluate_retrieval``
  (multi-caption protocol) against the same metric computed densely (argsort, as OpenCLIP's
  ``get_clip_metrics``) on OpenCLIP's features; plus ``open_clip_train.train.get_clip_metrics`` itself
  on one caption per image from both libraries (exactly equal numbers expected), and on one row per
  caption — what ``open_clip_train`` reports for a Flickr-style CSV, shown for comparison.

    python benchmarks/eval_parity.py --quick          # 200 CIFAR images, 100 Flickr8k images (about a minute)
    python benchmarks/eval_parity.py                  # all 10,000 CIFAR images, the 1,000-image Flickr8k test split
    python benchmarks/eval_parity.py --pretrained runs/flickr8k/final

Without ``--pretrained`` the model is random with extra noise on its weights (plain random init maps
every image to nearly the same feature, and every prediction to one class, which would make the
comparison vacuous). Data is looked up in ``$LDMCLIP_DATA`` or ``../shared/data``; missing datasets are
skipped with a message.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import data_root, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_model_dir(args, workdir: Path) -> Path:
    """The weights both libraries load: ``--pretrained`` as is, or a scrambled random model saved in the
    OpenCLIP hub layout."""
    import ldmclip

    if args.pretrained:
        model = ldmclip.create_model(args.model, pretrained=args.pretrained)
    else:
        torch.manual_seed(args.seed)
        model = ldmclip.create_model(args.model)
        with torch.no_grad():
            for param in model.parameters():
                scale = 0.1 if param.dim() <= 1 else float(param.std().clamp_min(0.02))
                param.add_(scale * torch.randn_like(param))
    directory = workdir / "model"
    model.save_pretrained(directory)
    return directory


def cifar_subset(cifar: Path, per_class: int | None, workdir: Path) -> Path:
    """The whole folder, or the first ``per_class`` images of each class as symlinks."""
    if per_class is None:
        return cifar
    root = workdir / "cifar-subset"
    for folder in sorted(p for p in cifar.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (root / folder.name / image.name).symlink_to(image.resolve())
    return root


def autocast_for(precision: str):
    from ldmclip.core.precision import autocast

    return lambda: autocast(precision, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# Zero-shot


def zeroshot_ldmclip(model_dir: Path, folder: Path, args) -> dict:
    import ldmclip
    from ldmclip.eval import SIMPLE_IMAGENET_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, evaluate_zero_shot, open_zero_shot

    start = time.perf_counter()
    name = f"local-dir:{model_dir}"
    model, _, preprocess = ldmclip.create_model_and_transforms(name)
    templates = OPENAI_IMAGENET_TEMPLATES if args.templates == "openai" else SIMPLE_IMAGENET_TEMPLATES
    result = evaluate_zero_shot(model.eval(), ldmclip.get_tokenizer(name), open_zero_shot(folder, preprocess),
                                list(templates), batch_size=args.batch_size, workers=args.workers,
                                autocast=autocast_for(args.precision), progress=False)
    result["wall_s"] = time.perf_counter() - start
    return result


def zeroshot_openclip(model_dir: Path, folder: Path, args) -> dict:
    import open_clip
    from torchvision.datasets import ImageFolder

    from open_clip_train.precision import get_autocast

    start = time.perf_counter()
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    templates = (open_clip.OPENAI_IMAGENET_TEMPLATES if args.templates == "openai"
                 else open_clip.SIMPLE_IMAGENET_TEMPLATES)
    dataset = ImageFolder(str(folder), transform=preprocess)
    autocast = get_autocast(args.precision, device_type="cpu")
    with autocast():
        classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(name), dataset.classes,
                                                          templates, num_classes_per_batch=10, device="cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    classifier = classifier.float()
    # open_clip_train.zero_shot.run, with .item() where its accuracy() calls float() on a one-element
    # array (numpy >= 2.4 refuses that); the top-5 indices are kept to compare image by image.
    predictions, labels = [], []
    with torch.inference_mode():
        for images, target in loader:
            with autocast():
                logits = 100.0 * model(image=images)[0] @ classifier
            predictions.append(logits.float().topk(5, 1, True, True)[1])
            labels.append(target)
    top, labels = torch.cat(predictions), torch.cat(labels)
    correct = top.eq(labels[:, None])
    return {"top1": correct[:, :1].any(1).double().mean().item(), "top5": correct.any(1).double().mean().item(),
            "num_images": len(labels), "predictions": top, "labels": labels, "classifier": classifier,
            "wall_s": time.perf_counter() - start}


def compare_zeroshot(model_dir: Path, cifar: Path, args, workdir: Path) -> dict:
    folder = cifar_subset(cifar, args.cifar_per_class, workdir)
    ours = zeroshot_ldmclip(model_dir, folder, args)
    theirs = zeroshot_openclip(model_dir, folder, args)
    same_top5 = (ours["_tensors"]["predictions"] == theirs["predictions"]).all(dim=1).double().mean().item()
    same_top1 = (ours["_tensors"]["predictions"][:, 0] == theirs["predictions"][:, 0]).double().mean().item()
    assert torch.equal(ours["_tensors"]["labels"], theirs["labels"])
    return {
        "images": ours["num_images"], "classes": ours["num_classes"], "templates": ours["num_templates"],
        "ldmclip": {"top1": ours["top1"], "top5": ours["top5"], "wall_s": ours["wall_s"]},
        "openclip": {"top1": theirs["top1"], "top5": theirs["top5"], "wall_s": theirs["wall_s"]},
        "same_top1_prediction": same_top1, "same_top5_predictions": same_top5,
        "max_classifier_difference": (ours["_tensors"]["classifier"] - theirs["classifier"]).abs().max().item(),
        "predicted_classes": int(ours["_tensors"]["predictions"][:, 0].unique().numel()),
    }


# ---------------------------------------------------------------------------------------------------
# Retrieval


def flickr_test(flickr: Path, images: int | None) -> tuple[list[str], list[list[str]]]:
    """The first ``images`` of the test split with their captions, in the order of the captions file
    (the order in which ldmclip's table reader meets them, so features line up row by row)."""
    names = [line.strip() for line in (flickr / "test.txt").read_text().splitlines() if line.strip()]
    wanted = set(names[:images] if images else names)
    captions: dict[str, list[str]] = {}
    with open(flickr / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["image"] in wanted:
                captions.setdefault(row["image"], []).append(row["caption"])
    return list(captions), list(captions.values())


def dense_reference(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """The multi-caption metric computed the way ``get_clip_metrics`` computes the single-caption one:
    one similarity matrix, argsort, position of the first correct item."""
    logits = images @ texts.T
    positives = text_to_image[None, :] == torch.arange(len(images))[:, None]
    ranking = torch.argsort(logits, dim=1, descending=True)
    preds = {"image_to_text": torch.gather(positives, 1, ranking).float().argmax(dim=1).numpy(),
             "text_to_image": torch.where(torch.argsort(logits.T, dim=1, descending=True)
                                          == text_to_image[:, None])[1].numpy()}
    out = {}
    for name, p in preds.items():
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(np.mean(p < k))
        out[f"{name}_mean_rank"] = float(p.mean() + 1)
        out[f"{name}_median_rank"] = float(np.floor(np.median(p)) + 1)
    return out


def tied_competitors(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, int]:
    """Competitors exactly as similar as the correct item, per direction (identical captions of different
    images make some). ``argsort`` orders them arbitrarily, ldmclip ranks them behind the correct item,
    so mean ranks may differ by up to this many / queries."""
    logits = images @ texts.T
    positives = text_to_image[None, :] == torch.arange(len(images))[:, None]
    best = logits.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    own = logits.T.gather(1, text_to_image[:, None])
    return {"image_to_text": int(((logits == best) & ~positives).sum()),
            "text_to_image": int(((logits.T == own) & ~positives.T).sum())}


def retrieval_ldmclip(model_dir: Path, flickr: Path, names: list[str], args, workdir: Path) -> dict:
    import ldmclip
    from ldmclip.eval import evaluate_retrieval, open_retrieval

    split = workdir / "flickr-split.txt"
    split.write_text("\n".join(names) + "\n")
    start = time.perf_counter()
    name = f"local-dir:{model_dir}"
    model, _, preprocess = ldmclip.create_model_and_transforms(name)
    source = open_retrieval(flickr / "captions.csv", preprocess, flickr / "images", split)
    result = evaluate_retrieval(model.eval(), ldmclip.get_tokenizer(name), source, batch_size=args.batch_size,
                                workers=args.workers, autocast=autocast_for(args.precision), progress=False)
    result["wall_s"] = time.perf_counter() - start
    return result


def retrieval_openclip(model_dir: Path, flickr: Path, names: list[str], captions: list[list[str]], args) -> dict:
    """OpenCLIP's model, preprocessing and tokenizer; each image encoded once, then its captions."""
    import open_clip
    from PIL import Image

    from open_clip_train.precision import get_autocast

    start = time.perf_counter()
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    autocast = get_autocast(args.precision, device_type="cpu")

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            return preprocess(Image.open(flickr / "images" / names[i]))

    image_features, text_features = [], []
    flat = [c for group in captions for c in group]
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(Images(), batch_size=args.batch_size, num_workers=args.workers):
            with autocast():
                image_features.append(model.encode_image(batch, normalize=True).float())
        for i in range(0, len(flat), args.batch_size):
            with autocast():
                text_features.append(model.encode_text(tokenizer(flat[i:i + args.batch_size]), normalize=True).float())
    text_to_image = torch.tensor([i for i, group in enumerate(captions) for _ in group])
    return {"image_features": torch.cat(image_features), "text_features": torch.cat(text_features),
            "text_to_image": text_to_image, "wall_s": time.perf_counter() - start}


def compare_retrieval(model_dir: Path, flickr: Path, args, workdir: Path) -> dict:
    from open_clip_train.train import get_clip_metrics

    from ldmclip.eval import retrieval_metrics

    names, captions = flickr_test(flickr, args.flickr_images)
    ours = retrieval_ldmclip(model_dir, flickr, names, args, workdir)
    theirs = retrieval_openclip(model_dir, flickr, names, captions, args)
    t = ours["_tensors"]
    assert torch.equal(t["text_to_image"].cpu(), theirs["text_to_image"]), "different caption order"
    feature_diff = max((t["image_features"] - theirs["image_features"]).abs().max().item(),
                       (t["text_features"] - theirs["text_features"]).abs().max().item())
    keys = [k for k in ours if k.startswith(("image_to_text", "text_to_image"))]
    reference = dense_reference(theirs["image_features"], theirs["text_features"], theirs["text_to_image"])
    ties = tied_competitors(theirs["image_features"], theirs["text_features"], theirs["text_to_image"])
    first = torch.tensor([int((theirs["text_to_image"] == i).nonzero()[0]) for i in range(len(names))])
    scale = torch.tensor(100.0)
    single_ours = retrieval_metrics(t["image_features"], t["text_features"][first], torch.arange(len(names)))
    single_openclip = get_clip_metrics(theirs["image_features"], theirs["text_features"][first], scale)
    per_row = get_clip_metrics(theirs["image_features"][theirs["text_to_image"]], theirs["text_features"], scale)
    return {
        "images": ours["num_images"], "captions": ours["num_captions"], "max_feature_difference": feature_diff,
        "tied_competitors": ties,
        "tied_competitors_one_caption": tied_competitors(theirs["image_features"], theirs["text_features"][first],
                                                         torch.arange(len(names))),
        "ldmclip": {**{k: ours[k] for k in keys}, "wall_s": ours["wall_s"]},
        "openclip_features_dense_metric": {**{k: reference[k] for k in keys}, "wall_s": theirs["wall_s"]},
        "one_caption_ldmclip": {k: float(v) for k, v in single_ours.items()},
        "one_caption_openclip_get_clip_metrics": {k: float(v) for k, v in single_openclip.items()},
        "openclip_train_one_row_per_caption": {k: float(v) for k, v in per_row.items()},
    }


# ---------------------------------------------------------------------------------------------------


def print_zeroshot(z: dict) -> None:
    print(f"\nzero-shot, CIFAR-10 test: {z['images']} images, {z['classes']} classes, {z['templates']} templates "
          f"({z['predicted_classes']} classes predicted)")
    print(f"{'':12}{'top-1':>10}{'top-5':>10}{'wall s':>10}")
    for side in ("ldmclip", "openclip"):
        r = z[side]
        print(f"{side:12}{100 * r['top1']:>9.2f}%{100 * r['top5']:>9.2f}%{r['wall_s']:>10.1f}")
    print(f"same top-1 prediction: {100 * z['same_top1_prediction']:.2f}% of images; "
          f"same top-5 list: {100 * z['same_top5_predictions']:.2f}%; "
          f"max |classifier difference| {z['max_classifier_difference']:.2e}")


def print_retrieval(r: dict) -> None:
    print(f"\nretrieval, Flickr8k test: {r['images']} images × {r['captions']} captions "
          f"(max |feature difference| {r['max_feature_difference']:.2e}; competitors tied exactly with the "
          f"correct item: {r['tied_competitors']['image_to_text']} image→text, "
          f"{r['tied_competitors']['text_to_image']} text→image)")
    keys = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
            "text_to_image_R@5", "text_to_image_R@10", "image_to_text_mean_rank", "text_to_image_mean_rank",
            "image_to_text_median_rank", "text_to_image_median_rank"]
    short = ["I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "I→T mean", "T→I mean", "I→T med", "T→I med"]
    print(f"{'':44}" + "".join(f"{s:>9}" for s in short) + f"{'wall s':>9}")
    rows = [("ldmclip (5 captions per image)", r["ldmclip"]),
            ("OpenCLIP features, dense metric", r["openclip_features_dense_metric"]),
            ("ldmclip, first caption only", r["one_caption_ldmclip"]),
            ("OpenCLIP get_clip_metrics, first caption", r["one_caption_openclip_get_clip_metrics"]),
            ("open_clip_train on rows (image repeated)", r["openclip_train_one_row_per_caption"])]
    for label, row in rows:
        cells = "".join(f"{100 * row[k]:>8.2f}%" if "R@" in k else f"{row[k]:>9.3f}" if "mean" in k
                        else f"{row[k]:>9.0f}" for k in keys)
        wall = f"{row['wall_s']:>9.1f}" if "wall_s" in row else ""
        print(f"{label:44}{cells}{wall}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-T-16-128")
    parser.add_argument("--pretrained", help="weights to evaluate (default: a scrambled random model)")
    parser.add_argument("--quick", action="store_true", help="20 CIFAR images per class, 100 Flickr8k test images")
    parser.add_argument("--cifar-per-class", type=int, help="CIFAR-10 images per class (default: all 1,000)")
    parser.add_argument("--flickr-images", type=int, help="Flickr8k test images (default: all 1,000)")
    parser.add_argument("--templates", default="openai", choices=("openai", "simple"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here ('-': standard output)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cifar_per_class = args.cifar_per_class or 20
        args.flickr_images = args.flickr_images or 100
    if not all(importlib.util.find_spec(m) for m in ("open_clip", "open_clip_train", "torchvision")):
        print("skipped: needs open-clip-torch 3.3.0 with open_clip_train (pip install -e '.[test]')")
        return 0
    root = data_root()
    cifar = root / "cifar10-test" if root else None
    flickr = root / "flickr8k" if root else None
    have_cifar = bool(cifar and cifar.is_dir())
    have_flickr = bool(flickr and (flickr / "captions.csv").is_file())
    if not have_cifar and not have_flickr:
        print("skipped: neither cifar10-test nor flickr8k found (set LDMCLIP_DATA to the folder holding them)")
        return 0
    results: dict = {"model": args.model, "pretrained": args.pretrained, "precision": args.precision,
                     "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="eval-parity-") as tmp:
        workdir = Path(tmp)
        model_dir = make_model_dir(args, workdir)
        print(f"{args.model} ({args.pretrained or 'scrambled random weights'}), {args.precision}, "
              f"batch {args.batch_size}, {args.workers} data worker(s), {torch.get_num_threads()} threads")
        if have_cifar:
            results["zeroshot"] = compare_zeroshot(model_dir, cifar, args, workdir)
            print_zeroshot(results["zeroshot"])
        else:
            print("\nzero-shot skipped: cifar10-test not found")
        if have_flickr:
            results["retrieval"] = compare_retrieval(model_dir, flickr, args, workdir)
            print_retrieval(results["retrieval"])
        else:
            print("\nretrieval skipped: flickr8k not found")
    if args.json:
        write_json(args.json, results)
    problems = parity_problems(results)
    if args.precision == "fp32":  # under autocast the two libraries may round differently; report only
        print("\nparity: " + ("OK" if not problems else "MISMATCH: " + "; ".join(problems)))
        return 1 if problems else 0
    return 0


def parity_problems(results: dict) -> list[str]:
    problems = []
    z = results.get("zeroshot")
    if z and (z["same_top5_predictions"] != 1.0 or z["ldmclip"]["top1"] != z["openclip"]["top1"]):
        problems.append("zero-shot predictions differ")
    r = results.get("retrieval")
    if r:
        for ours, theirs, ties, queries in (
                ("ldmclip", "openclip_features_dense_metric", r["tied_competitors"],
                 {"image_to_text": r["images"], "text_to_image": r["captions"]}),
                ("one_caption_ldmclip", "one_caption_openclip_get_clip_metrics", r["tied_competitors_one_caption"],
                 {"image_to_text": r["images"], "text_to_image": r["images"]})):
            for key in (k for k in r[theirs] if k != "wall_s"):
                direction = key.split("_R@")[0].replace("_mean_rank", "").replace("_median_rank", "")
                # exact ties are ordered arbitrarily by argsort: a mean rank may move by ties / queries
                slack = ties[direction] / queries[direction] if key.endswith("mean_rank") else 0
                if abs(r[ours][key] - r[theirs][key]) > slack + 1e-9:
                    problems.append(f"retrieval {key}: {ours} {r[ours][key]} != {theirs} {r[theirs][key]}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
