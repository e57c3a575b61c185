"""The model registry and the public constructors (``create_model`` and friends, ``load_text_tower``):
configs + checkpoints -> models.

A model is named the way OpenCLIP names it, so an OpenCLIP user changes only the import:

- a packaged config name (``ViT-L-14``; see :func:`list_models`), or one :func:`add_model_config` added;
- a path to a JSON config file;
- ``hf-hub:org/repo`` or ``hf-hub:org/repo/folder`` (config and weights from the Hugging Face cache);
- ``local-dir:/path`` (config and weights from a checkpoint folder).

``pretrained=`` also takes OpenCLIP's pretrained tags for the packaged models (``ViT-L-14`` +
``laion2b_s32b_b82k``; see :func:`list_pretrained`): each names its Hugging Face repository and the
mean/std and activation its weights were trained with (``checkpoints.pretrained``).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import checkpoints
from .checkpoints import checkpoint_folder
from .checkpoints.state_dict import resize_text_positional_embedding
from .core.errors import UserError
from .core.files import tensors_sha256
from .core.formats import HF_HUB_PREFIX, LOCAL_DIR_PREFIX
from .core.precision import precision_dtype
from .models.clip import CLIP
from .models.config import CLIPConfig, TextConfig
from .models.text import TextTransformer, is_text_key

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The registry of named configs: the packaged JSON files, then those add_model_config added

# name -> the config as read when it was added (as OpenCLIP keeps it: a later edit of the file changes nothing)
_ADDED_CONFIGS: dict[str, dict[str, Any]] = {}
# the keys OpenCLIP's add_model_config requires of a model config (open_clip/factory.py, _rescan_model_configs)
_MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _packaged_configs() -> dict[str, Any]:
    folder = resources.files("ldmclip") / "model_configs"
    return {entry.name[: -len(".json")]: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def _named_config(name: str) -> dict[str, Any] | None:
    """The raw config dict registered as ``name`` (an added one before a packaged one), or ``None``."""
    if name in _ADDED_CONFIGS:
        return copy.deepcopy(_ADDED_CONFIGS[name])
    packaged = _packaged_configs()
    return _read_json(packaged[name]) if name in packaged else None


def _is_named(name: str) -> bool:
    return name in _ADDED_CONFIGS or name in _packaged_configs()


def list_models() -> list[str]:
    """Names of the registered model configs (the packaged ones and those :func:`add_model_config`
    added), sorted."""
    return sorted({*_packaged_configs(), *_ADDED_CONFIGS})


def add_model_config(path: str | Path) -> list[str]:
    """OpenCLIP's ``add_model_config``: register a JSON model config file, or every ``*.json`` in a
    folder (not its subfolders), each under its file stem, so ``create_model(stem)``, ``list_models()``,
    ``get_model_config`` and ``get_tokenizer`` know it. An added config with the name of a packaged one
    (or of one added before) replaces it, as in OpenCLIP, with a warning in the log. Returns the names
    added.

    Unlike OpenCLIP, which skips them silently, a missing path, a folder with no JSON file, and a file
    that is no model config (not JSON, no ``embed_dim``/``vision_cfg``/``text_cfg``, or keys ldmclip
    cannot build) are a :class:`UserError` naming the file; nothing is added then."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UserError(f"add_model_config: {path} holds no .json model config")
    elif path.is_file():
        if path.suffix != ".json":
            raise UserError(f"add_model_config: {path} is not a .json model config")
        files = [path]
    else:
        raise UserError(f"add_model_config: {path} not found (give a .json model config or a folder of them)")
    found = {file.stem: _checked_model_config(file) for file in files}  # all checked before any is added
    packaged = _packaged_configs()
    for name in found:
        if name in packaged or name in _ADDED_CONFIGS:
            logger.warning("add_model_config: %s replaces the %s config %r", path, "packaged" if name in packaged
                           else "added", name)
    _ADDED_CONFIGS.update(found)
    return list(found)


def _checked_model_config(file: Path) -> dict[str, Any]:
    """The config in ``file``, checked to be one ldmclip can build."""
    try:
        raw = _read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"add_model_config: {file} is not a readable JSON file ({exc})") from exc
    if not isinstance(raw, dict) or not all(key in raw for key in _MODEL_CONFIG_KEYS):
        raise UserError(f"add_model_config: {file} is no model config: a model config has "
                        f"{', '.join(_MODEL_CONFIG_KEYS)}")
    try:
        CLIPConfig.from_dict({k: v for k, v in raw.items() if k != "preprocess_cfg"})
    except (ValueError, TypeError) as exc:
        raise UserError(f"add_model_config: {file}: {exc}") from exc
    return raw


