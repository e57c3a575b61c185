"""``ldmclip merge``: WiSE-FT, the weight-space interpolation of two checkpoints of one architecture
(typically the original model and its fine-tuned copy), written in the OpenCLIP hub layout.

With ``--sweep`` it evaluates several alphas (``ldmclip.eval.sweep_interpolation``), writes ``sweep.json``
and ``sweep.png`` beside the weights and keeps the model at the best alpha."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoints import interpolate_state_dicts
from ..core.errors import UserError
from ..core.files import fsync_dir, temp_name, write_json_atomic
from ..core.formats import carries_weights
from ..data.samples import default_workers
from ..eval.sweep import RECALL_KEYS, SELECT_METRICS, metric_of, parse_alphas
from ..models.clip import CLIP
from ..registry import create_model
from .common import (add_column_options, add_device_option, add_hidden_alias, add_image_root_option, add_out_option,
                     add_precision_option, add_quiet_option, add_split_option, add_workers_option)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "load_checkpoint", "merge_checkpoints"]

HELP = "interpolate two checkpoints of the same architecture (WiSE-FT): (1 - alpha) * A + alpha * B"
DESCRIPTION = ("Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): every floating tensor becomes "
               "(1 - alpha) * A + alpha * B; integer buffers are taken from A. A and B are checkpoints of the same "
               "architecture in any layout ldmclip reads (a run's final/ folder, an OpenCLIP hub folder, a "
               "transformers CLIPModel folder, local-dir:/hf-hub: names, or a weights file with --model). The "
               "result is written atomically in the OpenCLIP hub layout, with A's preprocessing. (Evaluating a "
               "With --sweep, each alpha is evaluated in memory (zero-shot top-1 on --zeroshot, the six recalls on "
               "--retrieval: the numbers 'ldmclip eval' prints), sweep.json and sweep.png (accuracy against alpha) "
               "are written into --out, and the model kept there is the one at the best alpha (--select).")
EPILOG = """examples:
  ldmclip merge runs/pretrained/final runs/finetuned/final --alpha 0.5 --out merged
  ldmclip merge original.safetensors finetuned.safetensors --model ViT-B-32 --alpha 0.3 --out merged
  ldmclip merge runs/pretrained/final runs/finetuned/final --sweep 0,0.25,0.5,0.75,1 \\
      --zeroshot cifar10-test/ --retrieval flickr8k/captions.csv --images flickr8k/images \\
      --split flickr8k/test.txt --out wise-ft
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the first checkpoint (alpha 0): a folder, local-dir:PATH, "
                                               "hf-hub:org/repo, or a weights file (then give --model)")
    parser.add_argument("b", metavar="B", help="the second checkpoint (alpha 1), in any of the same forms")
    parser.add_argument("--alpha", type=float, default=None,
                        help="weight of B, from 0 (A itself) to 1 (B itself) (default: 0.5; not with --sweep)")
    parser.add_argument("--model", default=None, help="the architecture (a packaged config name or a JSON config) "
                                                      "of A and B when they are bare weights files")
    add_out_option(parser, "the folder to write the merged model to (OpenCLIP hub layout); must not exist yet, "
                           "or be empty", metavar="DIR")
    _add_sweep_arguments(parser)


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    sweep = parser.add_argument_group("sweep of alphas (WiSE-FT's search for the best alpha)")
    sweep.add_argument("--sweep", metavar="A1,A2,...", default=None,
                       help="evaluate these alphas (e.g. 0,0.25,0.5,0.75,1) and keep the model at the best one; "
                            "needs --zeroshot and/or --retrieval")
    sweep.add_argument("--zeroshot", metavar="DIR|TABLE|SHARDS", default=None,
                       help="zero-shot data, as for 'ldmclip eval': a folder of class folders, a table of image "
                            "paths and labels, or webdataset shards with a 'cls' member")
    add_hidden_alias(sweep, "--zero-shot", "zeroshot")
    sweep.add_argument("--classnames", metavar="FILE|imagenet", default=None,
                       help="class names of --zeroshot, as for 'ldmclip eval' (default: the folder names / labels)")
    sweep.add_argument("--templates", metavar="openai|simple|FILE", default=None,
                       help="prompt templates, as for 'ldmclip eval' (default: a CLIP_benchmark dataset's own, "
                            "else 'openai')")
    sweep.add_argument("--retrieval", metavar="TABLE|SHARDS", default=None,
                       help="retrieval data, as for 'ldmclip eval': a caption table or webdataset shards (jpg + txt)")
    add_split_option(sweep, "evaluate only the --retrieval images listed in this file, one per line")
    add_image_root_option(sweep, "folder the image paths in the tables are relative to (default: the table's folder)")
    add_column_options(sweep, image=(None, "image-path column of the tables (default: as 'ldmclip eval')"),
                       caption=(None, "caption column of the retrieval table (default: as 'ldmclip eval')"),
                       label=(None, "label column of a zero-shot table (default: as 'ldmclip eval')"))
    sweep.add_argument("--select", choices=list(SELECT_METRICS), default="mean", metavar="METRIC",
                       help="the metric whose best alpha is kept: 'mean' (default) is the mean of zero-shot top-1 "
                            "and the mean of the six recalls (of whichever is measured); or one of "
                            f"{', '.join(SELECT_METRICS[1:])}")
    sweep.add_argument("--batch-size", type=int, default=64, help="images or captions per batch")
    add_precision_option(sweep)
    add_device_option(sweep)
    add_workers_option(sweep, default_workers())
    add_quiet_option(sweep)


