"""``ldmclip info``: the packaged models with their sizes, or one model's config as JSON."""

from __future__ import annotations

import argparse
import json

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "count_parameters"]

HELP = "list the packaged model configs with parameter counts"
DESCRIPTION = ("List the packaged model configs with their parameter counts, or print one model's config as "
               "JSON: save it to a file, edit it, and pass the file wherever a model name goes.")
EPILOG = """examples:
  ldmclip info
  ldmclip info ViT-B-32 > my-model.json          then: ldmclip train --model my-model.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="print the full config of this model (JSON) instead")


def count_parameters(cfg) -> tuple[int, int, int]:
    """``(total, image tower, text tower)`` parameter counts, without allocating the weights."""
    import torch

    from ..models import CLIP

    with torch.device("meta"):
        model = CLIP(cfg)
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    return total, visual, total - visual - model.logit_scale.numel()


def run(args: argparse.Namespace) -> int:
    from ..core.version import __version__
    from ..registry import get_model_config, list_models

    if args.model:
        # JSON, not a Python dict: it loads back with create_model("file.json").
        print(json.dumps(get_model_config(args.model).to_dict(), indent=2))
        return 0
    print(f"ldmclip {__version__} — packaged models (parameters in millions)\n")
    header = f"{'model':<26}{'total':>10}{'image':>10}{'text':>10}{'image px':>10}{'context':>9}{'embed':>7}"
    print(header)
    print("-" * len(header))
    for name in list_models():
        cfg = get_model_config(name)
        total, visual, text = count_parameters(cfg)
        print(f"{name:<26}{total / 1e6:>10.2f}{visual / 1e6:>10.2f}{text / 1e6:>10.2f}"
              f"{cfg.vision_cfg.image_size:>10}{cfg.text_cfg.context_length:>9}{cfg.embed_dim:>7}")
    print("\nUse a name with ldmclip.create_model(name), or pass your own JSON config path.")
    return 0
