"""The text encoders inside single-file Stable Diffusion checkpoints (the ``.safetensors`` / ``.ckpt``
files of Stability, A1111, ComfyUI and kohya's scripts), read into ldmclip text towers.

Which encoders a file holds is decided from its key names alone; then only their tensors are read
(``.safetensors``: from the file's header and those tensors' bytes; pickles: ``torch.load`` with
``weights_only=True``, memory-mapped where the file is torch's zip format). The layouts, as
diffusers' ``loaders/single_file_utils.py`` (0.42) knows them (``CHECKPOINT_KEY_NAMES``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``):

============  ==================  =========================================  =============================
family        encoder             key prefix                                 layout
============  ==================  =========================================  =============================
sd1           text_encoder        ``cond_stage_model.transformer.``          transformers CLIPTextModel
sd2           text_encoder        ``cond_stage_model.model.``                OpenCLIP (ViT-H/14)
sdxl          text_encoder        ``conditioner.embedders.0.transformer.``   transformers (CLIP-L)
sdxl          text_encoder_2      ``conditioner.embedders.1.model.``         OpenCLIP (bigG, projection)
sdxl-refiner  text_encoder_2      ``conditioner.embedders.0.model.``         OpenCLIP (bigG, projection)
sd3           text_encoder        ``text_encoders.clip_l.transformer.``      transformers (CLIP-L)
sd3           text_encoder_2      ``text_encoders.clip_g.transformer.``      transformers (CLIP-G)
text-encoder  text_encoder        (none: ``clip_l.safetensors`` etc.)        transformers or OpenCLIP
============  ==================  =========================================  =============================

The encoder names are those of a diffusers pipeline's folders. A tower's architecture comes from
its tensors' shapes (width, blocks, context length, vocabulary, MLP width, projection) checked
against a config: the one the caller names, else the packaged config the family's published
checkpoints use (``FAMILY_CONFIGS``); a text encoder alone is matched against every packaged config.
The number of attention heads and the activation cannot be read from shapes: they come from that
config. An encoder without a projection (``CLIPTextModel``) pools like ``transformers``'
``pooler_output``: the final-LayerNorm state at the end-of-text token (an identity projection).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch
from safetensors import SafetensorError

from ..models.config import TextConfig
from ..models.text import is_text_key
from . import state_dict as _state_dict
from .errors import CheckpointError
from .hf import hf_to_openclip_key, hf_to_openclip_state_dict, with_text_model_prefix

__all__ = ["FAMILY_CONFIGS", "FoundEncoder", "SDTextEncoder", "TowerConfig", "find_text_encoders",
           "encoder_shapes", "is_single_file_checkpoint", "read_text_encoders"]

logger = logging.getLogger(__name__)

HF, OPENCLIP = "transformers", "openclip"
TEXT_ENCODER_ALONE = "text-encoder"


@dataclass(frozen=True)
class _Slot:
    family: str
    encoder: str
    prefix: str
    layout: str


_SLOTS = (
    _Slot("sd1", "text_encoder", "cond_stage_model.transformer.", HF),
    _Slot("sd2", "text_encoder", "cond_stage_model.model.", OPENCLIP),
    _Slot("sdxl", "text_encoder", "conditioner.embedders.0.transformer.", HF),
    _Slot("sdxl", "text_encoder_2", "conditioner.embedders.1.model.", OPENCLIP),
    _Slot("sdxl-refiner", "text_encoder_2", "conditioner.embedders.0.model.", OPENCLIP),
    _Slot("sd3", "text_encoder", "text_encoders.clip_l.transformer.", HF),
    _Slot("sd3", "text_encoder_2", "text_encoders.clip_g.transformer.", HF),
)
# Key prefixes of the other parts of such files (U-Net, VAE, T5, ...): a file with these is a
# single-file checkpoint, never a text encoder alone.
_OTHER_PARTS = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.",
                "text_encoders.", "model_ema.")

# The packaged config of each encoder in a family's published checkpoints (OpenAI's CLIP-L uses
# QuickGELU; LAION's ViT-H and bigG use GELU: the activations of diffusers' text_encoder configs).
FAMILY_CONFIGS: dict[tuple[str, str], str] = {
    ("sd1", "text_encoder"): "ViT-L-14-quickgelu",
    ("sd2", "text_encoder"): "ViT-H-14",
    ("sdxl", "text_encoder"): "ViT-L-14-quickgelu",
    ("sdxl", "text_encoder_2"): "ViT-bigG-14",
    ("sdxl-refiner", "text_encoder_2"): "ViT-bigG-14",
    ("sd3", "text_encoder"): "ViT-L-14-quickgelu",
    ("sd3", "text_encoder_2"): "ViT-bigG-14",
}
_SD_ENCODER_CONFIGS = frozenset(FAMILY_CONFIGS.values())


@dataclass(frozen=True)
class TowerConfig:
    """What building a text tower takes: its config, its output width and its activation."""

    text_cfg: TextConfig
    embed_dim: int
    activation: str


@dataclass(frozen=True)
class FoundEncoder:
    """One text encoder of a file, from its key names: which family and slot, in which layout, and the
    file's key for each OpenCLIP name (the q, k and v keys of a transformers block share one name)."""

    family: str
    encoder: str
    layout: str
    prefix: str
    keys: tuple[tuple[str, str], ...]  # (key in the file, OpenCLIP name)


