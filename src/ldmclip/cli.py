"""The ``ldmclip`` command. Each sub-command is a small function; ``main`` only dispatches."""

from __future__ import annotations

import argparse
import sys


def _count_parameters(cfg) -> tuple[int, int, int]:
    """``(total, image tower, text tower)`` parameter counts, without allocating the weights."""
    import torch

    from .models import CLIP

    with torch.device("meta"):
        model = CLIP(cfg)
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    return total, visual, total - visual - model.logit_scale.numel()


def cmd_info(args: argparse.Namespace) -> int:
    """Print the packaged models with their sizes (or one model's config)."""
    from .core.version import __version__
    from .registry import get_model_config, list_models

    if args.model:
        print(get_model_config(args.model).to_dict())
        return 0
    print(f"ldmclip {__version__} — packaged models (parameters in millions)\n")
    header = f"{'model':<26}{'total':>10}{'image':>10}{'text':>10}{'image px':>10}{'context':>9}{'embed':>7}"
    print(header)
    print("-" * len(header))
    for name in list_models():
        cfg = get_model_config(name)
        total, visual, text = _count_parameters(cfg)
        print(f"{name:<26}{total / 1e6:>10.2f}{visual / 1e6:>10.2f}{text / 1e6:>10.2f}"
              f"{cfg.vision_cfg.image_size:>10}{cfg.text_cfg.context_length:>9}{cfg.embed_dim:>7}")
    print("\nUse a name with ldmclip.create_model(name), or pass your own JSON config path.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a CLIP model; with no options, a small one on the built-in synthetic scenes."""
    from .train import train
    from .train.config import config_from_args
    from .train.loop import format_summary

    cfg = config_from_args(args)
    result = train(cfg)
    print(format_summary(result))
    return 0


TRAIN_EPILOG = """examples:
  ldmclip train
      a small model on built-in synthetic scenes (a few minutes on a laptop CPU)
  ldmclip train --model ViT-S-16-128 --data flickr8k/captions.csv --images flickr8k/images \\
      --split flickr8k/train.txt --val-data flickr8k/captions.csv --val-split flickr8k/test.txt --epochs 10
  torchrun --nproc-per-node 8 -m ldmclip train --model ViT-L-14 --data 'shards/{00000..41407}.tar' --steps 100000
  ldmclip train --output runs/a --resume latest     continue a stopped run exactly where it was
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmclip",
        description="CLIP for latent-diffusion work: train, load OpenCLIP/Hugging Face checkpoints, "
                    "evaluate, and condition LDMs on the text tower.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="list the packaged model configs with parameter counts",
                               description="List the packaged model configs with their parameter counts.")
    info.add_argument("model", nargs="?", help="show the full config of this model instead")
    info.set_defaults(func=cmd_info)

    from .conditioning.cache_cli import CACHE_TEXT_EPILOG, add_cache_text_arguments, run_cache_text
    from .conditioning.export import EXPORT_EPILOG, add_export_arguments, run_export
    from .data.writer import add_pack_arguments, run_pack
    from .eval.cli import EVAL_EPILOG, add_eval_arguments, run_eval
    from .search.cli import (INDEX_EPILOG, SEARCH_EPILOG, SERVE_EPILOG, add_index_arguments, add_search_arguments,
                             add_serve_arguments, run_index, run_search, run_serve)
    from .train.config import add_train_arguments

    def add(name, add_arguments, run, help, description, epilog=None):
        command = commands.add_parser(name, help=help, description=description, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
        command.set_defaults(func=run)

    add("train", add_train_arguments, cmd_train,
        help="train a CLIP model (no options: a small model on synthetic data)",
        description="Train CLIP with the symmetric contrastive loss. Writes metrics.jsonl, TensorBoard events, "
                    "resumable checkpoints, a PNG of the training curves and the final model (OpenCLIP hub "
                    "layout) into one run folder.",
        epilog=TRAIN_EPILOG)
    add("pack", add_pack_arguments, run_pack,
        help="pack a caption table or an image folder into webdataset shards",
        description="Write webdataset shards (img2dataset layout: KEY.jpg + KEY.txt) from a CSV/TSV/parquet "
                    "caption table or a folder of images with .txt captions, so training can stream them.")
    add("eval", add_eval_arguments, run_eval,
        help="zero-shot classification and image-text retrieval of a model",
        description="Evaluate a model: zero-shot classification (top-1, top-5, mean per-class accuracy, "
                    "confusion matrix) and image<->text retrieval (recall@1/5/10, mean/median rank). "
                    "Prints a table; --out writes JSON.",
        epilog=EVAL_EPILOG)
    add("export", add_export_arguments, run_export,
        help="write a text encoder (or a whole model) in the transformers or diffusers layout",
        description="Export a text tower as a transformers CLIPTextModel folder, as the text_encoder/ + "
                    "tokenizer/ sub-folders of a diffusers pipeline (two of each for SDXL), or a whole model "
                    "as a transformers CLIPModel folder. Written atomically.",
        epilog=EXPORT_EPILOG)
    add("cache-text", add_cache_text_arguments, run_cache_text,
        help="precompute the text conditioning (sd1/sd2/sdxl) of every caption into a cache",
        description="Encode the captions of webdataset shards, a table or a text file with an LDM text "
                    "conditioner and store hidden states (+ pooled embeddings) in sharded safetensors files, "
                    "read back by key with ldmclip.TextEmbeddingCache. Resumable: rerun to continue.",
        epilog=CACHE_TEXT_EPILOG)
    add("index", add_index_arguments, run_index,
        help="embed every image of a folder into a search index",
        description="Embed every image under a folder (recursively) with a CLIP model and store the normalised "
                    "embeddings and paths in an index folder for `ldmclip search` and `ldmclip serve`. "
                    "Resumable: rerun to continue or to update. Unreadable files are skipped and counted.",
        epilog=INDEX_EPILOG)
    add("search", add_search_arguments, run_search,
        help="find the indexed images closest to a text (or to an image)",
        description="Print the indexed images closest to a text query, or to an image when the query is the "
                    "path of an image file, ranked, with their cosine similarity.",
        epilog=SEARCH_EPILOG)
    add("serve", add_serve_arguments, run_serve,
        help="a local web page to search an index",
        description="Serve a small web page (and a JSON API) to search an index: a search box, a grid of results "
                    "with scores; click a result to find similar images. Listens on 127.0.0.1 by default.",
        epilog=SERVE_EPILOG)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ldmclip {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
