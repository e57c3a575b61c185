"""``ldmclip export``: a text encoder (or a whole model) in the transformers or diffusers layout, or text
towers written back into a single-file SD checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..conditioning.conditioner import PRESETS, get_preset
from ..core.errors import UserError
from ..core.formats import carries_weights
from ..core.precision import DTYPES
from .common import TAG_HELP, add_dtype_option, add_model_options, add_out_option

__all__ = ["HELP", "DESCRIPTION", "EPILOG", "FORMATS", "add_arguments", "check_arguments", "run"]

SD_SINGLE_FILE = "sd-single-file"
FORMATS = ["transformers", "diffusers", SD_SINGLE_FILE]

HELP = "write a text encoder (or a whole model) in the transformers or diffusers layout, or into an SD checkpoint"
DESCRIPTION = ("Export a text tower as a transformers CLIPTextModel folder, as the text_encoder/ + tokenizer/ "
               "sub-folders of a diffusers pipeline (two of each for SDXL), or a whole model as a transformers "
               "CLIPModel folder; or write text towers back into a copy of a single-file SD checkpoint "
               "(--format sd-single-file: only its text-encoder tensors change, in its own layout and dtypes). "
               "Written atomically.")
# In this string "\\\\" prints one backslash, so each two-line example is one shell command.
EPILOG = """examples:
  # an SD 1.x text encoder as a transformers CLIPTextModel folder (pads with end-of-text)
  ldmclip export --format transformers --preset sd1 --model ViT-L-14-quickgelu \\
      --pretrained weights.safetensors --out te
  # a fine-tuned ViT-H/14 as the text_encoder/ + tokenizer/ of an SD 2.x diffusers pipeline
  ldmclip export --format diffusers --preset sd2 --model local-dir:runs/my-run/final --out sd2-te
  # SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 -> text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/
  ldmclip export --format diffusers --preset sdxl --pretrained vit-l.safetensors \\
      --pretrained-2 bigg.safetensors --out sdxl-te
  # a whole CLIP model as a transformers CLIPModel folder
  ldmclip export --format transformers --full --model local-dir:runs/my-run/final --out clip-hf
  # a fine-tuned CLIP-L as the text encoder of an SD 1.x checkpoint (a new file; the input is only read)
  ldmclip export --format sd-single-file --into sd15.safetensors --model local-dir:runs/my-run/final \\
      --out sd15-new.safetensors
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --format is the OUTPUT format here (what an input is would be --input-format).
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="transformers: one model folder (CLIPTextModel, or CLIPModel with --full); "
                             "diffusers: text_encoder/ + tokenizer/ sub-folders (two of each for sdxl); "
                             "sd-single-file: a copy of --into with its text encoder(s) replaced")
    add_out_option(parser, "output folder; must not exist yet (or be empty). sd-single-file: the new "
                           ".safetensors file (must not exist yet)", metavar="PATH")
    parser.add_argument("--into", metavar="FILE", default=None,
                        help="sd-single-file: the single-file SD checkpoint (.safetensors) whose text encoder(s) "
                             "--model/--pretrained (and --model-2/--pretrained-2) replace; it is only read")
    parser.add_argument("--encoder", default=None, metavar="NAME",
                        help="sd-single-file: the encoder of --into that --model/--pretrained replaces "
                             "(text_encoder or text_encoder_2, as ldmclip info lists them; default: the file's "
                             "first); --model-2/--pretrained-2 always replace text_encoder_2")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="the recipe the text encoder serves: sets the tokenizer's pad token (sd1 and sdxl's "
                             "first tokenizer pad with end-of-text, sd2 and sdxl's second with 0) and the default "
                             "--model. Required for --format diffusers. Without it the pad token is 0 (OpenCLIP's)")
    add_model_options(parser,
                      model_help="model name: a packaged config (ldmclip info), a JSON config, 'hf-hub:org/repo' "
                                 "or 'local-dir:/path' (default: the preset's model)",
                      pretrained_help=f"weights file or folder for --model, {TAG_HELP} (not needed when --model is "
                                      "'hf-hub:' or 'local-dir:', which carry their weights); a single-file SD "
                                      "checkpoint (sd1/sd2/sdxl/sd3 .safetensors or .ckpt) gives every tower of --preset",
                      second="sdxl only, or sd-single-file: the second text encoder's model (default for sdxl: "
                             "ViT-bigG-14)")
    parser.add_argument("--with-projection", action="store_true",
                        help="write CLIPTextModelWithProjection (text tower + text_projection) instead of "
                             "CLIPTextModel (--format transformers)")
    parser.add_argument("--full", action="store_true",
                        help="write the whole CLIP model as a transformers CLIPModel (--format transformers)")
    add_dtype_option(parser, DTYPES, None, "dtype of the written weights (default: fp32); sd-single-file keeps "
                                           "each tensor's dtype of --into")