def _unknown_model_error(name: str) -> UserError:
    return UserError(
        f"unknown model {name!r}. Known models: {', '.join(list_models())}. "
        f"You can also pass a path to a JSON config, 'hf-hub:org/repo' or 'local-dir:/path/to/checkpoint'."
    )


def _read_json(path: Path | Any) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as f:
        return json.load(f)


def resolve_model(name: str, cache_dir: str | Path | None = None) -> tuple[CLIPConfig, dict[str, Any], Path | None]:
    """``(model config, preprocess config, checkpoint folder or None)`` for any model name form
    (``cache_dir``: the Hugging Face cache of ``hf-hub:`` names)."""
    folder = checkpoint_folder(name, cache_dir=cache_dir)
    if folder is not None:
        cfg, preprocess = checkpoints.read_dir_config(folder)
        return cfg, preprocess, folder
    raw = _named_config(name)
    if raw is None and name.endswith(".json") and Path(name).is_file():  # from_json: its errors name the file
        return CLIPConfig.from_json(name), dict(_read_json(Path(name)).get("preprocess_cfg") or {}), None
    elif raw is None and name.endswith(".json"):
        raise FileNotFoundError(f"model config file not found: {name}")
    elif raw is None:
        raise _unknown_model_error(name)
    preprocess = dict(raw.pop("preprocess_cfg", None) or {})
    return CLIPConfig.from_dict(raw), preprocess, None


def get_model_config(name: str) -> CLIPConfig:
    """The :class:`CLIPConfig` of any model name form (see the module docstring)."""
    return resolve_model(name)[0]


# ----------------------------------------------------------------------------------------------------
# OpenCLIP's pretrained tags (the data and its lookups live in checkpoints.pretrained)

# What a tag looks like (laion2b_s32b_b82k, openai): a value of this form that is no file or folder is
# read as a tag, so a mistyped one is told the model's tags rather than "file not found".
_TAG_FORM = re.compile(r"[A-Za-z0-9_-]+")


def list_pretrained(as_str: bool = False) -> list[tuple[str, str]] | list[str]:
    """OpenCLIP's ``list_pretrained`` for the packaged models: ``(model, tag)`` pairs, or ``"model:tag"``
    strings with ``as_str=True``, in OpenCLIP's order."""
    packaged = set(list_models())
    pairs = [(name, tag) for name, tags in checkpoints.pretrained_registry().items() if name in packaged
             for tag in tags]
    return [f"{name}:{tag}" for name, tag in pairs] if as_str else pairs


def list_pretrained_tags_by_model(model: str) -> list[str]:
    """The pretrained tags of a packaged model (``[]`` for none, as OpenCLIP)."""
    return [tag for name, tag in list_pretrained() if name == model]


def list_pretrained_models_by_tag(tag: str) -> list[str]:
    """The packaged models that have pretrained tag ``tag``."""
    return checkpoints.models_with_tag(tag, among=list_models())


def get_pretrained_cfg(model: str, tag: str) -> dict[str, Any]:
    """OpenCLIP's ``get_pretrained_cfg``: ``hf_hub``, ``mean``/``std``, ``interpolation``, ``resize_mode``
    and ``quick_gelu`` of a packaged model's tag; ``{}`` when it has no such tag. (No ``url``: ldmclip
    takes the weights from the Hugging Face hub only.)"""
    if not _is_named(model):
        return {}
    found = checkpoints.find_tag(model, tag)
    if found is None:
        return {}
    return {"hf_hub": found.hf_hub, **{k: tuple(v) if isinstance(v, list) else v for k, v in found.preprocess.items()},
            "quick_gelu": found.quick_gelu}


