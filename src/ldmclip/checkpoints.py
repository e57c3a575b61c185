"""Reading and writing every checkpoint layout a CLIP user already has, in one place.

Supported on load:

- the OpenCLIP hub layout: a folder with ``open_clip_config.json`` and
  ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``);
- bare state-dict files: ``.safetensors``, ``.bin``, ``.pt``, ``.pth``;
- OpenCLIP training checkpoints (``{"state_dict": ...}``), DDP ``module.`` and ``torch.compile``
  ``_orig_mod.`` prefixes, OpenCLIP's custom-text layout (``text.*``);
- a Hugging Face ``transformers`` ``CLIPModel`` folder (``config.json`` + ``model.safetensors``);
- a text tower alone: a ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder such as
  diffusers' ``text_encoder/`` (read by :func:`ldmclip.conditioning.load_text_tower`; a whole
  CLIP cannot be built from it);
- ``hf-hub:org/repo`` (or ``hf-hub:org/repo/folder``) through the Hugging Face cache (offline once
  cached).

Pickled files are only read with ``torch.load(weights_only=True)``, which refuses anything that
would run code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .files import atomic_write, write_safetensors
from .models.config import CLIPConfig, TextConfig

OPENCLIP_CONFIG_NAME = "open_clip_config.json"
OPENCLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                         "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with OpenCLIP's key names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path), device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that would run code or build objects other than "
                f"tensors when loaded ({str(error).splitlines()[0]}). Only load pickles you trust; convert "
                f"trusted ones to .safetensors with safetensors.torch.save_file."
            ) from None
        except RuntimeError as error:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
    return normalize_state_dict(unwrap_checkpoint(raw, path))


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


_CUSTOM_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def normalize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any supported layout to OpenCLIP ``CLIP`` keys."""
    if "embeddings.token_embedding.weight" in state_dict:
        # transformers 5 saves a CLIPTextModel without the "text_model." prefix that version 4 (and
        # every published diffusers text_encoder/) has
        state_dict = {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in state_dict.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in state_dict):
        return hf_to_openclip_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("text.") and key.split(".")[1] in _CUSTOM_TEXT_KEYS:
            key = key[len("text."):]
        if key.endswith("attn_mask") or key.endswith("position_ids"):
            continue  # buffers rebuilt by the model, not weights
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face transformers CLIPModel <-> OpenCLIP


_HF_BLOCK_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}


def hf_to_openclip_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert ``transformers`` ``CLIPModel`` (or ``CLIPTextModel[WithProjection]``) weights."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        else:
            for hf_prefix, oc_prefix in _HF_TOWERS.items():
                if key.startswith(hf_prefix):
                    index, rest = key[len(hf_prefix):].split(".", 1)
                    block = f"{oc_prefix}{index}."
                    if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                        which, kind = rest[len("self_attn."):].split(".")
                        qkv.setdefault((block, kind), {})[which[0]] = value
                    else:
                        module, kind = rest.rsplit(".", 1)
                        if module not in _HF_BLOCK_NAMES:
                            raise CheckpointError(f"unexpected key in Hugging Face CLIP checkpoint: {key}")
                        out[f"{block}{_HF_BLOCK_NAMES[module]}.{kind}"] = value
                    break
            else:
                raise CheckpointError(f"unexpected key in Hugging Face CLIP checkpoint: {key}")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{block} is missing some of its q/k/v projections in the checkpoint")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{block}attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openclip_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_openclip_state_dict` (for export to ``transformers``)."""
    top = {v: k for k, v in _HF_TOP_NAMES.items()}
    blocks = {v: k for k, v in _HF_BLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        else:
            for hf_prefix, oc_prefix in _HF_TOWERS.items():
                if key.startswith(oc_prefix):
                    index, rest = key[len(oc_prefix):].split(".", 1)
                    block = f"{hf_prefix}{index}."
                    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                        kind = "weight" if rest.endswith("weight") else "bias"
                        for name, part in zip("qkv", value.chunk(3, dim=0)):
                            out[f"{block}self_attn.{name}_proj.{kind}"] = part.contiguous()
                    else:
                        module, kind = rest.rsplit(".", 1)
                        out[f"{block}{blocks[module]}.{kind}"] = value
                    break
            else:
                raise CheckpointError(f"{key} has no counterpart in the transformers CLIPModel layout")
    return out


def _mlp_ratio(hidden: int, width: int) -> float:
    """A short ratio whose ``int(width * ratio)`` gives back the MLP width exactly."""
    for digits in (4, 6, 8):
        ratio = round(hidden / width, digits)
        if int(width * ratio) == hidden:
            return ratio
    return (hidden + 0.25) / width


# transformers' defaults for CLIPTextConfig / CLIPVisionConfig where a config.json omits a value.
_HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                       "layer_norm_eps": 1e-5}


