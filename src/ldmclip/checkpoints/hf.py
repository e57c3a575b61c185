"""The Hugging Face ``transformers`` layouts, both directions side by side: ``CLIPModel`` /
``CLIPTextModel[WithProjection]`` state-dict keys <-> OpenCLIP's, and ``config.json`` -> ``CLIPConfig``.
(Writing a whole ``transformers`` folder is ``conditioning.export``.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..models.config import CLIPConfig, TextConfig
from ..models.resnet import is_resnet_state_dict
from .errors import CheckpointError

__all__ = ["HF_CONFIG_NAME", "HF_WEIGHT_NAMES", "hf_to_openclip_key", "with_text_model_prefix",
           "hf_to_openclip_state_dict", "openclip_to_hf_state_dict",
           "config_from_hf", "is_hf_text_config", "is_hf_dir", "read_hf_config", "read_text_encoder_config"]

HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


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


_QKV = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")
_TRANSPOSED = ("text_projection", "visual.proj")  # nn.Linear weights in transformers, matrices in OpenCLIP


def with_text_model_prefix(key: str) -> str:
    """A ``CLIPTextModel`` key in the layout of transformers 4 (``text_model.embeddings...``): transformers 5
    saves a ``CLIPTextModel`` without that prefix, and so do some SD 1.x single-file checkpoints."""
    if key.startswith("text_model.") or key == "text_projection.weight":
        return key
    return f"text_model.{key}"


def hf_to_openclip_key(key: str) -> str | None:
    """The OpenCLIP name a ``transformers`` ``CLIPModel`` / ``CLIPTextModel`` key becomes (``None``: a
    buffer that is no weight). The q, k and v projections of a block all become its ``in_proj`` key.
    From the name alone, so a reader can pick the keys it needs before reading any tensor."""
    if key.endswith("position_ids"):
        return None
    if key in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[key]
    if key == "text_projection.weight":
        return "text_projection"
    if key == "visual_projection.weight":
        return "visual.proj"
    for hf_prefix, oc_prefix in _HF_TOWERS.items():
        if key.startswith(hf_prefix):
            index, rest = key[len(hf_prefix):].split(".", 1)
            block = f"{oc_prefix}{index}."
            module, kind = rest.rsplit(".", 1)
            if rest.startswith(_QKV):
                return f"{block}attn.in_proj_{kind}"
            if module in _HF_BLOCK_NAMES:
                return f"{block}{_HF_BLOCK_NAMES[module]}.{kind}"
            break
    raise CheckpointError(f"unexpected key in Hugging Face CLIP checkpoint: {key}")


def hf_to_openclip_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert ``transformers`` ``CLIPModel`` (or ``CLIPTextModel[WithProjection]``) weights."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        target = hf_to_openclip_key(key)
        if target is None:
            continue
        if target.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):  # q, k or v: joined below
            qkv.setdefault(target, {})[key.rsplit(".", 2)[-2][0]] = value
        elif target in _TRANSPOSED:
            out[target] = value.t().contiguous()
        else:
            out[target] = value
    for target, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            block = target.rsplit("attn.", 1)[0]
            raise CheckpointError(f"{block} is missing some of its q/k/v projections in the checkpoint")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openclip_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_openclip_state_dict` (for export to ``transformers``)."""
    if is_resnet_state_dict(state_dict):
        raise CheckpointError("this model's image tower is a ResNet (visual.layer1-4, visual.attnpool), and "
                              "transformers' CLIPModel has only ViT image towers: export the text tower alone "
                              "(ldmclip export --format transformers without --full), or save the whole model "
                              "in the OpenCLIP layout (model.save_pretrained)")
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