def pretrained_tag(name: str | None, pretrained: str | Path | None) -> checkpoints.PretrainedTag | None:
    """The pretrained tag ``pretrained`` names for model ``name``; ``None`` when it is a file, a folder or
    ``hf-hub:``. A value of a tag's form that is neither a tag of ``name`` nor a path is a
    :class:`UserError` saying which tags ``name`` has and which models have that tag."""
    if name is None or pretrained is None or isinstance(pretrained, Path):
        return None
    value = str(pretrained)
    if not _TAG_FORM.fullmatch(value):
        return None
    packaged = _is_named(name)
    found = checkpoints.find_tag(name, value) if packaged else None
    if found is not None:  # a tag before a file of the same name, as OpenCLIP
        return found
    if Path(value).expanduser().exists():
        return None
    if packaged:
        raise checkpoints.unknown_tag_error(name, value, list_models())
    theirs = list_pretrained_models_by_tag(value)
    if theirs:
        kind = ("an 'hf-hub:'/'local-dir:' checkpoint" if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
                else "a JSON config")
        raise UserError(
            f"pretrained={value!r} is an OpenCLIP pretrained tag, which goes with a packaged model name "
            f"({', '.join(theirs)}), but the model {name!r} is {kind}: pass that model name instead, or the "
            f"weights themselves (a file, a checkpoint folder or 'hf-hub:org/repo')")
    return None


def _apply_tag(cfg: CLIPConfig, tag: checkpoints.PretrainedTag | None) -> None:
    """A tag's weights were trained with its activation (OpenAI's ViT-B-16 with QuickGELU): build that."""
    if tag is not None and tag.quick_gelu and not cfg.quick_gelu:
        logger.info("%s pretrained=%r was trained with QuickGELU: building %s with QuickGELU (as %s-quickgelu)",
                    tag.model, tag.tag, tag.model, tag.model)
        cfg.quick_gelu = True