def check_arguments(args: argparse.Namespace) -> None:
    """Every mistake that can be seen before loading gigabytes of weights."""
    if args.format == SD_SINGLE_FILE:
        _check_sd_single_file(args)
        return
    if args.into is not None or args.encoder is not None:
        raise UserError(f"--into and --encoder are for --format {SD_SINGLE_FILE}")
    args.dtype = args.dtype or "fp32"
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists; choose a new folder or delete it first")
    two_towers = args.preset is not None and len(get_preset(args.preset).models) == 2
    if args.format == "diffusers" and args.preset is None:
        raise UserError(f"--format diffusers needs --preset ({', '.join(PRESETS)}): it decides the sub-folders "
                        "and the pad tokens")
    if args.format == "diffusers" and (args.full or args.with_projection):
        raise UserError("--full and --with-projection are for --format transformers; the diffusers layout "
                        "fixes the classes (SDXL's text_encoder_2 is written with its projection)")
    if args.format == "transformers" and two_towers:
        raise UserError(f"--preset {args.preset} has two text encoders; use --format diffusers, or export each "
                        f"tower on its own with --format transformers (--preset sd1 for the ViT-L/14 one)")
    if args.full and args.with_projection:
        raise UserError("--full already includes the projection; drop --with-projection")
    if not two_towers and (args.model_2 or args.pretrained_2):
        raise UserError("--model-2/--pretrained-2 are only for the two-encoder presets (--preset "
                        f"{' or '.join(n for n, p in PRESETS.items() if len(p.models) == 2)})")
    if args.model is None and args.preset is None:
        raise UserError("pass --model (a model name, 'hf-hub:org/repo' or 'local-dir:/path') or --preset")
    pairs = [(args.model, args.pretrained, "--model", "--pretrained")]
    if two_towers:
        pairs.append((args.model_2, args.pretrained_2, "--model-2", "--pretrained-2"))
    single_file = _single_file(args)
    for index, (name, weights, model_flag, weights_flag) in enumerate(pairs):
        name = name or get_preset(args.preset).models[index]
        if weights is None and not carries_weights(name) and not (index == 1 and single_file):
            raise UserError(f"no weights for {name}: pass {weights_flag} (a weights file or folder), or a "
                            f"{model_flag} of the form 'hf-hub:org/repo' or 'local-dir:/path'; exporting a "
                            f"randomly initialised model is almost never what you want")


def _check_sd_single_file(args: argparse.Namespace) -> None:
    """--into, --out and the towers of --format sd-single-file; sets ``args.encoders`` (the encoder of
    --into each tower replaces)."""
    from ..checkpoints.sd import find_text_encoders
    from ..checkpoints.sd_write import check_write_paths

    if args.into is None:
        raise UserError(f"--format {SD_SINGLE_FILE} needs --into: the single-file SD checkpoint to write into")
    for flag, given in (("--preset", args.preset), ("--full", args.full), ("--with-projection", args.with_projection),
                        ("--dtype", args.dtype)):
        if given:
            raise UserError(f"{flag} is not for --format {SD_SINGLE_FILE}: the layout and each tensor's dtype are "
                            f"those of --into")
    check_write_paths(Path(args.into), Path(args.out))
    if Path(args.out).exists():
        raise UserError(f"--out {args.out} already exists; choose a new file name or delete it first")
    if args.model is None and args.pretrained is None:
        raise UserError("pass --model/--pretrained: the text tower to write (e.g. --model local-dir:runs/my-run/final)")
    if args.pretrained is None and not carries_weights(args.model):
        raise UserError(f"no weights for {args.model}: pass --pretrained, or a --model of the form 'hf-hub:org/repo' "
                        f"or 'local-dir:/path'")
    found = [f.encoder for f in find_text_encoders(args.into)]  # the file's key names only
    second = args.model_2 is not None or args.pretrained_2 is not None
    first = args.encoder or (found[0] if found else None)
    if args.encoder is not None and args.encoder not in found:
        raise UserError(f"--into {args.into} has no text encoder {args.encoder!r}; it has: {', '.join(found) or 'none'}")
    if second and ("text_encoder_2" not in found or first == "text_encoder_2"):
        raise UserError(f"--model-2/--pretrained-2 replace text_encoder_2, but --into {args.into} has "
                        f"{', '.join(found) or 'no text encoder'} and --model replaces {first}")
    if second and args.pretrained_2 is None and not carries_weights(args.model_2):
        raise UserError(f"no weights for {args.model_2}: pass --pretrained-2")
    args.encoders = [first] + (["text_encoder_2"] if second else [])


