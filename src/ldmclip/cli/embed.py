"""``ldmclip embed``: CLIP embeddings, CLIP score and head scores of every sample of webdataset shards, in
clip-retrieval's embedding layout. Rerunning the same command continues where a stopped run ended; under
torchrun or srun each rank takes its own shards."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import UserError
from ..core.formats import carries_weights
from ..core.launch import join_barrier_group, process_rank
from ..data.samples import default_workers
from .dedup import add_dedup_options, run_dedup
from .common import (TAG_HELP, add_column_options, add_device_option, add_dtype_option, add_image_root_option,
                     add_json_option, add_model_options, add_out_option, add_precision_option, add_quiet_option,
                     add_workers_option, parse_sep, write_json_output)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run"]

HELP = "CLIP image/caption embeddings, CLIP score and head scores of every sample of webdataset shards"
DESCRIPTION = ("Read webdataset shards in the img2dataset layout (KEY.jpg|png|webp + KEY.txt), and write, per input "
               "shard, the normalised image and caption embeddings (img_emb/*.npy, text_emb/*.npy) and a metadata "
               "table (metadata/*.parquet: key, caption, clip_score, width, height, shard, one column per --head), "
               "the layout clip-retrieval writes, so autofaiss and clip-retrieval read it as their own. Samples "
               "whose image or caption cannot be read are skipped and counted by reason. Resumable: rerun the "
               "same command to continue after a crash or Ctrl-C.")
EPILOG = """examples:
  ldmclip embed 'laion/{00000..00999}.tar' --model ViT-L-14 --pretrained laion2b_s32b_b82k --out emb/
  ldmclip embed 'laion/{00000..00999}.tar' --model ViT-L-14 --pretrained vit-l-14.safetensors --out emb/ \\
      --head aesthetic=sac+logos+ava1-l14-linearMSE.pth
  torchrun --nproc-per-node 8 -m ldmclip embed 'laion/{00000..41407}.tar' --model ViT-L-14 \\
      --pretrained laion2b_s32b_b82k --out emb/                      (one process per GPU, each its shards)
  ldmclip embed 'shards/{00000..00002}.tar' --model ViT-Tiny-64 --random-init --out /tmp/emb   (a quick try)

read it back (files sorted by name line up, row for row):
  meta = pandas.concat(pandas.read_parquet(f) for f in sorted(glob("emb/metadata/*.parquet")))
  emb = numpy.concatenate([numpy.load(f) for f in sorted(glob("emb/img_emb/*.npy"))])