def resolve_pretrained(pretrained: str | Path, model: str | None = None,
                       cache_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """``(weights file, preprocess config it carries)`` of any ``pretrained=`` form: a weights file, a
    checkpoint folder, ``hf-hub:org/repo`` or, with the packaged ``model`` name, an OpenCLIP tag (its
    repository's weights file from the Hugging Face cache ``cache_dir``, and its mean/std/interpolation)."""
    tag = pretrained_tag(model, pretrained)
    if tag is not None:
        return checkpoints.download_tag_weights(tag, cache_dir=cache_dir), dict(tag.preprocess)
    pretrained = str(pretrained)
    if pretrained.startswith(HF_HUB_PREFIX):
        source = checkpoints.resolve_hf_hub(pretrained[len(HF_HUB_PREFIX):], cache_dir=cache_dir)
    else:
        source = Path(pretrained).expanduser()
    if source.is_dir():
        _, preprocess = checkpoints.read_dir_config(source)
        return checkpoints.find_weights_in_dir(source), preprocess
    if source.is_file():
        return source, {}
    raise FileNotFoundError(
        f"pretrained weights not found: {pretrained}. Pass a file (.safetensors/.bin/.pt), a checkpoint "
        f"folder, 'hf-hub:org/repo' or, with a packaged model name, an OpenCLIP pretrained tag "
        f"(ldmclip.list_pretrained())."
    )


def _load_weights(model: CLIP, weights: Path, resize_text: bool = False) -> None:
    """Load a weights file into ``model``. ``resize_text``: resample the text positional embedding to the
    model's context length (OpenCLIP's ``force_context_length`` with weights)."""
    state = checkpoints.read_state_dict(weights)
    if resize_text and "positional_embedding" in state:
        state["positional_embedding"] = resize_text_positional_embedding(state["positional_embedding"],
                                                                         model.context_length)
    checkpoints.load_into_model(model, state, source=str(weights), suggest=suggest_configs)


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
    *,
    load_weights: bool = True,
    jit: bool = False,
    force_quick_gelu: bool = False,
    force_patch_dropout: float | None = None,
    force_image_size: int | tuple[int, int] | None = None,
    force_context_length: int | None = None,
    force_preprocess_cfg: dict[str, Any] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_interpolation: str | None = None,
    image_resize_mode: str | None = None,
    cache_dir: str | Path | None = None,
    output_dict: bool | None = None,
    require_pretrained: bool = False,
    weights_only: bool = True,
    **overrides: Any,
) -> CLIP:
    """Build a CLIP model and optionally load weights.

    ``pretrained`` is ``None`` (random init), a weights file, a checkpoint folder, ``hf-hub:org/repo``
    or an OpenCLIP tag of a packaged ``name`` (``list_pretrained_tags_by_model(name)``), whose mean/std
    go into ``model.preprocess_cfg`` and whose activation is built. With ``hf-hub:``/``local-dir:``
    model names the weights come from the same place unless ``pretrained`` is a file, a folder or
    ``hf-hub:`` (a bare tag beside them is ignored with a warning, as OpenCLIP ignores it).
    ``precision`` is ``fp32``, ``bf16``/``fp16`` (weights cast) or ``amp``/``amp_bf16``/``amp_fp16``
    (fp32 weights, for autocast). ``overrides`` set vision-tower options such as ``patch_dropout=0.5``
    or ``image_size=336``.

    The keywords are OpenCLIP 3.3.0's, with its meaning: ``load_weights=False`` reads no weights;
    ``force_quick_gelu``, ``force_patch_dropout``, ``force_image_size`` (square; the image positional
    embedding of loaded weights is resampled) and ``force_context_length`` (the text positional embedding
    of loaded weights is resampled linearly, as OpenCLIP does) change the config; ``image_mean``,
    ``image_std``, ``image_interpolation``, ``image_resize_mode`` and ``force_preprocess_cfg`` go into
    ``model.visual.preprocess_cfg``; ``cache_dir`` is the Hugging Face cache of ``hf-hub:`` names;
    ``output_dict=True`` makes ``forward`` return OpenCLIP's dict; ``require_pretrained`` fails when no
    weights are loaded. ``jit=True`` is refused (ldmclip models are not TorchScript; use
    ``torch.compile``). ``weights_only=False`` is ignored with a warning: pickled checkpoints are only
    ever read with ``torch.load(weights_only=True)``, so nothing in a checkpoint runs code.
    """
    if jit:
        raise UserError("jit=True is not supported: ldmclip models are not TorchScript; leave jit off "
                        "(torch.compile(model) is the faster replacement)")
    if not weights_only:
        warnings.warn("weights_only=False is ignored: ldmclip reads pickled checkpoints only with "
                      "torch.load(weights_only=True), so no code in a checkpoint runs", UserWarning, stacklevel=2)
    dtype = precision_dtype(precision)
    cfg, preprocess, folder = resolve_model(name, cache_dir=cache_dir)
    _apply_forced(cfg, force_quick_gelu, force_patch_dropout, force_image_size, force_context_length)
    for key, value in overrides.items():
        if hasattr(cfg.vision_cfg, key):
            setattr(cfg.vision_cfg, key, value)
        else:
            raise TypeError(f"create_model() got an unknown option {key!r}")
    if folder is not None and pretrained is not None and _is_tag(pretrained):
        # OpenCLIP ignores pretrained= beside an hf-hub:/local-dir: name; clients such as CLIP_benchmark
        # always pass one (its default "laion400m_e32"). A file, folder or hf-hub: name still wins.
        warnings.warn(f"pretrained={str(pretrained)!r} is ignored: the model name {name!r} carries its own "
                      "weights (as in OpenCLIP)", UserWarning, stacklevel=2)
        pretrained = None
    if pretrained is None and folder is not None:
        pretrained = folder
    if not load_weights:
        pretrained = None
    weights = None
    if pretrained is not None:  # found (or downloaded) before the model is built: a missing one fails fast
        _apply_tag(cfg, pretrained_tag(name, pretrained))
        weights, carried = resolve_pretrained(pretrained, name, cache_dir=cache_dir)
        preprocess = {**preprocess, **carried}
    elif require_pretrained:
        raise UserError(f"{name}: no pretrained weights to load (pass pretrained=, or a model name that carries "
                        "its weights: hf-hub:org/repo or local-dir:/path)")
    model = CLIP(cfg)
    if weights is not None:
        _load_weights(model, weights, resize_text=force_context_length is not None)
    preprocess["size"] = cfg.vision_cfg.image_size
    # OpenCLIP's order: force_preprocess_cfg over the checkpoint's, the image_* keywords over both
    forced = {**(force_preprocess_cfg or {}), **{key: value for key, value in (
        ("mean", image_mean), ("std", image_std), ("interpolation", image_interpolation),
        ("resize_mode", image_resize_mode)) if value is not None}}
    preprocess.update({key: value for key, value in forced.items() if value is not None})
    model.preprocess_cfg = preprocess
    if output_dict:
        model.output_dict = True
    return model.to(device=device, dtype=dtype)