@dataclass
class SDTextEncoder:
    """A text encoder read from a file: its OpenCLIP-layout tensors (a projection always present) and
    the config they were checked against."""

    family: str
    encoder: str
    config_name: str
    config: TowerConfig
    state: dict[str, torch.Tensor]


def _hf_name(key: str) -> str | None:
    name = hf_to_openclip_key(with_text_model_prefix(key))
    return name if name is not None and is_text_key(name) else None


def _openclip_name(key: str) -> str | None:
    return key if is_text_key(key) and not key.endswith("attn_mask") else None


def _names(slot_keys: dict[str, str], layout: str, path: Path) -> tuple[tuple[str, str], ...]:
    """``(file key, OpenCLIP name)`` of the keys under one prefix (``slot_keys``: rest -> file key)."""
    out = []
    for rest, key in slot_keys.items():
        try:
            name = _hf_name(rest) if layout == HF else _openclip_name(rest)
        except CheckpointError:
            raise CheckpointError(f"{path}: unexpected key {key} in a transformers CLIP text encoder") from None
        if name is not None:
            out.append((key, name))
    return tuple(out)


def _standalone(keys: Collection[str], path: Path) -> FoundEncoder | None:
    """A text encoder alone (``clip_l.safetensors``): transformers or OpenCLIP keys, no image tower."""
    if any(k.startswith(_OTHER_PARTS) for k in keys):
        return None
    if any(k.startswith(("vision_model.", "visual.", "visual_projection")) for k in keys):
        return None  # a whole CLIP: not this module's
    if "text_model.embeddings.token_embedding.weight" in keys or "embeddings.token_embedding.weight" in keys:
        layout = HF
    elif "token_embedding.weight" in keys:
        layout = OPENCLIP
    else:
        return None
    return FoundEncoder(TEXT_ENCODER_ALONE, "text_encoder", layout, "", _names({k: k for k in keys}, layout, path))


def _describe_keys(keys: Collection[str]) -> str:
    if not keys:
        return "no tensors"
    tops = Counter(".".join(k.split(".")[:2]) if "." in k else k for k in keys)
    shown = ", ".join(f"{top}.* ({count})" for top, count in tops.most_common(6))
    return f"{len(keys)} tensors: {shown}{', …' if len(tops) > 6 else ''}"


def _find(keys: Collection[str], path: Path) -> list[FoundEncoder]:
    found = []
    for slot in _SLOTS:
        rest = {k[len(slot.prefix):]: k for k in keys if k.startswith(slot.prefix)}
        if rest:
            found.append(FoundEncoder(slot.family, slot.encoder, slot.layout, slot.prefix,
                                      _names(rest, slot.layout, path)))
    families = sorted({f.family for f in found})
    if len(families) > 1:
        raise CheckpointError(f"{path} mixes the text encoders of several checkpoint families "
                              f"({', '.join(families)}); ldmclip reads one family per file")
    if not found:
        alone = _standalone(keys, path)
        found = [alone] if alone is not None else []
    return found


Shape = Callable[[str], tuple[int, ...]]
Pick = Callable[[Collection[str], Shape], Collection[str]]


def _open_and_pick(path: Path, pick: Pick) -> dict[str, torch.Tensor]:
    """The tensors ``pick`` chooses from the file's key names (and their shapes, read from a
    ``.safetensors`` header); a ``.safetensors`` file's other tensors stay on disk."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:  # state_dict's safe_open: the one place tests can watch what is read
            with _state_dict.safe_open(str(path), framework="pt", device="cpu") as f:
                wanted = pick(list(f.keys()), lambda key: tuple(f.get_slice(key).get_shape()))
                return {k: f.get_tensor(k) for k in wanted}
        except SafetensorError as error:  # only the file's own errors: a truncated or damaged file
            raise _state_dict.safetensors_error(path, error) from None
    raw = _state_dict.unwrap_checkpoint(_state_dict.read_pickle(path, mmap=True), path)
    return {k: raw[k] for k in pick(list(raw), lambda key: tuple(raw[key].shape))}


def find_text_encoders(path: str | Path) -> list[FoundEncoder]:
    """The text encoders a file holds, from its key names (no tensor read from a ``.safetensors``);
    ``[]`` for a file that holds none, or a whole CLIP (which ``read_state_dict`` reads)."""
    path = Path(path)
    found: list[FoundEncoder] = []

    def pick(keys: Collection[str], shape: Shape) -> list[str]:
        found.extend(_find(keys, path))
        return []

    _open_and_pick(path, pick)
    return found


def is_single_file_checkpoint(path: str | Path | None) -> bool:
    """Whether ``path`` is a file holding the text encoders of an SD checkpoint family (not a text
    encoder alone): what the command line's ``--pretrained`` hands to ``from_single_file``."""
    if path is None or not Path(path).is_file():
        return False
    return any(f.family != TEXT_ENCODER_ALONE for f in find_text_encoders(path))