def _single_file(args: argparse.Namespace) -> bool:
    """Whether --pretrained is a single-file SD checkpoint that gives every tower of --preset."""
    from ..checkpoints.sd import is_single_file_checkpoint

    return args.preset is not None and args.pretrained_2 is None and is_single_file_checkpoint(args.pretrained)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the model(s), write the folder."""
    from ..conditioning.conditioner import TextConditioner
    from ..registry import load_text_tower
    from ..conditioning.export import export_diffusers, export_transformers
    from ..registry import create_model, get_tokenizer

    check_arguments(args)
    if args.format == SD_SINGLE_FILE:
        return _run_sd_single_file(args)
    if args.format == "diffusers":
        weights = ({"checkpoint": args.pretrained} if _single_file(args) else
                   {"pretrained": args.pretrained, "pretrained_2": args.pretrained_2})
        conditioner = TextConditioner.from_pretrained(args.preset, args.model, model_2=args.model_2, **weights)
        out = export_diffusers(conditioner, args.out, dtype=args.dtype)
        folders = ", ".join(sorted(p.name + "/" for p in out.iterdir()))
        print(f"wrote {out}: {folders} ({args.preset}, {args.dtype})")
        print(f"load with: CLIPTextModel.from_pretrained('{out}', subfolder='text_encoder'), or copy the "
              f"folders into a diffusers pipeline folder")
        return 0
    name = args.model or get_preset(args.preset).models[0]
    tokenizer = get_tokenizer(name)
    pad_id = 0
    if args.preset is not None:
        pad = get_preset(args.preset).pad[0]
        pad_id = tokenizer.eot_token_id if pad == "eot" else pad
    if args.full:
        model = create_model(name, pretrained=args.pretrained)
        kind = "CLIPModel"
    else:
        model = load_text_tower(name, args.pretrained)
        kind = "CLIPTextModelWithProjection" if args.with_projection else "CLIPTextModel"
    out = export_transformers(model, args.out, tokenizer=tokenizer, pad_id=pad_id,
                              with_projection=args.with_projection, full=args.full, dtype=args.dtype)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"wrote {out}: {kind}, {parameters:.1f}M parameters, {args.dtype}, pad token id {pad_id}")
    print(f"load with: transformers.{kind}.from_pretrained('{out}') and CLIPTokenizer.from_pretrained('{out}')")
    return 0


def _run_sd_single_file(args: argparse.Namespace) -> int:
    """Load each tower, then write --into with them to --out (every shape checked before writing)."""
    from ..checkpoints.sd_write import write_text_encoders
    from ..registry import load_text_tower

    towers = {args.encoders[0]: load_text_tower(args.model, args.pretrained)}
    if len(args.encoders) == 2:
        towers[args.encoders[1]] = load_text_tower(args.model_2, args.pretrained_2)
    result = write_text_encoders(args.into, args.out, towers)
    replaced = ", ".join(f"{encoder} ({count} tensors)" for encoder, count in result.replaced.items())
    print(f"wrote {result.out}: {args.into} ({result.family}) with {replaced} replaced; its {result.copied} other "
          f"tensors and its metadata copied unchanged")
    return 0
