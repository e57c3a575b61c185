"""Train the same small CLIP on Flickr8k with ldmclip and with OpenCLIP's own trainer, side by side.

Both runs use the same model config, training images (the 6,000 of the standard split, 5 captions
each), batch size, number of steps, learning-rate schedule, weight decay, gradient clipping,
precision, data workers and seed. Both final models are then scored by the same code on the
standard test protocol (1,000 images × 5,000 captions, recall@1/5/10 both ways), and the table
reports recall and wall time.

    python benchmarks/flickr8k_train.py                       # the README recipe, both trainers (~18 min)
    python benchmarks/flickr8k_train.py --seed 1              # the same with another seed
    python benchmarks/flickr8k_train.py --steps 3 --batch-size 8 --eval-images 50   # smoke test

Needs open-clip-torch 3.3.0 (with its ``open_clip_train`` package) and pandas; the data lives in
``../shared/data/flickr8k`` or ``$LDMCLIP_DATA/flickr8k``.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import find_flickr8k, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def require_flickr8k() -> Path:
    flickr = find_flickr8k()
    if flickr is None:
        raise SystemExit("Flickr8k not found: set LDMCLIP_DATA to the folder that holds flickr8k/")
    return flickr


def openclip_train_csv(flickr: Path, out: Path) -> int:
    """OpenCLIP's CsvDataset wants a tab-separated file of absolute image paths and captions."""
    keep = set((flickr / "train.txt").read_text().split())
    rows = 0
    with open(flickr / "captions.csv", newline="", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        dst.write("filepath\ttitle\n")
        for row in csv.DictReader(src):
            if row["image"] in keep:
                caption = " ".join(row["caption"].split())
                dst.write(f"{flickr / 'images' / row['image']}\t{caption}\n")
                rows += 1
    return rows


def run_ldmclip(args, flickr: Path, out: Path, steps: int) -> float:
    """ldmclip's run: the shared settings, then ``--ldmclip-args`` (later options win)."""
    command = [sys.executable, "-m", "ldmclip", "train", "--model", args.model, "--data", str(flickr / "captions.csv"),
               "--images", str(flickr / "images"), "--split", str(flickr / "train.txt"), "--steps", str(steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--wd", str(args.wd),
               "--warmup", str(args.warmup), "--grad-clip", "1.0", "--precision", args.precision,
               "--workers", str(args.workers), "--seed", str(args.seed), "--eval-every", "0", "--save-every", "0",
               "--out", str(out), "--quiet", *shlex.split(args.ldmclip_args)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def run_openclip(args, train_csv: Path, out: Path, epochs: int) -> float:
    config = REPO / "src" / "ldmclip" / "model_configs" / f"{args.model}.json"
    script = (
        "import sys, open_clip\n"
        f"open_clip.add_model_config({str(config)!r})\n"
        "from open_clip_train.main import main\n"
        "main(sys.argv[1:])\n"
    )
    command = [sys.executable, "-c", script, "--train-data", str(train_csv), "--dataset-type", "csv",
               "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
               "--model", args.model, "--batch-size", str(args.batch_size), "--epochs", str(epochs),
               "--lr", str(args.lr), "--wd", str(args.wd), "--warmup", str(args.warmup), "--grad-clip-norm", "1.0",
               "--precision", "amp_bf16" if args.precision == "amp_bf16" else "fp32", "--workers", str(args.workers),
               "--seed", str(args.seed), "--device", "cpu", "--logs", str(out), "--name", "run",
               "--save-frequency", "1", "--delete-previous-checkpoint", "--report-to", "", "--log-every-n-steps", "50"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def test_recall(model_name: str, weights: Path, flickr: Path, max_images: int | None) -> dict[str, float]:
    """Recall on the test split, scored by one piece of code (the trainer's validation) for both runs."""
    import ldmclip
    from ldmclip.data import CaptionTable
    from ldmclip.train.data import table_retrieval_validation
    from ldmclip.transforms import PreprocessConfig, image_transform

    model = ldmclip.create_model(model_name, pretrained=weights).eval()
    transform = image_transform(PreprocessConfig(image_size=model.image_size), is_train=False)
    table = CaptionTable(flickr / "captions.csv", flickr / "images", transform, split_file=flickr / "test.txt")
    validation = table_retrieval_validation(table, ldmclip.get_tokenizer(model_name), max_images)
    return validation.evaluate(model, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-T-8-64")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the 30,000 training pairs")
    parser.add_argument("--steps", type=int, help="override: steps per run (one OpenCLIP epoch is trimmed to it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--precision", default="amp_bf16", choices=["amp_bf16", "fp32"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=None, help="score on the first N test images only")
    parser.add_argument("--ldmclip-epochs", type=float,
                        help="ldmclip's passes over the data (default: --epochs): spend the time it saves on more")
    parser.add_argument("--ldmclip-args", default="",
                        help="more `ldmclip train` options for ldmclip's run only (its recipe), e.g. '--lr 3e-3'")
    parser.add_argument("--only", choices=["ldmclip", "openclip"], help="run one side only")
    parser.add_argument("--json", help="write the results here ('-': standard output)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)

    flickr = require_flickr8k()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flickr8k-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_csv = workdir / "train_openclip.tsv"
    steps_per_epoch = openclip_train_csv(flickr, train_csv) // args.batch_size
    if args.steps:  # OpenCLIP counts epochs: use a subset CSV holding exactly steps × batch rows
        lines = train_csv.read_text(encoding="utf-8").splitlines()
        train_csv.write_text("\n".join(lines[: 1 + args.steps * args.batch_size]) + "\n", encoding="utf-8")
        steps, epochs = args.steps, 1
    else:
        steps, epochs = args.epochs * steps_per_epoch, args.epochs
    ldmclip_steps = steps if args.steps or args.ldmclip_epochs is None else round(args.ldmclip_epochs * steps_per_epoch)
    results: dict[str, dict] = {}
    if args.only in (None, "ldmclip"):
        seconds = run_ldmclip(args, flickr, workdir / "ldmclip", ldmclip_steps)
        weights = workdir / "ldmclip" / "final" / "open_clip_model.safetensors"
        results["ldmclip"] = {"wall_s": seconds, **test_recall(args.model, weights, flickr, args.eval_images)}
    if args.only in (None, "openclip"):
        seconds = run_openclip(args, train_csv, workdir / "openclip", epochs)
        weights = sorted((workdir / "openclip" / "run" / "checkpoints").glob("epoch_*.pt"))[-1]
        results["openclip"] = {"wall_s": seconds, **test_recall(args.model, weights, flickr, args.eval_images)}
    for row in results.values():
        row["recall_sum"] = 100 * sum(v for k, v in row.items() if "R@" in k)
    recipe = f" ({args.ldmclip_args})" if args.ldmclip_args else ""
    print(f"\nFlickr8k, {args.model}, batch {args.batch_size}, {args.precision}, seed {args.seed}: "
          f"ldmclip {ldmclip_steps} steps{recipe}, OpenCLIP {steps} steps")
    keys = ["wall_s"] + [k for k in next(iter(results.values())) if "R@" in k] + ["recall_sum"]
    print(f"{'':10}" + "".join(f"{k:>20}" for k in keys))
    for name, row in results.items():
        print(f"{name:10}" + "".join(f"{row[k]:>20.3f}" for k in keys))
    if len(results) == 2:
        print(f"recall sum ldmclip / OpenCLIP: {results['ldmclip']['recall_sum'] / results['openclip']['recall_sum']:.2f}"
              f", wall time ldmclip / OpenCLIP: {results['ldmclip']['wall_s'] / results['openclip']['wall_s']:.2f}")
    if args.json:
        write_json(args.json, {"steps": steps, "ldmclip_steps": ldmclip_steps,
                               "args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