def encoder_shapes(found: FoundEncoder, shape: Shape, what: str | None = None) -> dict[str, int | None]:
    """The architecture an encoder's tensors describe, as far as their shapes (not yet read) tell
    (``what`` names the encoder in errors)."""
    keys = {}
    for key, name in found.keys:
        keys.setdefault(name, key)
    for name in ("token_embedding.weight", "positional_embedding"):
        if name not in keys:
            raise CheckpointError(f"{what or found.encoder} has no {name} ({len(keys)} text tensors)")
    vocab, width = shape(keys["token_embedding.weight"])
    blocks = {name.split(".")[2] for name in keys if name.startswith("transformer.resblocks.")}
    fc = keys.get("transformer.resblocks.0.mlp.c_fc.weight")
    embed_dim = None
    if "text_projection" in keys:  # transformers' is an nn.Linear weight [out, in]; OpenCLIP's a matrix [in, out]
        embed_dim = shape(keys["text_projection"])[0 if found.layout == HF else -1]
    return {"width": int(width), "layers": len(blocks), "context_length": int(shape(keys["positional_embedding"])[0]),
            "vocab_size": int(vocab), "intermediate_size": None if fc is None else int(shape(fc)[0]),
            "embed_dim": None if embed_dim is None else int(embed_dim)}


def _fits(shapes: Mapping[str, int | None], cfg: TowerConfig) -> bool:
    t = cfg.text_cfg
    return (shapes["width"], shapes["layers"], shapes["context_length"], shapes["vocab_size"],
            shapes["intermediate_size"]) == (t.width, t.layers, t.context_length, t.vocab_size,
                                             int(t.width * t.mlp_ratio)) \
        and shapes["embed_dim"] in (None, cfg.embed_dim)


def _describe(shapes: Mapping[str, int | None]) -> str:
    projection = "no projection" if shapes["embed_dim"] is None else f"projection to {shapes['embed_dim']}"
    return (f"width {shapes['width']}, {shapes['layers']} blocks, context length {shapes['context_length']}, "
            f"vocabulary {shapes['vocab_size']}, MLP width {shapes['intermediate_size']}, {projection}")


def _check_named(found: FoundEncoder, shapes: Mapping[str, int | None], what: str, model: tuple[str, TowerConfig],
                 packaged: Mapping[str, TowerConfig]) -> tuple[str, TowerConfig]:
    """``model`` when the shapes fit it."""
    if not _fits(shapes, model[1]):
        fits = [name for name, cfg in sorted(packaged.items()) if _fits(shapes, cfg)]
        hint = f"; it fits {', '.join(fits)}" if fits else ""
        raise CheckpointError(f"{what} ({_describe(shapes)}) does not fit the text tower of {model[0]}{hint}")
    expected = FAMILY_CONFIGS.get((found.family, found.encoder))
    usual = packaged.get(expected) if expected is not None else None
    # the family's shapes with another activation: most likely the other variant (-quickgelu) was meant
    if usual is not None and _fits(shapes, usual) and usual.activation != model[1].activation:
        logger.warning("%s is loaded as %s (activation %s), but %s checkpoints hold %s (activation %s)", what,
                       model[0], model[1].activation, found.family, expected, usual.activation)
    return model


