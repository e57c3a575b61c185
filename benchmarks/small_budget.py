"""How much does the built-in demo learn per CPU-minute? ``ldmclip train`` recipes at a small budget.

Two modes, both on the built-in synthetic scenes, each run a fresh ``ldmclip train`` process timed from
launch to exit (start-up, validation and the final save included, as a user waits for them):

    python benchmarks/small_budget.py --repeat 3                 # plain `ldmclip train`, three times
    python benchmarks/small_budget.py --variants --steps 600     # one run per recipe below, same budget
    python benchmarks/small_budget.py --variants --only baseline,'lr 1e-3' --steps 2   # smoke test

``--variants`` compares each recipe against the defaults at the same number of training samples (a
recipe that changes the batch size changes the steps to match), which is how the defaults of
``ldmclip train`` were chosen (README, "Faster learning per minute").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import write_json  # noqa: E402
from ldmclip.train.config import TrainConfig  # noqa: E402

DEFAULT_BATCH = TrainConfig.batch_size  # the variants that change it keep the samples seen equal
LOGIT_SCALE_RULE = "- pattern: logit_scale\n  lr: 1.0e-2\n"

VARIANTS: dict[str, list[str]] = {  # name -> the `ldmclip train` options that differ from the defaults
    "baseline": [],
    "lr 1e-3": ["--lr", "1e-3"],
    "lr 3e-4": ["--lr", "3e-4"],
    "warm-up 30": ["--warmup", "30"],
    "beta2 0.95": ["--beta2", "0.95"],
    "batch 32": ["--batch-size", "32"],
    "batch 128": ["--batch-size", "128"],
    # the demo's model until 2026-12-02, and FLIP's patch dropout, which needs a ViT's patches
    "ViT-T-8-64": ["--model", "ViT-T-8-64"],
    "ViT-T-8-64 patch dropout 0.5": ["--model", "ViT-T-8-64", "--patch-dropout", "0.5"],
    "logit_scale lr 1e-2": ["--param-groups", "{logit_scale_rule}"],
    "torch.compile": ["--compile"],
}


def batch_of(options: list[str]) -> int:
    return int(options[options.index("--batch-size") + 1]) if "--batch-size" in options else DEFAULT_BATCH


def run_train(out: Path, options: list[str]) -> dict:
    """One ``ldmclip train`` in a fresh process: its wall time and its final validation metrics."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldmclip", "train", "--out", str(out), "--quiet", *options], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(seconds, 1), "steps": summary["steps"],
            **{k: round(100 * v, 2) for k, v in summary["validation"].items()}}


def repeat_default(args, work: Path) -> dict:
    """Plain ``ldmclip train`` (only --out, --seed and, when given, --steps), ``--repeat`` times with seeds 0, 1, ..."""
    runs = []
    for seed in range(args.repeat):
        options = ["--seed", str(seed)] + (["--steps", str(args.steps)] if args.steps else [])
        runs.append(run_train(work / f"default_seed{seed}", options))
        print(f"seed {seed}: {runs[-1]['wall_s']:.0f} s, zero-shot {runs[-1]['zeroshot_colour_shape_top1']:.1f}%",
              flush=True)
    return {"runs": runs, "mean_wall_s": round(statistics.mean(r["wall_s"] for r in runs), 1),
            "mean_zeroshot_top1": round(statistics.mean(r["zeroshot_colour_shape_top1"] for r in runs), 2)}


def compare_variants(args, work: Path) -> dict:
    rule = work / "logit_scale_lr.yaml"
    rule.write_text(LOGIT_SCALE_RULE)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    rows = {}
    for name in names:
        options = [o.format(logit_scale_rule=rule) for o in VARIANTS[name]]
        steps = max(1, round(args.steps * DEFAULT_BATCH / batch_of(options)))
        rows[name] = {"options": " ".join(VARIANTS[name]),
                      **run_train(work / name.replace(" ", "_"), [*options, "--steps", str(steps),
                                                                  "--seed", str(args.seed)])}
        print(f"{name:22} {rows[name]['wall_s']:>7.0f} s  zero-shot {rows[name]['zeroshot_colour_shape_top1']:5.1f}%",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--repeat", type=int, default=3, help="runs of the plain default (seeds 0..N-1)")
    mode.add_argument("--variants", action="store_true", help="one run per recipe in VARIANTS instead")
    parser.add_argument("--only", help="with --variants: comma-separated names of the variants to run")
    parser.add_argument("--steps", type=int,
                        help=f"steps at batch {DEFAULT_BATCH} (default: ldmclip train's own default)")
    parser.add_argument("--seed", type=int, default=0, help="with --variants: the seed of every run")
    parser.add_argument("--json", help="write the results here ('-': standard output)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.variants and not args.steps:
        parser.error(f"--variants needs --steps (the budget every variant gets, in steps at batch {DEFAULT_BATCH})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="small-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    results = compare_variants(args, work) if args.variants else repeat_default(args, work)
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
