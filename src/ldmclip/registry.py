"""The model registry and the public constructors (``create_model`` and friends, ``load_text_tower``):
configs + checkpoints -> models.

A model is named the way OpenCLIP names it, so an OpenCLIP user changes only the import:

- a packaged config name (``ViT-L-14``; see :func:`list_models`);
- a path to a JSON config file;
- ``hf-hub:org/repo`` or ``hf-hub:org/repo/folder`` (config and weights from the Hugging Face cache);
- ``local-dir:/path`` (config and weights from a checkpoint folder).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoints
from .checkpoints import checkpoint_folder
from .core.errors import UserError
from .core.formats import HF_HUB_PREFIX
from .core.precision import precision_dtype
from .models.clip import CLIP
from .models.config import CLIPConfig, TextConfig
from .models.text import TextTransformer, is_text_key

logger = logging.getLogger(__name__)


def _packaged_configs() -> dict[str, Any]:
    folder = resources.files("ldmclip") / "model_configs"
    return {entry.name[: -len(".json")]: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def list_models() -> list[str]:
    """Names of the packaged model configs, sorted."""
    return sorted(_packaged_configs())


def _unknown_model_error(name: str) -> UserError:
    return UserError(
        f"unknown model {name!r}. Packaged models: {', '.join(list_models())}. "
        f"You can also pass a path to a JSON config, 'hf-hub:org/repo' or 'local-dir:/path/to/checkpoint'."
    )


def _read_json(path: Path | Any) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as f:
        return json.load(f)


def resolve_model(name: str) -> tuple[CLIPConfig, dict[str, Any], Path | None]:
    """``(model config, preprocess config, checkpoint folder or None)`` for any model name form."""
    folder = checkpoint_folder(name)
    if folder is not None:
        cfg, preprocess = checkpoints.read_dir_config(folder)
        return cfg, preprocess, folder
    packaged = _packaged_configs()
    if name in packaged:
        raw = _read_json(packaged[name])
    elif name.endswith(".json") and Path(name).is_file():
        return CLIPConfig.from_json(name), dict(_read_json(Path(name)).get("preprocess_cfg") or {}), None
    elif name.endswith(".json"):
        raise FileNotFoundError(f"model config file not found: {name}")
    else:
        raise _unknown_model_error(name)
    preprocess = dict(raw.pop("preprocess_cfg", None) or {})
    return CLIPConfig.from_dict(raw), preprocess, None


def get_model_config(name: str) -> CLIPConfig:
    """The :class:`CLIPConfig` of any model name form (see the module docstring)."""
    return resolve_model(name)[0]


def resolve_pretrained(pretrained: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, preprocess config it carries)`` of any ``pretrained=`` form: a weights file, a
    checkpoint folder or ``hf-hub:org/repo``."""
    pretrained = str(pretrained)
    if pretrained.startswith(HF_HUB_PREFIX):
        source = checkpoints.resolve_hf_hub(pretrained[len(HF_HUB_PREFIX):])
    else:
        source = Path(pretrained).expanduser()
    if source.is_dir():
        _, preprocess = checkpoints.read_dir_config(source)
        return checkpoints.find_weights_in_dir(source), preprocess
    if source.is_file():
        return source, {}
    raise FileNotFoundError(
        f"pretrained weights not found: {pretrained}. Pass a file (.safetensors/.bin/.pt), a checkpoint "
        f"folder, or 'hf-hub:org/repo'. (ldmclip has no OpenCLIP-style pretrained tags like 'laion2b_s32b_b82k'; "
        f"use 'hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K' instead.)"
    )


def _load_pretrained(model: CLIP, pretrained: str | Path) -> dict[str, Any]:
    """Load weights into ``model``; returns the preprocess config the checkpoint carries, if any."""
    weights, preprocess = resolve_pretrained(pretrained)
    checkpoints.load_into_model(model, checkpoints.read_state_dict(weights), source=str(weights),
                                suggest=suggest_configs)
    return preprocess


def suggest_configs(found: dict[str, Any]) -> list[str]:
    """The packaged configs that match what a checkpoint describes (``checkpoints.infer_config``)."""
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


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **overrides: Any,
) -> CLIP:
    """Build a CLIP model and optionally load weights.

    ``pretrained`` is ``None`` (random init), a weights file, a checkpoint folder, or
    ``hf-hub:org/repo``. With ``hf-hub:``/``local-dir:`` model names the weights come from the same
    place unless ``pretrained`` says otherwise. ``precision`` is ``fp32``, ``bf16``/``fp16`` (weights
    cast) or ``amp``/``amp_bf16``/``amp_fp16`` (fp32 weights, for autocast). ``overrides`` set
    vision-tower options such as ``patch_dropout=0.5`` or ``image_size=336``.
    """
    dtype = precision_dtype(precision)
    cfg, preprocess, folder = resolve_model(name)
    for key, value in overrides.items():
        if hasattr(cfg.vision_cfg, key):
            setattr(cfg.vision_cfg, key, value)
        else:
            raise TypeError(f"create_model() got an unknown option {key!r}")
    model = CLIP(cfg)
    if pretrained is None and folder is not None:
        pretrained = folder
    if pretrained is not None:
        preprocess = {**preprocess, **_load_pretrained(model, pretrained)}
    preprocess["size"] = cfg.vision_cfg.image_size
    model.preprocess_cfg = preprocess
    return model.to(device=device, dtype=dtype)


