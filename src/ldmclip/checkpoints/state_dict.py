"""Read a checkpoint file in any supported layout into OpenCLIP ``CLIP`` key names, and load it into a
model with one error that names every mismatch.

Layouts read: bare state-dict files (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``), OpenCLIP
training checkpoints (``{"state_dict": ...}``), DDP ``module.`` and ``torch.compile`` ``_orig_mod.``
prefixes, OpenCLIP's custom-text layout (``text.*``) and ``transformers`` ``CLIPModel`` /
``CLIPTextModel`` keys (mapped by :mod:`.hf`). Pickled files are only read with
``torch.load(weights_only=True)``, which refuses anything that would run code.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from ..core.files import write_safetensors
from ..models.config import RESNET_REDUCTION
from ..models.resnet import is_resnet_state_dict
from ..models.text import is_text_key
from .errors import CheckpointError
from .hf import hf_to_openclip_key, hf_to_openclip_state_dict, with_text_model_prefix

__all__ = ["STATE_DICT_SUFFIXES", "CheckpointError", "read_state_dict", "read_pickle", "unwrap_checkpoint",
           "normalize_state_dict", "openclip_key_names", "resize_image_positional_embedding",
           "infer_config", "is_resnet_state_dict", "load_into_model", "save_state_dict"]

STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


KeyFilter = Callable[[str], bool]


def read_state_dict(path: str | Path, keys: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with OpenCLIP's key names.

    ``keys``: keep only the tensors whose OpenCLIP name it accepts (e.g. ``models.text.is_text_key``).
    From a ``.safetensors`` file only those tensors are read at all; a pickled file is read whole
    and the rest dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors" and keys is not None:
        state = _read_safetensors_keys(path, keys)
    elif path.suffix == ".safetensors":
        state = normalize_state_dict(unwrap_checkpoint(_read_safetensors(path), path))
    else:
        state = normalize_state_dict(unwrap_checkpoint(read_pickle(path), path))
    return state if keys is None else {k: v for k, v in state.items() if keys(k)}


def _first_line(error: BaseException) -> str:
    """The gist of a reader's error, short enough for the one-line message (torch's run to paragraphs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". This is an internal miniz error")[0]  # the rest is advice about torch.save
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def safetensors_error(path: Path, error: BaseException) -> CheckpointError:
    """The one-line error of a ``.safetensors`` file that safetensors cannot read."""
    if path.stat().st_size == 0:
        return CheckpointError(f"cannot read {path}: the file is empty (0 bytes)")
    return CheckpointError(f"cannot read {path}: not a complete .safetensors file (truncated, or damaged: "
                           f"{_first_line(error)})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except OSError:
        raise  # the disk or a permission, not the file's contents
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise safetensors_error(path, error) from None


def _read_safetensors_keys(path: Path, keys: KeyFilter) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose OpenCLIP names pass ``keys``; the others stay on disk."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = openclip_key_names(list(f.keys()))
            raw = {key: f.get_tensor(key) for key, name in names.items() if name is not None and keys(name)}
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - SafetensorError
        raise safetensors_error(path, error) from None
    return normalize_state_dict(raw)


def read_pickle(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (``mmap``: memory-mapped where the file is torch's zip
    format, so tensors nobody touches are never read) with every way a file can fail to be a checkpoint (a pickle
    that would run code, zero bytes, cut short, a text file) as one :class:`CheckpointError` naming it.
    Errors of the disk itself (``OSError``) are raised as they are."""
    path = Path(path)
    with open(path, "rb") as f:
        start = f.read(2)
    if not start:
        raise CheckpointError(f"cannot read {path}: the file is empty (0 bytes)")
    if not start.startswith((b"PK", b"\x80")):  # torch.save writes a zip, older torch a pickle (protocol >= 2)
        raise CheckpointError(f"cannot read {path}: not a checkpoint (neither a .safetensors file nor what "
                              f"torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and start == b"PK")
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():  # not a refusal: a damaged pickle
            raise _not_a_checkpoint(path, error) from None
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that would run code or build objects other than "
            f"tensors when loaded ({str(error).splitlines()[0]}). Only load pickles you trust; convert "
            f"trusted ones to .safetensors with safetensors.torch.save_file."
        ) from None
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - EOFError, RuntimeError (zip), KeyError (a text file), ...
        raise _not_a_checkpoint(path, error) from None


def _not_a_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as a PyTorch checkpoint: it is truncated, damaged or not a "
                           f"checkpoint ({_first_line(error)})")



def unwrap_checkpoint(raw: Any, source: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (``state_dict``/``model`` entries)."""
    if isinstance(raw, dict):
        for key in ("state_dict", "model", "module"):
            if key in raw and isinstance(raw[key], dict):
                return unwrap_checkpoint(raw[key], source)
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{source} holds no state dict (a mapping of parameter names to tensors)")


# transformers 5 saves a CLIPTextModel without the "text_model." prefix that version 4 (and every
# published diffusers text_encoder/) has
_with_hf4_prefix = with_text_model_prefix


def _is_hf5_text(keys: Collection[str]) -> bool:
    return "embeddings.token_embedding.weight" in keys


def _is_hf(keys: Iterable[str]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in keys)


def _openclip_key(key: str) -> str | None:
    """The name of one key of an OpenCLIP-style checkpoint (``None``: a buffer the model rebuilds)."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("text.") and is_text_key(key[len("text."):]):  # OpenCLIP's custom-text layout
        key = key[len("text."):]
    if key.endswith("attn_mask") or key.endswith("position_ids"):
        return None  # buffers rebuilt by the model, not weights
    if key in _OPENAI_METADATA:
        return None
    return key


# OpenAI's released CLIP files carry these scalars beside the weights (its own loader, and OpenCLIP's
# build_model_from_openai_state_dict, drop them); the config says the same.
_OPENAI_METADATA = frozenset({"input_resolution", "context_length", "vocab_size"})


def openclip_key_names(keys: Collection[str]) -> dict[str, str | None]:
    """What :func:`normalize_state_dict` names each of ``keys`` (``None``: dropped), from the names
    alone; the q/k/v keys of a ``transformers`` block share their ``in_proj`` name."""
    if _is_hf5_text(keys):
        return {k: hf_to_openclip_key(_with_hf4_prefix(k)) for k in keys}
    if _is_hf(keys):
        return {k: hf_to_openclip_key(k) for k in keys}
    return {k: _openclip_key(k) for k in keys}


def normalize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any supported layout to OpenCLIP ``CLIP`` keys."""
    if _is_hf5_text(state_dict):
        state_dict = {_with_hf4_prefix(k): v for k, v in state_dict.items()}
    if _is_hf(state_dict):
        return hf_to_openclip_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        name = _openclip_key(key)
        if name is not None:
            out[name] = value
    return out


def resize_image_positional_embedding(pos: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Bicubically resample the patch grid of a ViT positional embedding (class token kept)."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    old_grid = int(math.isqrt(patch_pos.shape[0]))
    if old_grid * old_grid != patch_pos.shape[0]:
        raise CheckpointError(f"visual.positional_embedding has {patch_pos.shape[0]} patch positions, not a square grid")
    grid = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=0)


def resize_text_positional_embedding(pos: torch.Tensor, context_length: int) -> torch.Tensor:
    """Linearly resample a text positional embedding ``[L, width]`` to ``context_length`` positions, as
    OpenCLIP's ``resize_text_pos_embed`` does for ``force_context_length`` (no antialiasing)."""
    if pos.shape[0] == context_length:
        return pos
    line = pos.float().T.unsqueeze(0)  # [1, width, L]
    line = F.interpolate(line, size=context_length, mode="linear", antialias=False, align_corners=False)
    return line[0].T.contiguous().to(pos.dtype)


def _is_square_grid(positions: int) -> bool:
    return positions > 0 and math.isqrt(positions) ** 2 == positions


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture a state dict describes (best effort, for error messages)."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    found: dict[str, Any] = {}
    if is_resnet_state_dict(state_dict):
        found["vision"] = _infer_resnet(state_dict, count)
    elif "visual.conv1.weight" in state_dict:
        conv = state_dict["visual.conv1.weight"]
        found["vision"] = {"width": conv.shape[0], "patch_size": conv.shape[-1],
                           "layers": count("visual.transformer.resblocks.")}
        if "visual.positional_embedding" in state_dict:
            grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
            found["vision"]["image_size"] = grid * conv.shape[-1]
    if "token_embedding.weight" in state_dict:
        found["text"] = {"width": state_dict["token_embedding.weight"].shape[1],
                         "layers": count("transformer.resblocks.")}
        if "positional_embedding" in state_dict:
            found["text"]["context_length"] = state_dict["positional_embedding"].shape[0]
    if "text_projection" in state_dict:
        found["embed_dim"] = state_dict["text_projection"].shape[-1]
    return found


def _infer_resnet(state_dict: dict[str, torch.Tensor], count: Callable[[str], int]) -> dict[str, Any]:
    # layer1's first block has the stem width as its inner width; the attention pool's grid is
    # image_size / 32 on a side
    found: dict[str, Any] = {"layers": [count(f"visual.layer{i}.") for i in range(1, 5)], "patch_size": None}
    if "visual.layer1.0.conv1.weight" in state_dict:
        found["width"] = state_dict["visual.layer1.0.conv1.weight"].shape[0]
    pos = state_dict.get("visual.attnpool.positional_embedding")
    if pos is not None:
        found["image_size"] = math.isqrt(pos.shape[0] - 1) * RESNET_REDUCTION
    return found


def _tower_kind(is_resnet: bool) -> str:
    return "a ResNet image tower (visual.layer1-4, visual.attnpool)" if is_resnet \
        else "a ViT image tower (visual.transformer, visual.positional_embedding)"


def _group_block_keys(keys: list[str]) -> list[str]:
    """Collapse per-block keys: ``resblocks.2.ln_1.weight`` … ``resblocks.5.ln_1.weight`` become
    ``resblocks.{2..5}.ln_1.weight``, so a message about a deeper model stays readable."""
    groups: dict[str, list[int]] = {}
    for key in keys:
        match = re.search(r"resblocks\.(\d+)\.", key)
        if match:
            pattern = key[:match.start(1)] + "{}" + key[match.end(1):]
            groups.setdefault(pattern, []).append(int(match.group(1)))
        else:
            groups.setdefault(key, [])
    out = []
    for pattern, indices in groups.items():
        if not indices:
            out.append(pattern)
        elif len(indices) == 1:
            out.append(pattern.format(indices[0]))
        else:
            out.append(pattern.format(f"{{{min(indices)}..{max(indices)}}}"))
    return out


def load_into_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                    assign: bool = False, suggest: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
    """Copy ``state_dict`` into ``model`` (``assign=True``: take its tensors, for a model built on the
    meta device); any mismatch raises one error that names every problem. ``suggest`` names the known
    configs that fit what the checkpoint describes (the registry's, which this layer cannot see)."""
    state_dict = dict(state_dict)
    expected = model.state_dict()
    # A ViT's positional embedding and a ResNet's attention-pool one share a layout (one extra token,
    # then the grid): either is resampled to the model's image size.
    for pos_key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if pos_key in state_dict and pos_key in expected and state_dict[pos_key].shape != expected[pos_key].shape \
                and state_dict[pos_key].shape[1:] == expected[pos_key].shape[1:] \
                and _is_square_grid(state_dict[pos_key].shape[0] - 1):
            state_dict[pos_key] = resize_image_positional_embedding(state_dict[pos_key], model.visual.grid_size)
    # (a grid that is not square is not another image size but another model: reported below as mis-shaped)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        # One line (the command line shows a CheckpointError as one), the problems separated by "; ".
        parts = []
        has_visual = any(k.startswith("visual.") for k in state_dict) and any(k.startswith("visual.") for k in expected)
        if has_visual and is_resnet_state_dict(state_dict) != is_resnet_state_dict(expected):
            parts.append(f"the checkpoint holds {_tower_kind(is_resnet_state_dict(state_dict))} but the model "
                         f"config builds {_tower_kind(is_resnet_state_dict(expected))}")
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
            if keys:
                grouped = _group_block_keys(keys)
                shown = ", ".join(grouped[:12]) + (f", … ({len(grouped) - 12} more)" if len(grouped) > 12 else "")
                parts.append(f"{title} ({len(keys)}): {shown}")
        found = infer_config(state_dict)
        suggestions = suggest(found) if suggest is not None else []
        if suggestions:
            parts.append(f"the checkpoint looks like: {', '.join(suggestions)}")
        elif found:
            parts.append(f"the checkpoint describes: {json.dumps(found)}")
        raise CheckpointError(f"{source} does not fit this model config: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True, assign=assign)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    write_safetensors(path, state_dict, {"format": "pt"})