def _check_hf_tower(name: str, tower: dict[str, Any]) -> None:
    if tower["hidden_act"] not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"unsupported {name} activation {tower['hidden_act']!r} in config.json "
                              "(ldmclip supports 'gelu' and 'quick_gelu')")
    if not math.isclose(tower["layer_norm_eps"], 1e-5):
        raise CheckpointError(f"{name} layer_norm_eps={tower['layer_norm_eps']} is not CLIP's 1e-5")


def _text_cfg_from_hf(t: dict[str, Any]) -> dict[str, Any]:
    return {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"], "width": t["hidden_size"],
            "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
            "mlp_ratio": _mlp_ratio(t["intermediate_size"], t["hidden_size"])}


def config_from_hf(hf_config: dict[str, Any], folder: Path | str = "FOLDER") -> CLIPConfig:
    """Build a :class:`CLIPConfig` from a ``transformers`` ``CLIPConfig`` dict (``config.json`` of
    ``folder``, named in errors)."""
    if is_hf_text_config(hf_config):
        architectures = ", ".join(hf_config.get("architectures") or ["CLIPTextModel"])
        raise CheckpointError(
            f"{folder} holds a text encoder alone (transformers {architectures}), not a whole CLIP; load it "
            f"with ldmclip.conditioning.load_text_tower('local-dir:{folder}') or "
            f"TextConditioner.from_pretrained(preset, model='local-dir:{folder}')")
    t = {**_HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    _check_hf_tower("text", t)
    _check_hf_tower("vision", v)
    if t["hidden_act"] != v["hidden_act"]:
        raise CheckpointError(f"config.json has text activation {t['hidden_act']!r} but vision "
                              f"{v['hidden_act']!r}; ldmclip uses one activation for both towers")
    return CLIPConfig.from_dict({
        "embed_dim": hf_config.get("projection_dim", 512),
        "quick_gelu": t["hidden_act"] == "quick_gelu",
        "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["hidden_size"],
                       "layers": v["num_hidden_layers"],
                       "head_width": v["hidden_size"] // v["num_attention_heads"],
                       "mlp_ratio": _mlp_ratio(v["intermediate_size"], v["hidden_size"])},
        "text_cfg": _text_cfg_from_hf(t),
    })


def is_hf_text_config(hf_config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a ``CLIPTextModel[WithProjection]``'s (diffusers' ``text_encoder/``)."""
    architectures = hf_config.get("architectures") or []
    return hf_config.get("model_type") == "clip_text_model" or any(
        str(a).startswith("CLIPTextModel") for a in architectures)


# --------------------------------------------------------------------------------------------
# Folders


def is_openclip_dir(path: Path) -> bool:
    return (path / OPENCLIP_CONFIG_NAME).is_file()


def is_hf_dir(path: Path) -> bool:
    return (path / HF_CONFIG_NAME).is_file() and any((path / n).is_file() for n in HF_WEIGHT_NAMES)


def read_hf_config(path: Path) -> dict[str, Any]:
    with open(path / HF_CONFIG_NAME, encoding="utf-8") as f:
        return json.load(f)


def read_text_encoder_config(path: Path) -> tuple[TextConfig, str] | None:
    """``(text tower config, activation)`` when ``path`` holds a ``transformers`` text encoder alone
    (``CLIPTextModel[WithProjection]``, e.g. diffusers' ``text_encoder/``); ``None`` for any other folder."""
    if not is_hf_dir(path):
        return None
    raw = read_hf_config(path)
    if not is_hf_text_config(raw):
        return None
    t = {**_HF_TEXT_DEFAULTS, **raw}
    _check_hf_tower("text", t)
    return TextConfig(**_text_cfg_from_hf(t)), t["hidden_act"]


def read_dir_config(path: Path) -> tuple[CLIPConfig, dict[str, Any]]:
    """The model config and the preprocessing config of a checkpoint folder."""
    if is_openclip_dir(path):
        with open(path / OPENCLIP_CONFIG_NAME, encoding="utf-8") as f:
            raw = json.load(f)
        if "model_cfg" not in raw:
            raise CheckpointError(f"{path / OPENCLIP_CONFIG_NAME} has no 'model_cfg' entry")
        return CLIPConfig.from_dict(raw["model_cfg"]), dict(raw.get("preprocess_cfg") or {})
    if is_hf_dir(path):
        raw = read_hf_config(path)
        preprocess = {}
        processor = path / "preprocessor_config.json"
        if processor.is_file():
            with open(processor, encoding="utf-8") as f:
                proc = json.load(f)
            preprocess = {k: tuple(proc[src]) for k, src in (("mean", "image_mean"), ("std", "image_std")) if src in proc}
        return config_from_hf(raw, path), preprocess
    raise CheckpointError(
        f"{path} is not a checkpoint folder: expected {OPENCLIP_CONFIG_NAME} (OpenCLIP hub layout) or "
        f"{HF_CONFIG_NAME} with {' or '.join(HF_WEIGHT_NAMES)} (transformers CLIPModel)"
    )


def find_weights_in_dir(path: Path) -> Path:
    names = OPENCLIP_WEIGHT_NAMES + HF_WEIGHT_NAMES
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"no weights in {path}; expected one of: {', '.join(names)}")