def _is_tag(pretrained: str | Path) -> bool:
    """Whether a ``pretrained=`` value is a bare name (a tag such as ``laion2b_s32b_b82k``), not a path
    that exists or an ``hf-hub:`` name."""
    text = str(pretrained)
    return not text.startswith(HF_HUB_PREFIX) and not Path(text).expanduser().exists()


def _apply_forced(cfg: CLIPConfig, quick_gelu: bool, patch_dropout: float | None,
                  image_size: int | tuple[int, int] | None, context_length: int | None) -> None:
    """OpenCLIP's ``force_*`` config overrides."""
    if quick_gelu:
        cfg.quick_gelu = True
    if patch_dropout is not None:
        cfg.vision_cfg.patch_dropout = patch_dropout
    if image_size is not None:
        sizes = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        if len(sizes) != 2 or sizes[0] != sizes[1] or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise UserError(f"force_image_size={image_size!r}: ldmclip takes one positive size (square images)")
        cfg.vision_cfg.image_size = sizes[0]
    if context_length is not None:
        if not isinstance(context_length, int) or context_length < 2:
            raise UserError(f"force_context_length={context_length!r}: give a number of tokens of at least 2")
        cfg.text_cfg.context_length = context_length


def create_model_and_transforms(name: str, pretrained: str | Path | None = None,
                                aug_cfg: Mapping[str, Any] | Any | None = None, **kwargs: Any):
    """``(model, train_transform, eval_transform)``; the transforms use the checkpoint's mean/std (and the
    ``image_*`` keywords). Every :func:`create_model` keyword passes through; ``aug_cfg`` is OpenCLIP's
    training augmentation (only its ``scale`` is implemented)."""
    from .transforms import PreprocessConfig, image_transform

    model = create_model(name, pretrained=pretrained, **kwargs)
    pp = PreprocessConfig.from_dict(model.preprocess_cfg)
    train = image_transform(pp.image_size, True, pp.mean, pp.std, pp.resize_mode, pp.interpolation,
                            pp.fill_color, aug_cfg=aug_cfg)
    return model, train, image_transform(pp, is_train=False)


def create_model_from_pretrained(name: str, pretrained: str | Path | None = None, return_transform: bool = True,
                                 **kwargs: Any):
    """OpenCLIP's ``create_model_from_pretrained``: a model whose weights must load (an error otherwise)
    and, unless ``return_transform=False``, its evaluation transform: ``(model, preprocess_val)``."""
    from .transforms import PreprocessConfig, image_transform

    model = create_model(name, pretrained=pretrained, require_pretrained=True, **kwargs)
    if not return_transform:
        return model
    return model, image_transform(PreprocessConfig.from_dict(model.preprocess_cfg), is_train=False)


def get_tokenizer(name: str = "", context_length: int | None = None, cache_dir: str | Path | None = None,
                  pad_id: int = 0, **kwargs: Any):
    """The tokenizer of a model name: CLIP BPE with the model's context length (OpenCLIP's signature;
    ``""`` is the plain CLIP tokenizer, context length 77).

    A checkpoint folder that carries its own ``vocab.json`` + ``merges.txt`` uses those; ``cache_dir`` is
    the Hugging Face cache of ``hf-hub:`` names. ``pad_id=49407`` pads with end-of-text, as Stable
    Diffusion 1.x does. Other OpenCLIP tokenizer keywords (e.g. ``clean``) choose tokenizers ldmclip does
    not have and are refused.
    """
    from .tokenizer import DEFAULT_CONTEXT_LENGTH, CLIPTokenizer, build_tokenizer

    if kwargs:
        raise TypeError(f"get_tokenizer() got unsupported options {sorted(kwargs)}: ldmclip has the CLIP BPE "
                        "tokenizer only (context_length, cache_dir and pad_id are its options)")
    if not name:
        return build_tokenizer(context_length=context_length or DEFAULT_CONTEXT_LENGTH, pad_id=pad_id)
    folder = checkpoint_folder(name, cache_dir=cache_dir)
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


