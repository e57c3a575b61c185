"""``ldmclip index``: embed every image of a folder into a search index."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError
from ..core.formats import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, carries_weights
from ..core.precision import DTYPES, dtype_name
from ..data.samples import default_workers
from .common import (TAG_HELP, add_device_option, add_dtype_option, add_model_options, add_out_option, add_precision_option,
                     add_quiet_option, add_workers_option)

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "absolute_spec"]

HELP = "embed every image of a folder into a search index"
DESCRIPTION = ("Embed every image under a folder (recursively) with a CLIP model and store the normalised "
               "embeddings and paths in an index folder for `ldmclip search` and `ldmclip serve`. Resumable: "
               "rerun to continue or to update. Unreadable files are skipped and counted.")
EPILOG = """examples:
  ldmclip index photos/ --model ViT-B-32 --pretrained vit-b-32.safetensors --out photos.index
  ldmclip index photos/ --model local-dir:runs/flickr8k/final --out photos.index

Rerun the same command to continue after a crash or Ctrl-C, or to bring the index up to date after
adding, changing or removing images: finished chunks whose files did not change are kept.
"""

INDEX_DTYPES = ("fp16", "fp32")


def absolute_spec(spec: str | None) -> str | None:
    """A model name or weights spec that will still load from another working directory."""
    if spec is None or spec.startswith(HF_HUB_PREFIX):
        return spec
    if spec.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + str(Path(spec[len(LOCAL_DIR_PREFIX):]).expanduser().resolve())
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _index_dtype(short: str) -> str:
    """The dtype name ``build_index`` takes: the index stores torch's long names (``float16``)."""
    from ..search.index import DTYPES as STORED

    return short if short in STORED else dtype_name(DTYPES[short])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="DIR", help="folder of images, searched recursively")
    add_out_option(parser, "index folder to create (or to continue)", metavar="INDEX")
    add_model_options(parser, required=True,
                      pretrained_help="weights: a file (.safetensors/.bin/.pt), a checkpoint folder, "
                                      f"'hf-hub:org/repo' {TAG_HELP} (needed unless the model name carries weights: "
                                      "local-dir: or hf-hub:)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="images per stored chunk; a rerun redoes at most the unfinished chunk")
    add_dtype_option(parser, INDEX_DTYPES, "fp16",
                     "stored embedding type; fp16 halves the size and changes scores by about 1e-3")
    add_precision_option(parser)
    add_device_option(parser)
    add_workers_option(parser, default_workers())
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    """Index the folder; print what was indexed and skipped."""
    from ..core.devices import resolve_device
    from ..core.precision import autocast, resolve_precision
    from ..registry import create_model_and_transforms
    from ..search.index import build_index, find_images, model_identity

    if args.batch_size < 1 or args.chunk_size < 1:
        raise UserError("--batch-size and --chunk-size must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if args.pretrained is None and not carries_weights(args.model):
        # Random weights differ on every load, so such an index could never be searched.
        raise UserError(f"--pretrained is needed: {args.model!r} names only a config, and an index made with "
                        "random weights cannot be searched (the weights would differ next time)")
    if not find_images(args.images):  # before the (slow) model load: a wrong folder fails at once
        raise UserError(f"no image files under {args.images}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    name, pretrained = absolute_spec(args.model), absolute_spec(args.pretrained)
    model, _, transform = create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    result = build_index(model, transform, args.images, args.out, identity=model_identity(model, name, pretrained),
                         batch_size=args.batch_size, chunk_size=args.chunk_size, dtype=_index_dtype(args.dtype),
                         device=device,
                         workers=args.workers, autocast=lambda: autocast(precision, device),
                         progress=not args.quiet)
    print(f"ldmclip index: {result.images:,} of {result.files:,} images indexed into {result.out} "
          f"({result.embed_dim}-d {args.dtype}, {result.chunks} chunk(s), {result.chunks_reused} kept from an "
          f"earlier run, {result.seconds:.1f} s)")
    if result.skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in result.skipped.items())
        print(f"  skipped {sum(result.skipped.values()):,} unreadable file(s): {reasons}")
        for path, reason in result.skipped_files[:10]:
            print(f"    {path}: {reason}")
        if len(result.skipped_files) > 10:
            print(f"    … and {len(result.skipped_files) - 10:,} more")
    if not result.images:
        raise UserError(f"none of the {result.files:,} image files under {args.images} could be read")
    print(f"search it: ldmclip search {result.out} \"a photo of ...\"   or   ldmclip serve {result.out}")
    return 0