def resolve_hf_hub(name: str) -> Path:
    """A local folder holding ``hf-hub:`` repo ``name``: the cache when present, else a download.

    ``name`` is ``org/repo`` or ``org/repo/sub/folder`` (e.g. a diffusers pipeline's
    ``org/repo/text_encoder``), whose folder is returned."""
    from huggingface_hub import snapshot_download

    parts = name.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(f"hf-hub:{name} is not a repository name: use hf-hub:org/repo or hf-hub:org/repo/folder")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [OPENCLIP_CONFIG_NAME, *OPENCLIP_WEIGHT_NAMES, HF_CONFIG_NAME, *HF_WEIGHT_NAMES,
                "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer*.json"]
    if sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types): try the network
        snapshot = None
    if snapshot is None:
        try:
            snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as error:
            raise CheckpointError(
                f"cannot get hf-hub:{name}: it is not in the Hugging Face cache "
                f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}) and "
                f"downloading failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Download it on a machine with network access (huggingface-cli download {repo_id}) and copy the cache."
            ) from None
    folder = snapshot / sub if sub else snapshot
    if not folder.is_dir():
        raise CheckpointError(f"hf-hub:{name}: the repository {repo_id} has no folder {sub!r} (in {snapshot})")
    return folder


# --------------------------------------------------------------------------------------------
# Loading into a model


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


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture a state dict describes (best effort, for error messages)."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    found: dict[str, Any] = {}
    if "visual.conv1.weight" in state_dict:
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


def _suggest_configs(found: dict[str, Any]) -> list[str]:
    from .models.factory import get_model_config, list_models

    matches = []
    for name in list_models():
        cfg = get_model_config(name)
        v, t = cfg.vision_cfg, cfg.text_cfg
        described = {"vision": {"width": v.width, "patch_size": v.patch_size, "layers": v.layers,
                                "image_size": v.image_size},
                     "text": {"width": t.width, "layers": t.layers, "context_length": t.context_length},
                     "embed_dim": cfg.embed_dim}
        if all(described.get(part) == value if not isinstance(value, dict)
               else all(described[part].get(k) == x for k, x in value.items() if k != "image_size")
               for part, value in found.items()):
            matches.append(name)
    return matches


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
                    assign: bool = False) -> None:
    """Copy ``state_dict`` into ``model`` (``assign=True``: take its tensors, for a model built on the
    meta device); any mismatch raises one error that names every problem."""
    state_dict = dict(state_dict)
    expected = model.state_dict()
    pos_key = "visual.positional_embedding"
    if pos_key in state_dict and pos_key in expected and state_dict[pos_key].shape != expected[pos_key].shape \
            and state_dict[pos_key].shape[1:] == expected[pos_key].shape[1:]:
        state_dict[pos_key] = resize_image_positional_embedding(state_dict[pos_key], model.visual.grid_size)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit this model config."]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
            if keys:
                grouped = _group_block_keys(keys)
                shown = ", ".join(grouped[:12]) + (f", … ({len(grouped) - 12} more)" if len(grouped) > 12 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        found = infer_config(state_dict)
        suggestions = _suggest_configs(found)
        if suggestions:
            lines.append(f"  The checkpoint looks like: {', '.join(suggestions)}")
        elif found:
            lines.append(f"  The checkpoint describes: {json.dumps(found)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True, assign=assign)


# --------------------------------------------------------------------------------------------
# Saving


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    write_safetensors(path, state_dict, {"format": "pt"})


def save_hub_layout(model, directory: str | Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (OpenCLIP's hub layout)."""
    directory = Path(directory)
    config = {"model_cfg": model.config.to_dict(), "preprocess_cfg": dict(model.preprocess_cfg)}
    save_state_dict(model.state_dict(), directory / OPENCLIP_WEIGHT_NAMES[0])
    text = json.dumps(config, indent=2, default=list)
    atomic_write(directory / OPENCLIP_CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory
