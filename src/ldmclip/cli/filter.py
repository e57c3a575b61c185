"""``ldmclip filter``: new webdataset shards holding only the samples whose scores pass ``--where``."""

from __future__ import annotations

import argparse
import functools
import sys

from ..curate.filter import filter_shards
from .common import STDOUT, add_json_option, add_out_option, add_quiet_option, write_json_output

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run"]

HELP = "keep the samples whose CLIP scores pass --where, as new shards"
DESCRIPTION = ("Write new webdataset shards holding only the samples of SHARDS that the expression --where keeps, "
               "reading the scores that 'ldmclip embed' wrote (clip_score, width, height, one column per --head, "
               "and dup_keep / dup_group_size when near-duplicates were marked). Every member of a kept sample "
               "(jpg, txt, json, ...) is copied byte for byte, in input order. The output folder also gets "
               "decisions.parquet (every key: kept or why not), summary.json, sizes.json and histograms.png. "
               "Interrupted runs resume: rerun the same command.")
EPILOG = """examples:
  ldmclip filter 'shards/{00000..00099}.tar' --scores emb/ --where "clip_score >= 0.28" --out kept/
  ldmclip filter 'shards/{00000..00099}.tar' --scores emb/ --where "clip_score >= 0.28 and aesthetic >= 5" --out kept/
  ldmclip filter 'shards/{00000..00099}.tar' --scores emb/ --where "dup_keep" --out dedup/
  ldmclip filter 'shards/*.tar' --scores emb/ --where "width >= 512 and height >= 512 and not dup_group_size > 3" --out big/

expressions:
  comparisons < <= > >= == != (also chained: 0.2 <= clip_score < 0.9), 'in [..]', and / or / not,
  parentheses, numbers, strings, True / False, and the column names of the scores. A mistyped column
  or bad syntax is refused before anything is read, with the list of columns.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS",
                        help="input webdataset shards: paths, or a brace pattern such as 'shards/{00000..00099}.tar'")
    parser.add_argument("--scores", required=True, metavar="DIR", help="the folder 'ldmclip embed --out' wrote")
    parser.add_argument("--where", required=True, metavar="EXPR",
                        help="which samples to keep, e.g. \"clip_score >= 0.28 and aesthetic >= 5\" (see below)")
    add_out_option(parser, "a new folder for the kept shards (00000.tar, ...) and the report files", metavar="DIR")
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N", help="kept samples per output shard")
    add_quiet_option(parser)
    add_json_option(parser, "also write the summary as JSON to PATH ('-': standard output)")


def run(args: argparse.Namespace) -> int:
    """Filter; print a summary. Returns 0 when some sample was kept, 1 when none was."""
    shards = args.shards[0] if len(args.shards) == 1 else list(args.shards)
    report = filter_shards(shards, args.scores, args.where, args.out, shard_size=args.shard_size,
                           progress=not args.quiet)
    summary = report.summary
    # With --json - the JSON is standard output; the words then go to stderr.
    say = functools.partial(print, file=sys.stderr if args.json == STDOUT else sys.stdout)
    total = summary["input_samples"]
    share = f" ({100 * summary['kept'] / total:.1f}%)" if total else ""
    outputs = summary["output_shards"]
    names = "" if not outputs else f" ({outputs[0]})" if len(outputs) == 1 else f" ({outputs[0]} .. {outputs[-1]})"
    say(f"kept {summary['kept']} of {total} samples{share} in {len(outputs)} shard(s){names} in {report.out}")
    if report.resumed:
        say(f"{len(report.resumed)} shard(s) were already written by an earlier run; {len(report.written)} written now")
    for reason, count in summary["dropped_by_reason"].items():
        say(f"  dropped {count}: {reason}")
    for url, problem in summary["shard_problems"].items():
        say(f"  problem with {url}: {problem}")
    say(f"every key's decision: {report.out / 'decisions.parquet'}; histograms: {report.out / 'histograms.png'}")
    if args.json:
        write_json_output(args.json, report.as_dict())
    return 0 if summary["kept"] else 1
