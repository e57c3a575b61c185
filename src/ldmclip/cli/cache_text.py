"""``ldmclip cache-text``: build (or resume) a text-embedding cache. Rerunning the same command continues
where a stopped run ended; under torchrun or srun each rank takes its own input chunks."""

from __future__ import annotations

import argparse
import sys

from ..conditioning.cache import CACHE_DTYPES, build_text_cache
from ..conditioning.cache_inputs import DEFAULT_SHARD_SIZE, INPUT_FORMATS, open_inputs
from ..conditioning.variants import open_variant_inputs, parse_variants
from ..core.errors import UserError
from ..core.formats import carries_weights
from ..core.launch import join_barrier_group, process_rank
from .common import (TAG_HELP, add_column_options, add_device_option, add_dtype_option, add_input_format_option,
                     add_model_options, add_out_option, add_precision_option, add_quiet_option, parse_sep)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run"]

HELP = "precompute the text conditioning (sd1/sd2/sdxl) of every caption into a cache"
DESCRIPTION = ("Encode the captions of webdataset shards, a table or a text file with an LDM text conditioner "
               "and store hidden states (+ pooled embeddings) in sharded safetensors files, read back by key with "
               "ldmclip.TextEmbeddingCache. Resumable: rerun to continue.")
EPILOG = """examples:
  ldmclip cache-text 'shards/{00000..00999}.tar' --out cache/ --preset sd2 --pretrained open_clip_model.safetensors
  ldmclip cache-text captions.csv --out cache/ --preset sd1 --pretrained clip-vit-large-patch14/
  torchrun --nproc-per-node 8 -m ldmclip cache-text 'shards/{00000..41407}.tar' --out cache/ --preset sdxl \\
      --pretrained clip-l.safetensors --pretrained-2 clip-bigG.safetensors
  ldmclip cache-text captions.csv --out cache/ --preset sdxl --pretrained sd_xl_base_1.0.safetensors
  ldmclip cache-text prompts.txt --out /tmp/c --preset sd2 --model ViT-Tiny-64 --random-init     (a quick try)
  ldmclip cache-text 'shards/{00000..00999}.tar' --out cache/ --preset sdxl --pretrained sd_xl_base_1.0.safetensors \
      --caption-variant txt=txt --caption-variant synthetic=json:synthetic_caption     (two captions per image)

read it back:
  cache = ldmclip.TextEmbeddingCache("cache/"); cache[key]["hidden"], cache.join(image_samples)
  cache.variant(key, "synthetic")
  cache.join(image_samples, variants={"txt": 0.5, "synthetic": 0.5}, drop=0.1)
"""


def _default_models() -> dict[str, tuple[str, ...]]:
    from ..conditioning.conditioner import PRESETS

    return {name: preset.models for name, preset in PRESETS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="captions: webdataset shards ('shards/{00000..00099}.tar', KEY.txt members), "
                                      "a table (.csv, .tsv, .parquet) or a text file with one caption per line")
    add_out_option(parser, "cache folder (created; an existing cache is resumed)", metavar="DIR")
    defaults = _default_models()
    model = parser.add_argument_group("conditioner")
    model.add_argument("--preset", required=True, choices=sorted(defaults),
                       help="the conditioning recipe: sd1 (CLIP ViT-L/14, last layer), sd2 (OpenCLIP ViT-H/14, "
                            "penultimate layer), sdxl (ViT-L/14 + ViT-bigG/14, penultimate layers + pooled), "
                            "sd3 (the same two, + both pooled; the CLIP part of SD 3), flux (ViT-L/14's "
                            "unprojected pooled output; the CLIP part of Flux)")
    add_model_options(model,
                      model_help="model name or config of the (first) text encoder (default: the preset's: "
                                 + ", ".join(f"{k} {v[0]}" for k, v in defaults.items()) + ")",
                      pretrained_help=f"its weights: a file, a checkpoint folder, hf-hub:org/repo {TAG_HELP}; a "
                                      "single-file SD checkpoint (sd1/sd2/sdxl/sd3 .safetensors or .ckpt) gives every "
                                      "tower of its preset, so sdxl needs no --pretrained-2",
                      second=f"sdxl and sd3 only: the second text encoder (default: {defaults['sdxl'][1]})")
    model.add_argument("--random-init", action="store_true",
                       help="allow encoders without weights (random initialisation with seed 0): "
                            "for tests and benchmarks only")
    source = parser.add_argument_group("input")
    add_input_format_option(source, INPUT_FORMATS, aliases=["--format"],
                            help="what the input is (default: auto, from the name: .tar/brace pattern/pipe: = "
                                 "webdataset, .csv/.tsv/.parquet = table, anything else = text file)")
    add_column_options(source, caption=("caption", "table column of captions"),
                       key=(None, "table column of sample keys (default: IMAGE#ROW, the keys ldmclip's "
                                  "CaptionTable gives its samples; row numbers when the table has no image column)"),
                       image=("image", "table column of image names"))
    source.add_argument("--caption-variant", action="append", metavar="NAME=SOURCE", dest="caption_variants",
                        help="store several captions per key, each under its NAME (repeat the option; the first is "
                             "the default that cache[key] gives): for shards SOURCE is a member (txt) or "
                             "json:FIELD, a text field of the .json member (json:a.b for a nested one); for a table "
                             "it is a column (then --caption-column is not used). Without it: the .txt member or "
                             "--caption-column only")
    source.add_argument("--sep", default=None, help="delimiter of a text table whose suffix does not say it")
    source.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"table rows / text lines per cache shard (default: {DEFAULT_SHARD_SIZE}); "
                             "webdataset input keeps one cache shard per input shard")
    encode = parser.add_argument_group("encoding")
    encode.add_argument("--batch-size", type=int, default=256, help="captions per forward pass")
    add_dtype_option(encode, CACHE_DTYPES, "fp16",
                     "stored dtype of the embeddings (default: fp16); int8 and fp8 (e4m3) take half of fp16's "
                     "space, each with a scale per token, and are read back as float16 (BENCHMARKS.md gives "
                     "their measured error)")
    add_precision_option(encode, "autocast while encoding: 'auto' is bf16 on GPUs and CPUs with AMX/AVX512-bf16")
    add_device_option(encode)
    add_quiet_option(encode)


def _check_weights(args: argparse.Namespace, model: str, model_2: str | None, single_file: bool) -> None:
    missing = []
    if args.pretrained is None and not carries_weights(model):
        missing.append("--pretrained")
    if model_2 is not None and args.pretrained_2 is None and not single_file and not carries_weights(model_2):
        missing.append("--pretrained-2")
    if missing and not args.random_init:
        raise UserError(
            f"no weights for the text encoder ({' and '.join(missing)} not given): a cache of randomly initialised "
            f"encoders is useless for training. Pass the weights ({' / '.join(missing)} FILE, folder or "
            "hf-hub:org/repo, or a model named hf-hub:... / local-dir:...), or --random-init for a test or benchmark.")


def run(args: argparse.Namespace) -> int:
    """Returns 0 when every input chunk is cached, 1 when some failed (a rerun retries them). Bad options
    and a mismatching cache raise a ``UserError`` with a clear message."""
    import torch

    from ..checkpoints.sd import is_single_file_checkpoint
    from ..conditioning.conditioner import TextConditioner
    from ..core.devices import resolve_device

    defaults = _default_models()[args.preset]
    model = args.model or defaults[0]
    model_2 = (args.model_2 or defaults[1]) if len(defaults) > 1 else None
    if model_2 is None and (args.model_2 or args.pretrained_2):
        two = " and ".join(name for name, models in _default_models().items() if len(models) == 2)
        raise UserError(f"--model-2/--pretrained-2 are for the two-encoder presets ({two}), not {args.preset}")
    if args.batch_size < 1 or args.shard_size < 1:
        raise UserError("--batch-size and --shard-size must be at least 1")
    # an SD checkpoint (sdxl.safetensors) holds every tower the preset needs: from_single_file
    single_file = args.pretrained_2 is None and is_single_file_checkpoint(args.pretrained)
    _check_weights(args, model, model_2, single_file)
    # Read the input first: a typo in a path fails before minutes of model loading.
    variants = parse_variants(args.caption_variants) if args.caption_variants else None
    if variants is None:
        chunks = open_inputs(args.input, args.input_format, caption_column=args.caption_column,
                             key_column=args.key_column, image_column=args.image_column,
                             shard_size=args.shard_size, sep=parse_sep(args.sep))
    else:
        chunks = open_variant_inputs(args.input, variants, args.input_format, key_column=args.key_column,
                                     image_column=args.image_column, shard_size=args.shard_size, sep=parse_sep(args.sep))
    dist = join_barrier_group()
    try:
        rank, world = process_rank()
        device = resolve_device(args.device)
        with torch.random.fork_rng(devices=[]):
            # --random-init: the same random weights in every run, so that a stopped run can be resumed
            # (the cache refuses weights that differ from those it was started with).
            torch.manual_seed(0)
            weights = ({"checkpoint": args.pretrained} if single_file else
                       {"pretrained": args.pretrained, "pretrained_2": args.pretrained_2})
            conditioner = TextConditioner.from_pretrained(args.preset, model, model_2=model_2, device=device,
                                                          precision="fp32", **weights)
        if rank == 0:
            encoders = model + (f" + {model_2}" if model_2 else "")
            print(f"caching {len(chunks)} input chunk(s) of {args.input} with preset {args.preset} ({encoders}, "
                  f"{device}) into {args.out}" + (f" on {world} ranks" if world > 1 else ""), file=sys.stderr)
        report = build_text_cache(conditioner, chunks, args.out, dtype=args.dtype, precision=args.precision,
                                  batch_size=args.batch_size, variants=variants, rank=rank, world_size=world,
                                  progress=not args.quiet and rank == 0)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    prefix = f"[rank {rank}] " if world > 1 else ""
    print("\n".join(prefix + line for line in report.summary().splitlines()))
    return 1 if report.failed else 0
