"""``ldmclip eval``: zero-shot classification and image<->text retrieval of a model, as a table and JSON."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.formats import carries_weights
from ..data.samples import default_workers
from .common import (TAG_HELP, STDOUT, add_column_options, add_device_option, add_hidden_alias, add_image_root_option,
                     add_json_option, add_model_options, add_precision_option, add_split_option,
                     add_quiet_option, add_workers_option, write_json_output)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "format_results"]

HELP = "zero-shot classification and image-text retrieval of a model"
DESCRIPTION = ("Evaluate a model: zero-shot classification (top-1, top-5, mean per-class accuracy, confusion "
               "matrix) and image<->text retrieval (recall@1/5/10, mean/median rank). Prints a table; --json "
               "writes the results as JSON.")
EPILOG = """examples:
  ldmclip eval --model ViT-B-32 --pretrained model.safetensors --zeroshot cifar10-test/
  ldmclip eval --model local-dir:runs/flickr8k/final --retrieval flickr8k/captions.csv \\
      --images flickr8k/images --split flickr8k/test.txt --json results.json
  ldmclip eval --model ViT-L-14 --pretrained hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K \\
      --zeroshot imagenet/val/ --classnames imagenet --templates openai

zero-shot data: a folder with one sub-folder of images per class (torchvision ImageFolder layout),
a CSV/TSV/parquet table of image paths and labels, or webdataset shards with a 'cls' label.
retrieval data: a caption table (one row per caption, Flickr/COCO style) or webdataset shards (jpg + txt).
CLIP_benchmark's webdatasets (clip_benchmark_export_wds) are read from the dataset folder, a split
folder or its shards: zero-shot with its classnames.txt and templates, retrieval with one caption per
line of each sample's txt.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_model_options(model, required=True,
                      pretrained_help="weights: a file (.safetensors/.bin/.pt), a checkpoint folder, "
                                      f"'hf-hub:org/repo' {TAG_HELP} (default: random weights, or the weights of a "
                                      "local-dir:/hf-hub: model)")
    zero = parser.add_argument_group("zero-shot classification")
    zero.add_argument("--zeroshot", metavar="DIR|TABLE|SHARDS",
                      help="a folder of class folders, a table of image paths and labels, or webdataset shards "
                           "with a 'cls' member")
    zero.add_argument("--classnames", metavar="FILE|imagenet",
                      help="class names: 'imagenet' (built in), a JSON list/object, or a text file with one name "
                           "per line (in class order) or 'KEY name' per line (e.g. WordNet id -> name). "
                           "Default: the folder names / label strings")
    zero.add_argument("--templates", default=None, metavar="openai|simple|FILE",
                      help="prompt templates: 'openai' (the 80 ImageNet prompts of the CLIP paper), 'simple' "
                           "(their 7-prompt subset), or a file with one template per line containing '{}'. "
                           "Default: a CLIP_benchmark dataset's own templates, else 'openai'")
    add_column_options(zero, label=(None, "label column of a zero-shot table (default: the first of label, "
                                          "class, cls, target)"))
    zero.add_argument("--confusion-matrix", metavar="PNG", default=None,
                      help="write the confusion matrix here (up to 50 classes; default: next to a --json file)")
    ret = parser.add_argument_group("retrieval")
    ret.add_argument("--retrieval", metavar="TABLE|SHARDS",
                     help="a caption table (CSV/TSV/parquet, one row per caption) or webdataset shards (jpg + txt)")
    add_split_option(ret, "evaluate only the images listed in this file, one per line (retrieval tables)")
    add_column_options(ret, caption=(None, "caption column of a retrieval table (default: the first of caption, "
                                           "title, text)"))
    data = parser.add_argument_group("data and run")
    add_image_root_option(data, "folder the image paths in the tables are relative to (default: the table's folder)")
    add_column_options(data, image=(None, "image-path column of the tables (default: the first of image, "
                                          "filepath, path, filename, file, image_path)"))
    data.add_argument("--batch-size", type=int, default=64, help="images or captions per batch")
    add_precision_option(data)
    add_device_option(data)
    add_workers_option(data, default_workers())
    add_quiet_option(data)
    add_json_option(data, "write the results as JSON to this file ('-': standard output, the table then goes "
                          "to standard error)")
    add_hidden_alias(data, "--out", "json")  # the old spelling of --json FILE


def _confusion_path(args: argparse.Namespace) -> Path | None:
    if args.confusion_matrix:
        return Path(args.confusion_matrix)
    if args.json and args.json != STDOUT:
        out = Path(args.json)
        return out.with_name(out.stem + "_confusion.png")
    return None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _skip_line(skipped: dict) -> str | None:
    if not skipped.get("skipped"):
        return None
    reasons = ", ".join(f"{reason} {n}" for reason, n in skipped["reasons"].items() if n)
    return f"  skipped: {skipped['skipped']} of {skipped['seen']} ({reasons})"


