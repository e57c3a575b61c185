"""``ldmclip pack``: a caption table or an image folder into webdataset shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UserError
from ..core.files import human_bytes
from ..data.samples import SampleStats
from ..data.writer import REENCODE_MODES, iter_image_folder, iter_table, write_shards
from .common import (add_column_options, add_image_root_option, add_out_option, add_quiet_option,
                     add_split_option, add_workers_option, parse_sep)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run"]

HELP = "pack a caption table or an image folder into webdataset shards"
DESCRIPTION = ("Write webdataset shards (img2dataset layout: KEY.jpg + KEY.txt) from a CSV/TSV/parquet caption "
               "table or a folder of images with .txt captions, so training can stream them.")
EPILOG = """examples:
  ldmclip pack flickr8k/captions.csv --images flickr8k/images --split flickr8k/train.txt --out shards/
  ldmclip pack photos/ --out shards/ --max-size 512 --workers 4
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a table (.csv, .tsv, .parquet) of image paths and captions, or a "
                                      "folder of images with sidecar .txt captions (a.jpg + a.txt)")
    # The output folder was once a second positional: still accepted, not shown.
    parser.add_argument("legacy_out", nargs="?", default=None, help=argparse.SUPPRESS)
    add_out_option(parser, "folder to write the shards to", required=False, metavar="DIR")
    table = parser.add_argument_group("table input")
    add_image_root_option(table, "folder the image paths of the table are relative to (default: the table's folder)")
    add_column_options(table, image=("image", "column of image paths"), caption=("caption", "column of captions"))
    add_split_option(table, "text file of image names, one per line; only those rows are packed")
    table.add_argument("--sep", default=None,
                       help="delimiter of a text table whose suffix does not say it ('\\t' or 'tab' for a tab)")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    shards.add_argument("--prefix", default="shard", help="shard file names: PREFIX-00000.tar")
    shards.add_argument("--reencode", choices=REENCODE_MODES, default="auto",
                        help="auto: keep JPEG bytes, re-encode other formats as JPEG; always: re-encode "
                             "everything; never: store the source bytes as they are")
    shards.add_argument("--max-size", type=int, default=None,
                        help="downscale (re-encode) images whose shorter side exceeds this many pixels")
    shards.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    shards.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not decode every image to check it (faster; corrupt files get packed)")
    add_workers_option(shards, 0, "processes decoding/re-encoding images in parallel (0: none)")
    shards.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards")
    add_quiet_option(shards)


def _output(args: argparse.Namespace) -> str:
    if args.out and args.legacy_out and args.out != args.legacy_out:
        raise UserError(f"two output folders given ({args.legacy_out} and --out {args.out}); pass only --out")
    out = args.out or args.legacy_out
    if not out:
        raise UserError("pass --out DIR: the folder to write the shards to")
    return out


def run(args: argparse.Namespace) -> int:
    """Pack a table or an image folder into shards; print a summary. Returns 0 when at least one sample
    was written, 1 otherwise."""
    from ..data.table import CaptionTable

    output = _output(args)
    source = Path(args.input)
    stats = SampleStats()
    if source.is_dir():
        if args.split:
            raise UserError("--split applies to table inputs, not to image folders")
        total, items = iter_image_folder(source)
        what = f"{total} images in {source}"
    else:
        table = CaptionTable(source, args.images, None, image_column=args.image_column,
                             caption_column=args.caption_column, split_file=args.split, sep=parse_sep(args.sep))
        total, items = len(table), iter_table(table, stats)
        what = f"{total} rows of {source}"
    print(f"packing {what} into {output}", file=sys.stderr)
    shards = write_shards(items, output, prefix=args.prefix, max_per_shard=args.per_shard,
                          reencode=args.reencode, max_size=args.max_size, quality=args.quality,
                          verify=args.verify, workers=args.workers, overwrite=args.overwrite, stats=stats,
                          progress=not args.quiet, total=total)
    size = sum(p.stat().st_size for p in shards)
    if shards:
        names = shards[0].name if len(shards) == 1 else f"{shards[0].name} .. {shards[-1].name}"
        print(f"wrote {stats.good} samples in {len(shards)} shard(s) to {output} ({names}, {human_bytes(size)})")
    else:
        print(f"wrote nothing to {output}")
    if stats.skipped:
        reasons = ", ".join(f"{r} {n}" for r, n in stats.counts.most_common())
        print(f"skipped {stats.skipped} sample(s): {reasons}")
    else:
        print("skipped 0 samples")
    return 0 if shards else 1
