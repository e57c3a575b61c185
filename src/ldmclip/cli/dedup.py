"""``ldmclip dedup``: near-duplicate groups of an embedding folder (``ldmclip embed --out DIR``).

``add_dedup_options`` and ``run_dedup`` are shared with ``ldmclip embed --dedup THRESHOLD``, which runs the
same step after its last shard."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..core.errors import UserError
from .common import add_json_option, add_quiet_option, write_json_output

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "add_dedup_options", "run_dedup"]

HELP = "group near-duplicate images of an embedding folder and mark one of each group to keep"
DESCRIPTION = ("Find every pair of samples of an embedding folder (made by `ldmclip embed`) whose image "
               "embeddings have cosine similarity at or above --threshold, join the pairs into groups, and keep "
               "the member of each group with the highest --keep-by score. Writes DIR/dedup/dedup.parquet "
               "(key, dup_group, dup_group_size, dup_keep per sample) and DIR/dedup/summary.json; "
               "`ldmclip filter` can then select on dup_keep. Needs FAISS: pip install faiss-cpu.")
EPILOG = """examples:
  ldmclip dedup embeddings/ --threshold 0.95
  ldmclip dedup embeddings/ --threshold 0.95 --keep-by aesthetic

Search is exact (every pair compared) up to --exact-limit samples and approximate above it; the
approximate search's recall of the near-duplicate pairs is measured against exact search on sampled
queries and printed.
"""


def add_dedup_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                      threshold_flag: str = "--threshold", required: bool = True) -> None:
    """The options of the near-duplicate step: the threshold (``--threshold`` here, ``--dedup`` in
    ``ldmclip embed``; ``dest`` is ``dedup_threshold`` either way), ``--keep-by``, ``--exact-limit``,
    ``--nprobe``."""
    from ..curate.dedup import DEFAULT_EXACT_LIMIT, DEFAULT_NPROBE

    parser.add_argument(threshold_flag, dest="dedup_threshold", type=float, required=required, default=None,
                        metavar="COSINE",
                        help="image-embedding cosine similarity at or above which two samples are near-duplicates "
                             "(e.g. 0.95; higher finds only closer copies)")
    parser.add_argument("--keep-by", dest="keep_by", default="clip_score", metavar="COLUMN",
                        help="numeric metadata column whose highest value is kept in each group (clip_score or a "
                             "--head column such as aesthetic); ties go to the smallest key")
    parser.add_argument("--exact-limit", dest="exact_limit", type=int, default=DEFAULT_EXACT_LIMIT, metavar="N",
                        help="compare every pair up to N samples; above it use approximate search (FAISS IVF) and "
                             "report its measured recall")
    parser.add_argument("--nprobe", dest="nprobe", type=int, default=DEFAULT_NPROBE, metavar="N",
                        help="clusters searched per sample by the approximate search (more: slower, higher recall)")


def run_dedup(args: argparse.Namespace, out_dir: str | Path, *, command: str = "dedup") -> dict:
    """Run the near-duplicate step on ``out_dir`` with the options of ``add_dedup_options`` and print a
    short summary; returns the summary written to ``dedup/summary.json``."""
    from ..curate.dedup import DEDUP_DIR, dedup_folder

    if args.exact_limit < 0 or args.nprobe < 1:
        raise UserError("--exact-limit must be 0 or more and --nprobe at least 1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dedup_folder(out_dir, args.dedup_threshold, keep_by=args.keep_by, exact_limit=args.exact_limit,
                              nprobe=args.nprobe, progress=not getattr(args, "quiet", False))
    summary = {**result.summary(), "keep_by": args.keep_by}
    print(f"ldmclip {command}: {result.groups:,} group(s) of near-duplicates among {len(result.group):,} samples "
          f"(cosine >= {result.threshold}); {result.not_kept:,} sample(s) not kept (kept by {args.keep_by})")
    print(f"  {result.note}")
    for warning in caught:
        if "recall" not in str(warning.message):  # the recall note above already says it
            print(f"  warning: {warning.message}")
    print(f"  wrote {Path(out_dir) / DEDUP_DIR / 'dedup.parquet'} and summary.json")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="embedding folder written by `ldmclip embed --out DIR`")
    add_dedup_options(parser)
    add_json_option(parser, "also write the summary as JSON to PATH (- = standard output)")
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    summary = run_dedup(args, args.folder)
    if args.json:
        write_json_output(args.json, summary)
    return 0
