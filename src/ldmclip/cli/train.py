"""``ldmclip train``: one flag per :class:`~ldmclip.train.config.TrainConfig` field, generated from the
dataclass so that the flags and the config can never drift apart."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, get_type_hints

from ..train.config import TrainConfig
from .common import add_hidden_alias, parse_bool

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "config_from_args", "run"]

HELP = "train a CLIP model (no options: a small model on synthetic data)"
DESCRIPTION = ("Train CLIP with the symmetric contrastive loss. Writes metrics.jsonl, TensorBoard events, "
               "resumable checkpoints, a PNG of the training curves and the final model (OpenCLIP hub layout) "
               "into one run folder.")
EPILOG = """examples:
  ldmclip train
      a small model on built-in synthetic scenes (a few minutes on a laptop CPU)
  ldmclip train --model ViT-S-16-128 --data flickr8k/captions.csv --images flickr8k/images \\
      --split flickr8k/train.txt --val-data flickr8k/captions.csv --val-split flickr8k/test.txt --epochs 10
  torchrun --nproc-per-node 8 -m ldmclip train --model ViT-L-14 --data 'shards/{00000..41407}.tar' --steps 100000
  ldmclip train --out runs/a --resume latest     continue a stopped run exactly where it was
"""

# Fields whose flag is not the field name (DESIGN.md's conventions): (flag, old spellings kept as aliases).
_FLAGS = {"output": ("--out", ("--output",), "DIR"), "images": ("--images", ("--image-root",), "DIR"),
          "split": ("--split", ("--split-file",), "FILE"), "param_groups": ("--param-groups", (), "FILE"),
          "ema": ("--ema", (), "DECAY")}


def _optional(kind: type) -> Callable[[str], Any]:
    """A parser of ``kind`` where ``none``/``null``/empty mean None (to switch a feature off)."""
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default once; ``%`` escaped (argparse %-formats help texts)."""
    text = f.metadata["help"]
    if "default" not in text and f.default is not None:
        default = "yes" if f.default is True else "no" if f.default is False else f.default
        text = f"{text} (default: {default})"
    return text.replace("%", "%%")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    # --quiet is the convention; --progress yes|no (the old flag) still works.
    parser.add_argument("--quiet", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bar")
    add_hidden_alias(parser, "--progress", "progress", nargs="?", const=True, type=parse_bool)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, plus ``--config FILE``. Every default is None, so that
    :func:`config_from_args` can tell a flag given on the command line from one left out."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file setting any of the options below "
                                                         "(flags given on the command line win)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "progress":
            _add_progress(parser)
            continue
        flag, aliases, metavar = _FLAGS.get(f.name, ("--" + f.name.replace("_", "-"), (), None))
        kind = hints[f.name]
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if metavar:
            extra["metavar"] = metavar
        if kind is bool:
            extra.update(nargs="?", const=True, type=parse_bool, metavar="yes|no")
        else:
            base = next(t for t in (int, float, str) if t in getattr(kind, "__args__", (kind,)))
            extra.update(type=_optional(base))
        parser.add_argument(flag, dest=f.name, default=None, help=_help(f), **extra)
        for alias in aliases:
            add_hidden_alias(parser, alias, f.name, **extra)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` file, then the flags given."""
    values: dict[str, Any] = TrainConfig.from_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return TrainConfig(**values).validate()


def run(args: argparse.Namespace) -> int:
    """Train; print the summary."""
    from ..train import train
    from ..train.loop import format_summary

    result = train(config_from_args(args))  # a TrainingError is a UserError: one line
    print(format_summary(result))
    return 0