def format_results(results: dict[str, Any]) -> str:
    """The human-readable table ``ldmclip eval`` prints."""
    model = str(results["model"])
    if results.get("pretrained"):
        weights = f" ({results['pretrained']})"
    elif carries_weights(model):
        weights = ""  # the weights come with the model folder
    else:
        weights = " (random weights)"
    lines = [f"ldmclip eval: {model}{weights} on {results['device']}, {results['precision']}"]
    zs = results.get("zeroshot")
    if zs:
        lines += ["", f"zero-shot classification: {zs['data']}",
                  f"  {zs['num_images']} images, {zs['num_classes']} classes, {zs['num_templates']} templates",
                  f"  {'top-1':>8}{'top-5':>10}{'mean per-class':>17}",
                  f"  {_percent(zs['top1']):>8}{_percent(zs.get('top5')):>10}"
                  f"{_percent(zs['mean_per_class_accuracy']):>17}"]
        lines += [line for line in [_skip_line(zs["skipped"])] if line]
        if zs.get("excluded_classes"):
            excluded = zs["excluded_classes"]
            lines.append(f"  excluded {excluded['count']} class(es), {excluded['reason']}: {', '.join(excluded['names'][:10])}"
                         f"{', ...' if excluded['count'] > 10 else ''}")
        if zs.get("confusion_matrix_png"):
            lines.append(f"  confusion matrix: {zs['confusion_matrix_png']}")
    rt = results.get("retrieval")
    if rt:
        lines += ["", f"retrieval: {rt['data']}", f"  {rt['num_images']} images × {rt['num_captions']} captions",
                  f"  {'':<12}{'R@1':>8}{'R@5':>9}{'R@10':>9}{'mean rank':>11}{'median rank':>13}"]
        for key, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
            lines.append(f"  {label:<12}{_percent(rt[f'{key}_R@1']):>8}{_percent(rt[f'{key}_R@5']):>9}"
                         f"{_percent(rt[f'{key}_R@10']):>9}{rt[f'{key}_mean_rank']:>11.1f}"
                         f"{rt[f'{key}_median_rank']:>13.0f}")
        lines += [line for line in [_skip_line(rt["skipped"])] if line]
        for reason, n in rt.get("captions_skipped", {}).items():
            lines.append(f"  captions left out: {n} ({reason})")
        if rt.get("multiline_captions"):
            lines.append(f"  warning: {rt['multiline_captions']} caption(s) span several lines and were each read "
                         "as ONE caption; for CLIP_benchmark retrieval shards (one caption per line) pass the "
                         "dataset folder that holds dataset_type.txt")
    if results.get("json"):
        lines += ["", f"results written to {results['json']}"]
    return "\n".join(lines)


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def open_eval_inputs(args: argparse.Namespace) -> tuple[Any, str, Any, Any]:
    """``(zero-shot source, templates name, templates, retrieval source)`` of the --zeroshot / --retrieval
    options, opened as ``ldmclip eval`` opens them (also for ``ldmclip merge --sweep``, so that its alpha 0
    and 1 give eval's numbers). The model's image transform is set on the sources later."""
    from ..eval import load_templates, open_retrieval, open_zero_shot

    zero_source = (open_zero_shot(args.zeroshot, None, args.classnames, args.images, args.image_column,
                                  args.label_column) if args.zeroshot else None)
    # --templates wins; else the dataset's own (CLIP_benchmark), else OpenAI's 80.
    templates_name = args.templates or ("dataset" if zero_source is not None and zero_source.templates else "openai")
    templates = (None if zero_source is None else zero_source.templates if templates_name == "dataset"
                 else load_templates(templates_name))
    retrieval_source = (open_retrieval(args.retrieval, None, args.images, args.split, args.image_column,
                                       args.caption_column) if args.retrieval else None)
    return zero_source, templates_name, templates, retrieval_source


def run(args: argparse.Namespace) -> int:
    """Print the table, write ``--json``; return the exit status."""
    from ..core.devices import resolve_device
    from ..core.precision import autocast, resolve_precision
    from ..core.version import __version__
    from ..eval import evaluate_retrieval, evaluate_zero_shot
    from ..registry import create_model_and_transforms, get_tokenizer

    if not args.zeroshot and not args.retrieval:
        raise UserError("nothing to evaluate: pass --zeroshot DATA and/or --retrieval DATA")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if args.split and not args.retrieval:
        raise UserError("--split selects images of the --retrieval table; there is none")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    # Inputs first, the (possibly slow) model load last: a typo in a path fails at once. The data gets
    # the model's image transform once the model (and the preprocessing its checkpoint carries) is known.
    zero_source, templates_name, templates, retrieval_source = open_eval_inputs(args)
    model, _, preprocess = create_model_and_transforms(args.model, pretrained=args.pretrained, device=device)
    model.eval()
    tokenizer = get_tokenizer(args.model)
    for source in (zero_source, retrieval_source):
        if source is not None:
            source.set_transform(preprocess)

    results: dict[str, Any] = {
        "model": args.model, "pretrained": args.pretrained, "device": str(device), "precision": precision,
        "batch_size": args.batch_size, "ldmclip_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    run = dict(batch_size=args.batch_size, device=device, workers=args.workers,
               autocast=lambda: autocast(precision, device), progress=not args.quiet)
    if zero_source is not None:
        result = evaluate_zero_shot(model, tokenizer, zero_source, templates, confusion_png=_confusion_path(args),
                                    **run)
        result["templates"] = templates_name
        result["classnames"] = args.classnames or "folder names / labels"
        results["zeroshot"] = _public(result)
    if retrieval_source is not None:
        results["retrieval"] = _public(evaluate_retrieval(model, tokenizer, retrieval_source, **run))
    if args.json:
        write_json_output(args.json, results)
        if args.json != STDOUT:
            results["json"] = args.json
    # With --json -, standard output holds only the JSON.
    table = sys.stderr if args.json == STDOUT else sys.stdout
    print(format_results(results), file=table)
    table.flush()
    return 0
