"""``ldmclip merge``: WiSE-FT, the weight-space interpolation of two checkpoints of one architecture
(typically the original model and its fine-tuned copy), written in the OpenCLIP hub layout."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..checkpoints import interpolate_state_dicts
from ..core.errors import UserError
from ..core.files import fsync_dir, temp_name
from ..core.formats import carries_weights
from ..models.clip import CLIP
from ..registry import create_model
from .common import add_out_option

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "add_arguments", "run", "load_checkpoint", "merge_checkpoints"]

HELP = "interpolate two checkpoints of the same architecture (WiSE-FT): (1 - alpha) * A + alpha * B"
DESCRIPTION = ("Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): every floating tensor becomes "
               "(1 - alpha) * A + alpha * B; integer buffers are taken from A. A and B are checkpoints of the same "
               "architecture in any layout ldmclip reads (a run's final/ folder, an OpenCLIP hub folder, a "
               "transformers CLIPModel folder, local-dir:/hf-hub: names, or a weights file with --model). The "
               "result is written atomically in the OpenCLIP hub layout, with A's preprocessing. (Evaluating a "
               "sweep of alphas is not part of this command yet: merge, then run 'ldmclip eval' on each.)")
EPILOG = """examples:
  ldmclip merge runs/pretrained/final runs/finetuned/final --alpha 0.5 --out merged
  ldmclip merge original.safetensors finetuned.safetensors --model ViT-B-32 --alpha 0.3 --out merged
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the first checkpoint (alpha 0): a folder, local-dir:PATH, "
                                               "hf-hub:org/repo, or a weights file (then give --model)")
    parser.add_argument("b", metavar="B", help="the second checkpoint (alpha 1), in any of the same forms")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of B, from 0 (A itself) to 1 (B itself) (default: 0.5)")
    parser.add_argument("--model", default=None, help="the architecture (a packaged config name or a JSON config) "
                                                      "of A and B when they are bare weights files")
    add_out_option(parser, "the folder to write the merged model to (OpenCLIP hub layout); must not exist yet, "
                           "or be empty", metavar="DIR")


def load_checkpoint(spec: str, model: str | None) -> CLIP:
    """A CLIP with the weights ``spec`` names: a folder, ``local-dir:``/``hf-hub:``, or a file with ``model``."""
    if carries_weights(spec):
        return create_model(spec)
    path = Path(spec)
    if path.is_dir():
        return create_model(f"local-dir:{path}")
    if not path.exists():
        raise UserError(f"{spec}: no such checkpoint file or folder")
    if model is None:
        raise UserError(f"{spec} is a weights file, which does not say its architecture: give --model NAME "
                        f"(a packaged config such as ViT-B-32, or a JSON config)")
    return create_model(model, pretrained=str(path))


def merge_checkpoints(a: CLIP, b: CLIP, alpha: float) -> CLIP:
    """A new CLIP with ``a``'s config and preprocessing and the interpolated weights."""
    if a.config.to_dict() != b.config.to_dict():
        differ = sorted(k for k, v in a.config.to_dict().items() if b.config.to_dict().get(k) != v)
        raise UserError(f"A and B are not the same architecture (their configs differ in {', '.join(differ)}); "
                        f"only checkpoints of one architecture can be merged")
    merged = CLIP(a.config)
    merged.preprocess_cfg = dict(a.preprocess_cfg)
    merged.load_state_dict(interpolate_state_dicts(a.state_dict(), b.state_dict(), alpha))
    return merged


def _write_folder_atomically(model: CLIP, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then one rename: ``out`` is whole or absent."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be from 0 (A) to 1 (B), got {args.alpha:g}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the (slow) reads
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out or remove it")
    a, b = load_checkpoint(args.a, args.model), load_checkpoint(args.b, args.model)
    _write_folder_atomically(merge_checkpoints(a, b, args.alpha), out)
    print(f"merged {args.a} (x{1 - args.alpha:g}) and {args.b} (x{args.alpha:g}) into {out} (OpenCLIP hub layout)")
    print(f"  load it with ldmclip.create_model('local-dir:{out}')")
    return 0
