"""Fine-tuning on a shifted task without losing the original ability: which recipe keeps it?

1. Train a small CLIP on Flickr8k's train split (``ldmclip train``): the "start" model.
2. Fine-tune it on CIFAR-10 class captions ("a photo of a {class}") from the train half of
   ``cifar10-test`` with: plain fine-tuning, ``--lock-image``, ``--layer-decay 0.75``, ``--ema 0.999``.
3. WiSE-FT: ``ldmclip merge start plain --sweep ...``, the alpha chosen on validation data that no
   row is scored on (Flickr8k's dev split and a held-back slice of the CIFAR train half).
4. Score every row with ``ldmclip eval``: Flickr8k retrieval (test split) and CIFAR-10 zero-shot
   (the held-out half, never trained on).

    python benchmarks/finetune_shift.py                      # small defaults (minutes on a CPU)
    python benchmarks/finetune_shift.py --pretrain-steps 3000 --finetune-steps 500 --json out.json
    python benchmarks/finetune_shift.py --pretrain-steps 2 --finetune-steps 2 --batch-size 8 \\
        --train-per-class 8 --val-per-class 2 --heldout-per-class 4 --eval-images 20 --sweep 0,1   # smoke

The data lives in ``../shared/data`` or ``$LDMCLIP_DATA`` (``flickr8k/`` and ``cifar10-test/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import data_root, find_flickr8k, write_json  # noqa: E402

RECIPES = {  # row name -> the extra `ldmclip train` options of its fine-tune
    "plain": [],
    "lock-image": ["--lock-image"],
    "layer-decay 0.75": ["--layer-decay", "0.75"],
    "ema 0.999": ["--ema", "0.999"],
}
CAPTION = "a photo of a {}"


def find_cifar10() -> Path | None:
    root = data_root()
    return root / "cifar10-test" if root and (root / "cifar10-test" / "airplane").is_dir() else None


def write_cifar_tables(cifar: Path, out: Path, train: int, val: int, heldout: int) -> dict[str, Path]:
    """Per class (file order): the first ``train`` images become captions to fine-tune on, the next
    ``val`` the WiSE-FT selection set, and ``heldout`` images of the second half (never trained on) the
    zero-shot test. Tables hold paths relative to ``cifar`` and the class name."""
    classes = sorted(p.name for p in cifar.iterdir() if p.is_dir())
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "heldout": []}
    for name in classes:
        files = sorted(p.name for p in (cifar / name).iterdir() if p.suffix.lower() in (".jpg", ".png"))
        half = len(files) // 2
        if train + val > half or heldout > len(files) - half:
            raise SystemExit(f"cifar10-test/{name} has {len(files)} images: too few for the sizes asked")
        picks = {"train": files[:train], "val": files[train:train + val], "heldout": files[half:half + heldout]}
        for part, names in picks.items():
            rows[part] += [(f"{name}/{file}", name) for file in names]
    tables = {}
    for part, part_rows in rows.items():
        tables[part] = out / f"cifar_{part}.csv"
        with open(tables[part], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption" if part == "train" else "label"])
            writer.writerows((path, CAPTION.format(label) if part == "train" else label) for path, label in part_rows)
    return tables


def first_images(split: Path, n: int | None, out: Path) -> Path:
    """A split file of the first ``n`` images of ``split`` (all of them when ``n`` is None)."""
    if n is None:
        return split
    out.write_text("\n".join(split.read_text().split()[:n]) + "\n")
    return out


def ldmclip(*arguments: str) -> float:
    """Run ``python -m ldmclip ...`` in a fresh process (its tables hidden, its errors shown); its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldmclip", *arguments], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train(args, out: Path, data: Path, images: Path, steps: int, extra: list[str], split: Path | None = None,
          pretrained: Path | None = None, lr: float | None = None) -> float:
    command = ["train", "--model", args.model, "--data", str(data), "--images", str(images), "--steps", str(steps),
               "--batch-size", str(args.batch_size), "--lr", str(lr or args.lr), "--precision", args.precision,
               "--workers", str(args.workers), "--seed", str(args.seed), "--eval-every", "0", "--save-every", "0",
               "--out", str(out), "--quiet", *extra]
    if split is not None:
        command += ["--split", str(split)]
    if pretrained is not None:
        command += ["--pretrained", str(pretrained)]
    return ldmclip(*command)


def evaluate(args, folder: Path, flickr: Path, test_split: Path, heldout: Path, cifar: Path, out: Path) -> dict:
    """Flickr8k test retrieval and CIFAR-10 held-out zero-shot of one model, as ``ldmclip eval`` reports."""
    ldmclip("eval", "--model", f"local-dir:{folder}", "--retrieval", str(flickr / "captions.csv"),
            "--images", str(flickr / "images"), "--split", str(test_split), "--precision", args.precision,
            "--workers", str(args.workers), "--quiet", "--json", str(out))
    retrieval = json.loads(out.read_text())["retrieval"]
    zero_out = out.with_name(out.stem + "_cifar.json")
    ldmclip("eval", "--model", f"local-dir:{folder}", "--zeroshot", str(heldout), "--images", str(cifar),
            "--templates", args.templates, "--precision", args.precision, "--workers", str(args.workers),
            "--quiet", "--json", str(zero_out))
    zeroshot = json.loads(zero_out.read_text())["zeroshot"]
    recalls = {k: v for k, v in retrieval.items() if "_R@" in k}
    return {"flickr_recall_sum": 100 * sum(recalls.values()), **{f"flickr_{k}": 100 * v for k, v in recalls.items()},
            "cifar_top1": 100 * zeroshot["top1"]}