"""

EMBED_DTYPE_CHOICES = ("fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS",
                        help="webdataset shards: a brace pattern ('data/{00000..00099}.tar') or a list of .tar files; "
                             "or one caption table (.csv, .tsv, .parquet) with --images")
    add_out_option(parser, "folder for the embeddings (created; an existing one is resumed); not the folder of "
                           "the input shards", metavar="DIR")
    model = parser.add_argument_group("model")
    add_model_options(model, required=True,
                      pretrained_help="weights: a file (.safetensors/.bin/.pt), a checkpoint folder, "
                                      f"'hf-hub:org/repo' {TAG_HELP} (needed unless --model is hf-hub: or local-dir:)")
    model.add_argument("--random-init", action="store_true",
                       help="allow a model without weights (random initialisation with seed 0): for tests and "
                            "benchmarks only")
    model.add_argument("--head", action="append", default=None, metavar="NAME=FILE",
                       help="a score head applied to each normalised image embedding, stored as the float32 column "
                            "NAME: a single Linear (weight, bias; LAION's linear aesthetic head) or a stack keyed "
                            "layers.N.weight/bias (LAION's improved aesthetic predictor), in .safetensors or "
                            ".pth/.pt. Repeat for several heads")
    table = parser.add_argument_group("caption table input")
    add_image_root_option(table, "folder the table's image paths are relative to (default: the table's folder)")
    add_column_options(table, image=("image", "table column of image paths"),
                       caption=("caption", "table column of captions"))
    table.add_argument("--sep", default=None, help="delimiter of a text table whose suffix does not say it")
    table.add_argument("--shard-size", type=int, default=10_000,
                       help="table rows per output file (TABLE-00000, TABLE-00001, ...)")
    dedup = parser.add_argument_group("near-duplicates (after every shard is embedded; the same as `ldmclip dedup DIR`)")
    add_dedup_options(dedup, threshold_flag="--dedup", required=False)
    encode = parser.add_argument_group("encoding")
    encode.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    add_dtype_option(encode, EMBED_DTYPE_CHOICES, "fp16", "stored embedding type (clip-retrieval stores fp16)")
    add_precision_option(encode)
    add_device_option(encode)
    add_workers_option(encode, default_workers())
    add_quiet_option(encode)
    add_json_option(encode, "also write a summary of the run as JSON to PATH ('-': standard output)")


def _check_weights(args: argparse.Namespace) -> None:
    if args.pretrained is None and not carries_weights(args.model) and not args.random_init:
        raise UserError(f"--pretrained is needed: {args.model!r} names only a config, and embeddings of random weights "
                        "are useless for curating data. Pass the weights (--pretrained FILE, folder, hf-hub:org/repo "
                        "or a tag), or --random-init for a test or benchmark.")


def run(args: argparse.Namespace) -> int:
    """Returns 0 when every shard is embedded, 1 when some failed (a rerun retries them)."""
    import torch

    from ..core.devices import resolve_device
    from ..curate.embed import check_out_not_input, embed_shards
    from ..curate.heads import load_head, parse_head_option
    from ..data.shards import expand_urls
    from ..registry import create_model_and_transforms, get_tokenizer

    from ..core.formats import input_kind

    if args.batch_size < 1 or args.shard_size < 1:
        raise UserError("--batch-size and --shard-size must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    _check_weights(args)
    head_options = args.head or []
    heads = dict(parse_head_option(text) for text in head_options)
    if len(heads) != len(head_options):
        raise UserError("two --head options have the same NAME; give each head its own column name")
    source = args.shards[0] if len(args.shards) == 1 else list(args.shards)
    is_table = isinstance(source, str) and input_kind(source) == "table"
    if not is_table and any(input_kind(s) == "table" for s in args.shards):
        raise UserError("give one caption table on its own (or webdataset shards), not several inputs")
    urls = [source] if is_table else expand_urls(source)
    if not urls:
        raise UserError(f"no shards in {' '.join(args.shards)}")
    check_out_not_input(args.out, urls, args.images)  # before minutes of model loading
    heads = {name: load_head(path) for name, path in heads.items()}  # an unreadable head file fails here too
    dist = join_barrier_group()
    try:
        rank, world = process_rank()
        device = resolve_device(args.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # --random-init: the same weights in every run, so a stopped run resumes
            model, _, preprocess = create_model_and_transforms(args.model, pretrained=args.pretrained, device=device)
        model.eval()
        tokenizer = get_tokenizer(args.model)
        if rank == 0:
            what = f"the table {source}" if is_table else f"{len(urls)} shard(s)"
            print(f"embedding {what} with {args.model} ({device}) into {args.out}"
                  + (f" on {world} ranks" if world > 1 else ""), file=sys.stderr)
        report = embed_shards(model, preprocess, tokenizer, source if is_table else urls, args.out,
                              images=args.images, image_column=args.image_column, caption_column=args.caption_column,
                              shard_size=args.shard_size, sep=parse_sep(args.sep), dtype=args.dtype, precision=args.precision,
                              batch_size=args.batch_size, heads=heads, rank=rank, world_size=world,
                              progress=not args.quiet and rank == 0, workers=args.workers, model_name=args.model,
                              pretrained=args.pretrained)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    prefix = f"[rank {rank}] " if world > 1 else ""
    print("\n".join(prefix + line for line in report.summary().splitlines()))
    if args.json is not None:
        write_json_output(args.json if world == 1 or args.json == "-" else f"{args.json}.rank{rank}", report.as_dict())
    if args.dedup_threshold is not None and rank == 0:
        _dedup_when_complete(args, report)
    return 1 if report.failed else 0


def _dedup_when_complete(args: argparse.Namespace, report) -> None:
    """Near-duplicates need every shard's embeddings: with a shard still missing (failed here or on another
    rank) the groups would be wrong, so the step waits for the rerun that completes the folder."""
    shards = len(report.written) + len(report.already_done) + len(report.failed) + report.other_ranks
    if report.folder_shards != shards:
        print(f"near-duplicates not searched yet: {report.folder_shards or 0} of {shards} shard(s) are embedded; "
              "rerun the same command to finish the others (it then runs --dedup)")
        return
    run_dedup(args, args.out, command="embed")
