"""Model configs as typed data.

The JSON layout is OpenCLIP's ``model_cfg`` layout (``embed_dim``, ``quick_gelu``, ``vision_cfg``,
``text_cfg``), so the ``model_cfg`` entry of an ``open_clip_config.json`` loads as it is and a config
saved by ldmclip loads in OpenCLIP.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError

# Keys that OpenCLIP configs may carry and that do not change the architecture we build
# (or only select the values we already use); accepted and ignored.
_IGNORED_KEYS = {"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                 "timm_drop", "timm_drop_path", "custom_text", "cast_dtype", "init_logit_scale",
                 "input_patchnorm", "global_average_pool", "embed_cls", "output_tokens", "attn_pooler_heads",
                 "attn_pooler_queries", "pad_id", "tokenizer_kwargs", "hf_tokenizer_name", "proj_type"}

# OpenCLIP options whose non-default values build an architecture ldmclip does not implement.
_UNSUPPORTED_VALUES = {
    "attentional_pool": False, "ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
    "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None, "proj_bias": False, "attn_mask": True,
    "output_tokens": False,
}


def _check_keys(section: str, raw: dict[str, Any], known: set[str]) -> dict[str, Any]:
    kept = {}
    for key, value in raw.items():
        if key in known:
            kept[key] = value
        elif key in _UNSUPPORTED_VALUES:
            if value != _UNSUPPORTED_VALUES[key] and not (key == "act_kwargs" and not value):
                raise ValueError(f"{section}.{key}={value!r} describes an architecture ldmclip does not implement")
        elif key == "pool_type":
            expected = "tok" if section == "vision_cfg" else "argmax"
            if value not in (expected, "eos" if section == "text_cfg" else expected):
                raise ValueError(f"{section}.pool_type={value!r} is not supported (ldmclip pools with {expected!r})")
        elif key not in _IGNORED_KEYS:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown key {section}.{key} in model config; {hint}known keys: {sorted(known)}")
    return kept


# A ModifiedResNet halves the image five times (stem conv, stem pool, three strided stages): its
# attention pool sees an (image_size // 32)² grid (OpenCLIP's modified_resnet.py).
RESNET_REDUCTION = 32


@dataclass
class VisionConfig:
    """The image tower: a ViT (``layers`` one number, ``patch_size`` set) or, as in OpenCLIP, a
    ModifiedResNet when ``layers`` is a list of the four stages' block counts (``[3, 4, 6, 3]``),
    ``width`` then being the stem width and ``patch_size`` null."""

    image_size: int = 224
    patch_size: int | None = 16
    width: int = 768
    layers: int | list[int] = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        """Refuse a mix of the two towers' options (called again after ``create_model``'s overrides)."""
        if self.is_resnet:
            if len(self.layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in self.layers):
                raise UserError(f"vision_cfg.layers={self.layers!r}: a ResNet tower has 4 stages, each of at "
                                f"least one block (e.g. [3, 4, 6, 3])")
            if self.patch_size is not None:
                raise UserError(f"vision_cfg has layers as a list ({self.layers}: a ResNet tower) and "
                                f"patch_size={self.patch_size} (a ViT's): drop patch_size (or set it to null) "
                                f"for a ResNet, or give layers as one number for a ViT")
            if self.image_size < RESNET_REDUCTION:
                raise UserError(f"vision_cfg.image_size={self.image_size}: a ResNet tower needs images of at "
                                f"least {RESNET_REDUCTION} pixels")
            if self.patch_dropout:
                raise UserError(f"patch_dropout={self.patch_dropout} needs a ViT image tower; this config's is a "
                                f"ResNet (vision_cfg.layers={self.layers}), which has no patches to drop; choose a ViT "
                                f"model (e.g. ViT-T-8-64 at 64 px) or leave patch dropout at 0")
        elif self.patch_size is None:
            raise UserError("vision_cfg.patch_size is null but layers is one number (a ViT tower): give the "
                             "patch size, or layers as a list of four stages for a ResNet")

    @property
    def is_resnet(self) -> bool:
        """Whether this describes a ModifiedResNet (``layers`` a list, as OpenCLIP decides it)."""
        return isinstance(self.layers, list)

    @property
    def heads(self) -> int:
        # A ResNet's attention pool runs over its width * 32 output channels (OpenCLIP's vision_heads).
        channels = self.width * 32 if self.is_resnet else self.width
        return channels // self.head_width

    @property
    def grid_size(self) -> int:
        """The side of the grid the positional embedding covers: patches, or a ResNet's last feature map."""
        return self.image_size // (RESNET_REDUCTION if self.is_resnet else self.patch_size)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP-style models with a logit_bias

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPConfig":
        raw = dict(raw)
        if "model_cfg" in raw:  # a whole open_clip_config.json
            raw = dict(raw["model_cfg"])
        vision = raw.pop("vision_cfg", {})
        text = raw.pop("text_cfg", {})
        if isinstance(vision.get("image_size"), (list, tuple)):
            height, width = vision["image_size"]
            if height != width:
                raise ValueError("only square images are supported (vision_cfg.image_size)")
            vision = {**vision, "image_size": height}
        if isinstance(vision.get("layers"), (list, tuple)) and "patch_size" not in vision:
            vision = {**vision, "patch_size": None}  # a ResNet; OpenCLIP's own configs say null
        # vision_cfg and text_cfg are popped above but stay in the known keys: a typo of them
        # ("vision_cfgs") must be told which sections exist
        top = _check_keys("model", raw, {f.name for f in dataclasses.fields(cls)})
        return cls(
            vision_cfg=VisionConfig(**_check_keys("vision_cfg", vision, {f.name for f in dataclasses.fields(VisionConfig)})),
            text_cfg=TextConfig(**_check_keys("text_cfg", text, {f.name for f in dataclasses.fields(TextConfig)})),
            **top,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        raw.pop("preprocess_cfg", None)  # a packaged-style config may carry its preprocessing
        try:
            return cls.from_dict(raw)
        except UserError as error:  # name the file the mistake is in
            raise UserError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["init_logit_bias"] is None:
            del out["init_logit_bias"]
        return out