def load_checkpoint(spec: str, model: str | None) -> CLIP:
    """A CLIP with the weights ``spec`` names: a folder, ``local-dir:``/``hf-hub:``, or a file with ``model``."""
    if carries_weights(spec):
        return create_model(spec)
    path = Path(spec)
    if path.is_dir():
        return create_model(f"local-dir:{path}")
    if not path.exists():
        raise UserError(f"{spec}: no such checkpoint file or folder")
    if model is None:
        raise UserError(f"{spec} is a weights file, which does not say its architecture: give --model NAME "
                        f"(a packaged config such as ViT-B-32, or a JSON config)")
    return create_model(model, pretrained=str(path))


def merge_checkpoints(a: CLIP, b: CLIP, alpha: float) -> CLIP:
    """A new CLIP with ``a``'s config and preprocessing and the interpolated weights."""
    if a.config.to_dict() != b.config.to_dict():
        differ = sorted(k for k, v in a.config.to_dict().items() if b.config.to_dict().get(k) != v)
        raise UserError(f"A and B are not the same architecture (their configs differ in {', '.join(differ)}); "
                        f"only checkpoints of one architecture can be merged")
    merged = CLIP(a.config)
    merged.preprocess_cfg = dict(a.preprocess_cfg)
    merged.load_state_dict(interpolate_state_dicts(a.state_dict(), b.state_dict(), alpha))
    return merged


def _checkpoint_name(spec: str, model: str | None) -> str:
    """The model name ``spec`` loads as (for its tokenizer): ``local-dir:`` for a folder, ``model`` for a file."""
    if carries_weights(spec):
        return spec
    return f"local-dir:{spec}" if Path(spec).is_dir() else str(model)


def _write_folder_atomically(model: CLIP, out: Path, extra: Callable[[Path], None] | None = None) -> None:
    """``save_pretrained`` (and ``extra(folder)``, e.g. the sweep's files) into a temporary sibling folder,
    then one rename: ``out`` is whole or absent."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge
    try:
        model.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def _sweep_given(args: argparse.Namespace) -> bool:
    """Refuse sweep-only options without --sweep (they would be silently ignored) and --alpha with it."""
    eval_options = [f"--{name.replace('_', '-')}" for name in ("zeroshot", "retrieval", "split", "images",
                                                                "classnames", "templates")
                    if getattr(args, name, None)]
    if args.sweep is None:
        if eval_options:
            raise UserError(f"{', '.join(eval_options)} evaluate(s) a sweep of alphas: add --sweep A1,A2,... "
                            f"(e.g. --sweep 0,0.25,0.5,0.75,1)")
        return False
    if args.alpha is not None:
        raise UserError("--alpha and --sweep exclude each other: --sweep evaluates several alphas and keeps the best")
    if not args.zeroshot and not args.retrieval:
        raise UserError("--sweep needs data to evaluate on: pass --zeroshot DATA and/or --retrieval DATA")
    if args.split and not args.retrieval:
        raise UserError("--split selects images of the --retrieval table; there is none")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    return True


def run(args: argparse.Namespace) -> int:
    if _sweep_given(args):
        return _run_sweep(args)
    if args.alpha is None:
        args.alpha = 0.5
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be from 0 (A) to 1 (B), got {args.alpha:g}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the (slow) reads
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out or remove it")
    a, b = load_checkpoint(args.a, args.model), load_checkpoint(args.b, args.model)
    _write_folder_atomically(merge_checkpoints(a, b, args.alpha), out)
    print(f"merged {args.a} (x{1 - args.alpha:g}) and {args.b} (x{args.alpha:g}) into {out} (OpenCLIP hub layout)")
    print(f"  load it with ldmclip.create_model('local-dir:{out}')")
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table_header(rows_have: dict[str, bool]) -> str:
    cells = [f"{'alpha':>7}"]
    if rows_have["zeroshot"]:
        cells.append(f"{'top-1':>9}")
    if rows_have["retrieval"]:
        cells += [f"{key.replace('image_to_text_', 'i→t ').replace('text_to_image_', 't→i '):>10}"
                  for key in RECALL_KEYS] + [f"{'mean R':>9}"]
    cells.append(f"{'mean':>9}")
    return "".join(cells)


def _table_row(row: dict[str, Any]) -> str:
    cells = [f"{row['alpha']:>7g}"]
    if "zeroshot" in row:
        cells.append(f"{_percent(row['zeroshot']['top1']):>9}")
    if "retrieval" in row:
        cells += [f"{_percent(row['retrieval'][key]):>10}" for key in RECALL_KEYS]
        cells.append(f"{_percent(row['mean_recall']):>9}")
    cells.append(f"{_percent(row['mean']):>9}")
    return "".join(cells)


def _run_sweep(args: argparse.Namespace) -> int:
    """Evaluate each alpha in memory, write the best one's model with sweep.json and sweep.png into --out."""
    from ..core.devices import resolve_device
    from ..core.precision import autocast, resolve_precision
    from ..eval import plot_sweep, select_alpha, sweep_interpolation
    from .eval import open_eval_inputs
    from ..registry import get_tokenizer
    from ..transforms import PreprocessConfig, image_transform

    try:
        alphas = parse_alphas(args.sweep)
    except ValueError as error:
        raise UserError(f"--sweep: {error}") from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the (slow) evaluation
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out or remove it")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    # The inputs as 'ldmclip eval' opens them, so that alpha 0 and 1 give its numbers on A and B.
    zero_source, templates_name, templates, retrieval_source = open_eval_inputs(args)
    a, b = load_checkpoint(args.a, args.model), load_checkpoint(args.b, args.model)
    if a.config.to_dict() != b.config.to_dict():
        merge_checkpoints(a, b, 0.0)  # raises the error naming the differences
    preprocess = image_transform(PreprocessConfig.from_dict(a.preprocess_cfg), is_train=False)
    for source in (zero_source, retrieval_source):
        if source is not None:
            source.set_transform(preprocess)
    tokenizer = get_tokenizer(_checkpoint_name(args.a, args.model))

    print(f"ldmclip merge --sweep: {args.a} (alpha 0) and {args.b} (alpha 1) on {device}, {precision}")
    print(_table_header({"zeroshot": zero_source is not None, "retrieval": retrieval_source is not None}))
    sys.stdout.flush()

    def show(row: dict[str, Any]) -> None:
        print(_table_row(row))
        sys.stdout.flush()

    rows = sweep_interpolation(
        a, b, alphas, tokenizer, zero_shot=(zero_source, templates) if zero_source is not None else None,
        retrieval=retrieval_source, batch_size=args.batch_size, device=device, workers=args.workers,
        autocast=lambda: autocast(precision, device), progress=not args.quiet, on_alpha=show)
    try:
        best = select_alpha(rows, args.select)
    except ValueError as error:
        raise UserError(str(error)) from None
    report = {
        "a": args.a, "b": args.b, "select": args.select, "best_alpha": best["alpha"],
        "best_value": metric_of(best, args.select), "device": str(device), "precision": precision,
        "zeroshot_data": args.zeroshot, "templates": templates_name if zero_source is not None else None,
        "retrieval_data": args.retrieval, "split": args.split, "alphas": rows,
    }

    def write_sweep_files(folder: Path) -> None:
        write_json_atomic(folder / "sweep.json", report)
        plot_sweep(rows, folder / "sweep.png", best_alpha=best["alpha"])

    _write_folder_atomically(merge_checkpoints(a, b, best["alpha"]), out, write_sweep_files)
    print(f"best alpha by {args.select}: {best['alpha']:g} ({_percent(metric_of(best, args.select))}); "
          f"its model written to {out} (OpenCLIP hub layout)")
    print(f"  sweep: {out / 'sweep.json'}, plot: {out / 'sweep.png'}")
    print(f"  load it with ldmclip.create_model('local-dir:{out}')")
    return 0