def create_model_and_transforms(name: str, pretrained: str | Path | None = None, **kwargs: Any):
    """``(model, train_transform, eval_transform)``; the transforms use the checkpoint's mean/std."""
    from .transforms import PreprocessConfig, image_transform

    model = create_model(name, pretrained=pretrained, **kwargs)
    pp = PreprocessConfig.from_dict(model.preprocess_cfg)
    return model, image_transform(pp, is_train=True), image_transform(pp, is_train=False)


def get_tokenizer(name: str, context_length: int | None = None, pad_id: int = 0):
    """The tokenizer of a model name: CLIP BPE with the model's context length.

    A checkpoint folder that carries its own ``vocab.json`` + ``merges.txt`` uses those.
    ``pad_id=49407`` pads with end-of-text, as Stable Diffusion 1.x does.
    """
    from .tokenizer import CLIPTokenizer, build_tokenizer

    folder = checkpoint_folder(name)
    text_encoder = checkpoints.read_text_encoder_config(folder) if folder is not None else None
    if text_encoder is not None:  # a text encoder alone
        text_cfg = text_encoder[0]
    elif folder is not None:
        text_cfg = checkpoints.read_dir_config(folder)[0].text_cfg
    else:
        text_cfg = resolve_model(name)[0].text_cfg
    length = context_length or text_cfg.context_length
    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained_dir(folder, context_length=length, pad_id=pad_id)
    return build_tokenizer(context_length=length, pad_id=pad_id)


def load_text_tower(name: str, pretrained: str | Path | None = None, device: str | torch.device = "cpu",
                    precision: str = "fp32") -> TextTransformer:
    """The text tower of ``create_model(name, pretrained)``, built and loaded alone: the image tower is
    never allocated and its tensors are not read (bigG's alone is 1.8 billion parameters that
    conditioning never uses). ``pretrained`` takes every form ``create_model`` takes; without weights
    the tower is randomly initialised exactly as ``create_model``'s text tower would be.

    ``name`` may also be ``local-dir:``/``hf-hub:`` a ``transformers`` text encoder alone
    (``CLIPTextModel`` or ``CLIPTextModelWithProjection``, e.g. a diffusers pipeline's
    ``text_encoder/`` or ``text_encoder_2/``). Without a projection the pooled output is the
    final-LayerNorm EOT state itself (``pooler_output``). Note that diffusers' Stable Diffusion 2.x
    ``text_encoder/`` keeps 23 of ViT-H/14's 24 blocks (2.x never uses the last one), so its
    ``layer="last"`` is the ``sd2`` preset's ``"penultimate"``.
    """
    dtype = precision_dtype(precision)  # a bad precision fails before anything is read
    folder = checkpoints.checkpoint_folder(name)
    text_encoder = checkpoints.read_text_encoder_config(folder) if folder is not None else None
    if text_encoder is not None and pretrained is None:
        return _text_tower_from_hf_dir(folder, *text_encoder).to(device=device, dtype=dtype)
    # a folder's own config (a text encoder alone with pretrained= says it holds no whole CLIP)
    cfg = checkpoints.read_dir_config(folder)[0] if folder is not None else get_model_config(name)
    pretrained = folder if pretrained is None else pretrained
    if pretrained is None:
        logger.warning("no pretrained weights given for %s: its text tower is randomly initialised", name)
        # CLIP builds (and initialises) its text tower first, so the same seed gives the same weights
        tower = TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.activation)
        return tower.to(device=device, dtype=dtype)
    weights = resolve_pretrained(pretrained)[0]
    state = checkpoints.read_state_dict(weights, keys=is_text_key)
    for key, value in state.items():  # create_model copies a checkpoint into fp32 parameters, then casts
        state[key] = value.float()    # one tensor at a time: a half-precision one is never held twice
    tower = _tower_from_state(state, cfg.text_cfg, cfg.embed_dim, cfg.activation, str(weights), suggest_configs)
    return tower.to(device=device, dtype=dtype)


def _text_tower_from_hf_dir(folder: Path, text_cfg: TextConfig, activation: str) -> TextTransformer:
    weights = checkpoints.find_weights_in_dir(folder)
    state = checkpoints.read_state_dict(weights)  # OpenCLIP key names; a text encoder holds nothing else
    if "text_projection" not in state:
        # CLIPTextModel has no projection: its pooled output is the EOT state, i.e. an identity projection
        state["text_projection"] = torch.eye(text_cfg.width, dtype=state["positional_embedding"].dtype)
    return _tower_from_state(state, text_cfg, state["text_projection"].shape[1], activation, str(weights))


def _tower_from_state(state: dict[str, torch.Tensor], text_cfg: TextConfig, embed_dim: int, activation: str,
                      source: str, suggest: Callable[[dict[str, Any]], list[str]] | None = None) -> TextTransformer:
    """A text tower that takes ``state``'s tensors as they are (built on the meta device: no time or
    memory spent on a random init that is overwritten at once)."""
    with torch.device("meta"):
        tower = TextTransformer(text_cfg, embed_dim, activation)
    checkpoints.load_into_model(tower, state, source=source, assign=True, suggest=suggest)
    return tower