def load_text_tower(name: str | None, pretrained: str | Path | None = None, device: str | torch.device = "cpu",
                    precision: str = "fp32", encoder: str | None = None) -> TextTransformer:
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

    ``pretrained`` may be a single-file SD checkpoint or a text-encoder file (``checkpoints.sd``): the
    encoder whose shapes fit ``name``'s text tower is read (``encoder="text_encoder_2"`` chooses one;
    ``name=None`` takes the config the file's family uses), and nothing else of the file.
    """
    dtype = precision_dtype(precision)  # a bad precision fails before anything is read
    single_file = _text_encoder_file(pretrained)
    if single_file is not None:
        return _single_file_tower(*single_file, name, encoder).to(device=device, dtype=dtype)
    if name is None or encoder is not None:
        raise UserError(f"name=None and encoder= need pretrained= a single-file SD checkpoint or a text-encoder "
                        f"file (checkpoints.sd); got pretrained={pretrained!r}")
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
    _apply_tag(cfg, pretrained_tag(name, pretrained))
    weights = resolve_pretrained(pretrained, name)[0]
    state = checkpoints.read_state_dict(weights, keys=is_text_key)
    for key, value in state.items():  # create_model copies a checkpoint into fp32 parameters, then casts
        state[key] = value.float()    # one tensor at a time: a half-precision one is never held twice
    tower = _tower_from_state(state, cfg.text_cfg, cfg.embed_dim, cfg.activation, str(weights), suggest_configs)
    return tower.to(device=device, dtype=dtype)


def load_text_towers(pretrained: str | Path, model: str | None = None, device: str | torch.device = "cpu",
                     precision: str = "fp32") -> dict[str, TextTransformer]:
    """Every text encoder of a single-file SD checkpoint (or a text-encoder file), by the name of its
    diffusers folder (``text_encoder``, ``text_encoder_2``), each checked against the config its
    family uses, or ``model``'s (see ``checkpoints.sd``)."""
    dtype = precision_dtype(precision)
    model_cfg = None if model is None else (model, _tower_config(model))
    found = checkpoints.read_text_encoders(pretrained, _packaged_tower_configs(), model_cfg)
    return {name: _tower_from_encoder(encoder, str(pretrained)).to(device=device, dtype=dtype)
            for name, encoder in found.items()}


def _tower_config(name: str) -> checkpoints.TowerConfig:
    cfg = get_model_config(name)
    return checkpoints.TowerConfig(cfg.text_cfg, cfg.embed_dim, cfg.activation)


def _packaged_tower_configs() -> dict[str, checkpoints.TowerConfig]:
    return {name: _tower_config(name) for name in list_models()}


def _text_encoder_file(pretrained: str | Path | None) -> tuple[Path, list[str]] | None:
    """``(path, its encoders)`` when ``pretrained`` is a file of text encoders (``checkpoints.sd``)."""
    if pretrained is None or str(pretrained).startswith(HF_HUB_PREFIX):
        return None
    path = Path(pretrained).expanduser()
    found = checkpoints.find_text_encoders(path) if path.is_file() else []
    return (path, [f.encoder for f in found]) if found else None


def _single_file_tower(path: Path, encoders: list[str], name: str | None, encoder: str | None) -> TextTransformer:
    if name is None and encoder is None and len(encoders) > 1:
        raise UserError(f"{path} holds {len(encoders)} text encoders ({', '.join(encoders)}): pass encoder= or a "
                        f"model name to choose one, or use load_text_towers")
    model_cfg = None if name is None else (name, _tower_config(name))
    [found] = checkpoints.read_text_encoders(path, _packaged_tower_configs(), model_cfg, encoder).values()
    return _tower_from_encoder(found, str(path))


def _tower_from_encoder(encoder: checkpoints.SDTextEncoder, source: str) -> TextTransformer:
    state = encoder.state
    for key, value in state.items():  # fp32 first, as create_model does (one tensor at a time)
        state[key] = value.float()
    cfg = encoder.config
    return _tower_from_state(state, cfg.text_cfg, cfg.embed_dim, cfg.activation, source)


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


def model_weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the model's state dict (names, dtypes, shapes and bytes): both towers,
    since an index holds image embeddings and is searched with text ones. (The conditioner's
    ``weights_sha256`` hashes the text tower alone.)"""
    return tensors_sha256(model.state_dict())


def model_identity(model: Any, name: str, pretrained: str | None) -> dict[str, Any]:
    """What identifies the embeddings a model makes: its config, its image preprocessing and a hash of
    its weights. ``name``/``pretrained`` are kept so search can load the same model again."""
    return {"name": name, "pretrained": pretrained, "config": model.config.to_dict(),
            "preprocess": dict(model.preprocess_cfg), "sha256": model_weights_sha256(model)}
