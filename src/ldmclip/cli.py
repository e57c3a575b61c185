"""The ``ldmclip`` command. Each sub-command is a small function; ``main`` only dispatches."""

from __future__ import annotations

import argparse
import sys


def _count_parameters(name: str) -> tuple[int, int, int]:
    """``(total, image tower, text tower)`` parameter counts, without allocating the weights."""
    import torch

    from .models import CLIP, get_model_config

    with torch.device("meta"):
        model = CLIP(get_model_config(name))
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    return total, visual, total - visual - model.logit_scale.numel()


def cmd_info(args: argparse.Namespace) -> int:
    """Print the packaged models with their sizes (or one model's config)."""
    from . import __version__
    from .models import get_model_config, list_models

    if args.model:
        print(get_model_config(args.model).to_dict())
        return 0
    print(f"ldmclip {__version__} — packaged models (parameters in millions)\n")
    header = f"{'model':<26}{'total':>10}{'image':>10}{'text':>10}{'image px':>10}{'context':>9}{'embed':>7}"
    print(header)
    print("-" * len(header))
    for name in list_models():
        cfg = get_model_config(name)
        total, visual, text = _count_parameters(name)
        print(f"{name:<26}{total / 1e6:>10.2f}{visual / 1e6:>10.2f}{text / 1e6:>10.2f}"
              f"{cfg.vision_cfg.image_size:>10}{cfg.text_cfg.context_length:>9}{cfg.embed_dim:>7}")
    print("\nUse a name with ldmclip.create_model(name), or pass your own JSON config path.")
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ldmclip {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