def _match(found: FoundEncoder, shapes: Mapping[str, int | None], what: str,
           model: tuple[str, TowerConfig] | None, packaged: Mapping[str, TowerConfig]) -> tuple[str, TowerConfig]:
    """The config an encoder's shapes are checked against (see the module docstring)."""
    expected = FAMILY_CONFIGS.get((found.family, found.encoder))
    if model is not None:
        return _check_named(found, shapes, what, model, packaged)
    fits = {name: cfg for name, cfg in sorted(packaged.items()) if _fits(shapes, cfg)}
    if expected is not None:
        if expected in fits:
            return expected, fits[expected]
        other = f"; it fits {', '.join(fits)}" if fits else ""
        raise CheckpointError(f"{what} ({_describe(shapes)}) is not the {expected} text tower {found.family} "
                              f"checkpoints hold{other}: pass model= the config it is")
    if not fits:
        raise CheckpointError(f"{what} ({_describe(shapes)}) matches no packaged model config; pass model= a "
                              f"config (a packaged name or a JSON file) whose text tower it is")
    distinct = {(repr(cfg.text_cfg), cfg.activation): name for name, cfg in fits.items()}
    preferred = [name for name in fits if name in _SD_ENCODER_CONFIGS]
    if len(distinct) == 1:
        name = next(iter(fits))
    elif len(preferred) == 1:  # the encoder Stable Diffusion uses (OpenAI's CLIP-L is QuickGELU)
        name = preferred[0]
    else:
        raise CheckpointError(f"{what} ({_describe(shapes)}) fits several packaged configs that differ in heads "
                              f"or activation ({', '.join(fits)}); pass model= the one it is")
    return name, fits[name]


def _label(path: Path, found: FoundEncoder) -> str:
    if found.family == TEXT_ENCODER_ALONE:
        return f"the text encoder in {path}"
    return f"{found.encoder} ({found.prefix}*) of the {found.family} checkpoint {path}"


def _to_openclip(found: FoundEncoder, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if found.layout == HF:
        rest = len(found.prefix)
        return hf_to_openclip_state_dict({with_text_model_prefix(k[rest:]): raw[k] for k, _ in found.keys})
    return {name: raw[key] for key, name in found.keys}


def _select(path: Path, found: list[FoundEncoder], shape: Shape, model: tuple[str, TowerConfig] | None,
            encoder: str | None) -> list[tuple[FoundEncoder, dict[str, int | None]]]:
    """The encoders to read, with their shapes: ``encoder``, else the one that fits ``model``, else all."""
    if encoder is not None:
        if encoder not in [f.encoder for f in found]:
            raise CheckpointError(f"{path} has no text encoder {encoder!r}; it has: "
                                  f"{', '.join(f.encoder for f in found)}")
        found = [f for f in found if f.encoder == encoder]
    pairs = [(f, encoder_shapes(f, shape, _label(path, f))) for f in found]
    if model is None or len(pairs) == 1:
        return pairs
    fitting = [(f, s) for f, s in pairs if _fits(s, model[1])]
    if len(fitting) != 1:
        listed = "; ".join(f"{f.encoder}: {_describe(s)}" for f, s in pairs)
        problem = "none fits" if not fitting else "several fit"
        raise CheckpointError(f"{path} holds {len(pairs)} text encoders and {problem} the text tower of "
                              f"{model[0]} ({listed}); pass encoder= to choose")
    return fitting


def read_text_encoders(path: str | Path, packaged: Mapping[str, TowerConfig],
                       model: tuple[str, TowerConfig] | None = None,
                       encoder: str | None = None) -> dict[str, SDTextEncoder]:
    """The text encoders of a single-file checkpoint (or of a text-encoder file), by encoder name, each
    checked against a config before any tensor is read: ``model`` (``(name, config)``), else the
    family's packaged config, or for a text encoder alone the one of ``packaged`` its shapes fit.

    ``encoder`` reads only that one; with ``model`` and no ``encoder`` only the encoders that fit
    ``model`` are read (``load_text_tower("ViT-L-14-quickgelu", sdxl_file)`` picks CLIP-L).
    The other tensors of the file are never read."""
    path = Path(path)
    chosen: list[tuple[FoundEncoder, str, TowerConfig]] = []

    def pick(keys: Collection[str], shape: Shape) -> list[str]:
        found = _find(keys, path)
        if not found:
            raise CheckpointError(f"{path} holds no CLIP text encoder (none of the keys of an SD 1.x/2.x/SDXL/SD 3 "
                                  f"checkpoint's text encoders, nor a text encoder alone); it has "
                                  f"{_describe_keys(keys)}")
        for f, s in _select(path, found, shape, model, encoder):
            chosen.append((f, *_match(f, s, _label(path, f), model, packaged)))
        return [key for f, _, _ in chosen for key, _ in f.keys]

    raw = _open_and_pick(path, pick)
    out = {}
    for found, name, cfg in chosen:
        state = _to_openclip(found, raw)
        if "text_projection" not in state:  # CLIPTextModel: pooled = the EOT state itself
            width = cfg.text_cfg.width
            state["text_projection"] = torch.eye(width, dtype=state["positional_embedding"].dtype)
            cfg = TowerConfig(cfg.text_cfg, width, cfg.activation)
        out[found.encoder] = SDTextEncoder(found.family, found.encoder, name, cfg, state)
    return out