def wise_ft(args, start: Path, plain: Path, flickr: Path, val_split: Path, tables: dict[str, Path], cifar: Path,
            out: Path) -> float:
    """``ldmclip merge --sweep`` between the start and the plain fine-tune, alpha chosen on validation
    data (Flickr8k dev captions, CIFAR's held-back train slice); returns the chosen alpha."""
    # merge --sweep reads one --images root: the CIFAR selection table gets absolute paths instead
    val_abs = tables["val"].with_name("cifar_val_abs.csv")
    with open(tables["val"], newline="") as src, open(val_abs, "w", newline="") as dst:
        writer = csv.writer(dst)
        for i, row in enumerate(csv.reader(src)):
            writer.writerow(row if i == 0 else [str(cifar / row[0]), row[1]])
    ldmclip("merge", str(start), str(plain), "--sweep", args.sweep, "--zeroshot", str(val_abs),
            "--retrieval", str(flickr / "captions.csv"), "--images", str(flickr / "images"), "--split", str(val_split),
            "--templates", args.templates, "--precision", args.precision, "--workers", str(args.workers), "--quiet",
            "--out", str(out))
    return json.loads((out / "sweep.json").read_text())["best_alpha"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-T-8-64")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="steps of the Flickr8k start model")
    parser.add_argument("--start", type=Path, help="use this Flickr8k-trained model folder (a run's final/, e.g. "
                                                    "from benchmarks/flickr8k_train.py) instead of training one")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps of each CIFAR-10 fine-tune")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr of the start model")
    parser.add_argument("--finetune-lr", type=float, default=2e-4, help="peak lr of the fine-tunes")
    parser.add_argument("--train-per-class", type=int, default=400, help="CIFAR images per class to fine-tune on")
    parser.add_argument("--val-per-class", type=int, default=100, help="CIFAR images per class for WiSE-FT's alpha")
    parser.add_argument("--heldout-per-class", type=int, default=500, help="CIFAR zero-shot test images per class")
    parser.add_argument("--eval-images", type=int, default=None, help="Flickr8k test (and dev) images to score on")
    parser.add_argument("--sweep", default="0,0.25,0.5,0.75,1", help="WiSE-FT alphas")
    parser.add_argument("--templates", default="simple", help="zero-shot templates (as ldmclip eval)")
    parser.add_argument("--precision", default="fp32", choices=["amp_bf16", "fp32"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here ('-': standard output)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)

    if args.start is not None and not (args.start / "open_clip_config.json").is_file():
        raise SystemExit(f"--start {args.start}: not a model folder (no open_clip_config.json); pass a run's final/")
    flickr, cifar = find_flickr8k(), find_cifar10()
    if flickr is None or cifar is None:
        raise SystemExit("Flickr8k or cifar10-test not found: set LDMCLIP_DATA to the folder that holds both")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-shift-"))
    work.mkdir(parents=True, exist_ok=True)
    tables = write_cifar_tables(cifar, work, args.train_per_class, args.val_per_class, args.heldout_per_class)
    test_split = first_images(flickr / "test.txt", args.eval_images, work / "flickr_test.txt")
    val_split = first_images(flickr / "dev.txt", args.eval_images, work / "flickr_dev.txt")

    if args.start is not None:
        seconds, start = {"start": 0.0}, args.start
    else:
        seconds = {"start": train(args, work / "start", flickr / "captions.csv", flickr / "images",
                                  args.pretrain_steps, [], split=flickr / "train.txt")}
        start = work / "start" / "final"
    for name, extra in RECIPES.items():
        seconds[name] = train(args, work / name.replace(" ", "_"), tables["train"], cifar, args.finetune_steps, extra,
                              pretrained=start, lr=args.finetune_lr)
    folders = {"start": start, **{name: work / name.replace(" ", "_") / "final" for name in RECIPES}}
    before = time.perf_counter()
    alpha = wise_ft(args, start, folders["plain"], flickr, val_split, tables, cifar, work / "wise_ft")
    seconds["wise-ft"] = time.perf_counter() - before
    folders[f"wise-ft (alpha {alpha:g})"] = work / "wise_ft"
    results = {name: {"seconds": round(seconds.get(name.split(" (")[0], 0.0), 1),
                      **evaluate(args, folder, flickr, test_split, tables["heldout"], cifar,
                                 work / f"eval_{name.split(' (')[0].replace(' ', '_')}.json")}
               for name, folder in folders.items()}

    origin = f"start {args.start}" if args.start else f"start {args.pretrain_steps} steps on Flickr8k"
    print(f"\nFine-tuning shift: {args.model}, {origin}, "
          f"fine-tunes {args.finetune_steps} steps on CIFAR-10 captions, batch {args.batch_size}, seed {args.seed}")
    print(f"{'':28}{'Flickr8k R sum':>16}{'CIFAR-10 top-1':>16}{'train s':>10}")
    for name, row in results.items():
        print(f"{name:28}{row['flickr_recall_sum']:>16.1f}{row['cifar_top1']:>16.1f}{row['seconds']:>10.1f}")
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "wise_ft_alpha": alpha,
                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
