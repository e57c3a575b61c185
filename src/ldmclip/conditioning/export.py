"""Export to the Hugging Face layouts: ``transformers`` model folders and diffusers sub-folders.

- :func:`export_transformers` writes a ``CLIPTextModel`` folder (``CLIPTextModelWithProjection`` with
  ``with_projection=True``, a whole ``CLIPModel`` with ``full=True``): ``config.json``,
  ``model.safetensors`` (``text_model.*`` keys, as every Stable Diffusion text encoder on the Hub has
  them) and the tokenizer files (``vocab.json``, ``merges.txt``, ``special_tokens_map.json``,
  ``tokenizer_config.json``).
- :func:`export_diffusers` writes the ``text_encoder/`` + ``tokenizer/`` sub-folders of a diffusers
  pipeline (and ``text_encoder_2/`` + ``tokenizer_2/`` for SDXL, whose second encoder is a
  ``CLIPTextModelWithProjection``), with each preset's pad token.

Nothing here imports ``transformers``: the files are plain JSON and safetensors. Every export is
written into a temporary folder next to the destination and renamed into place when complete.

Note on the pad token ``"!"`` (id 0, SD 2.x and SDXL's second tokenizer): ``transformers`` treats a
pad token as a special token, so a literal ``"!!"`` in a prompt becomes two pad ids there instead of
OpenCLIP's single ``"!!"`` token. The official SD 2.x / SDXL folders behave the same way
(diffusers issue 4153); ldmclip's own tokenizer always follows OpenCLIP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoints import openclip_to_hf_state_dict
from ..core.files import atomic_write, write_safetensors
from ..core.precision import dtype_from_name, dtype_name
from ..models.text import TextTransformer
from ..tokenizer import CLIPTokenizer, build_tokenizer
from .conditioner import TextConditioner, text_tower_config

_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu"}
LAYER_NORM_EPS = 1e-5  # every CLIP tower; ldmclip's LayerNorms use it


# --------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def _atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; it becomes ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose a new output folder or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # an empty folder made beforehand is fine to replace
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # atomic on its own too: write_text_encoder / write_tokenizer may be called outside an export folder
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    write_safetensors(path, {k: v if dtype is None else v.to(dtype) for k, v in state.items()}, {"format": "pt"})


def _resolve_dtype(dtype: str | torch.dtype | None, tower: torch.nn.Module) -> torch.dtype:
    if dtype is None:
        return next(tower.parameters()).dtype
    if isinstance(dtype, str):
        return dtype_from_name(dtype)
    dtype_name(dtype)  # only the three floating dtypes can be exported
    return dtype


# --------------------------------------------------------------------------------------------
# transformers configs


def text_config_dict(tower: TextTransformer, tokenizer: CLIPTokenizer, pad_id: int) -> dict[str, Any]:
    """The fields of a ``transformers`` ``CLIPTextConfig`` for ``tower``."""
    arch = text_tower_config(tower)
    if arch["activation"] not in _HF_ACT:
        raise ValueError(f"activation {arch['activation']!r} has no transformers counterpart")
    return {
        "model_type": "clip_text_model",
        "vocab_size": arch["vocab_size"],
        "hidden_size": arch["width"],
        "intermediate_size": arch["intermediate_size"],
        "projection_dim": arch["embed_dim"],
        "num_hidden_layers": arch["layers"],
        "num_attention_heads": arch["heads"],
        "max_position_embeddings": arch["context_length"],
        "hidden_act": _HF_ACT[arch["activation"]],
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # the real ids (not the legacy bos=0/eos=2 of early SD configs), so transformers pools at
        # the first EOT exactly as ldmclip does
        "bos_token_id": tokenizer.sot_token_id,
        "eos_token_id": tokenizer.eot_token_id,
        "pad_token_id": pad_id,
    }


def _vision_config_dict(model) -> dict[str, Any]:
    cfg = model.config.vision_cfg
    return {
        "model_type": "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": model.visual.transformer.resblocks[0].mlp.c_fc.out_features,
        "projection_dim": model.config.embed_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": _HF_ACT[model.config.activation],
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


def write_text_encoder(tower: TextTransformer, directory: Path, *, tokenizer: CLIPTokenizer, pad_id: int,
                       with_projection: bool = False, dtype: str | torch.dtype | None = None) -> None:
    """``config.json`` + ``model.safetensors`` of a ``CLIPTextModel[WithProjection]`` into ``directory``."""
    dtype = _resolve_dtype(dtype, tower)
    state = openclip_to_hf_state_dict(tower.text_state_dict())
    if not with_projection:
        del state["text_projection.weight"]
    architecture = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    config = {"architectures": [architecture], **text_config_dict(tower, tokenizer, pad_id),
              "torch_dtype": dtype_name(dtype)}
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, directory / "model.safetensors", dtype)
    _write_json(directory / "config.json", config)


def write_tokenizer(tokenizer: CLIPTokenizer, directory: Path, *, pad_id: int, context_length: int) -> None:
    """``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``,
    loadable by ``transformers.CLIPTokenizer`` (the files diffusers pipelines ship)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, _ = tokenizer.save_pretrained_files(directory)
    token_of = {i: t for t, i in json.loads(vocab_file.read_text(encoding="utf-8")).items()}
    special = {"bos_token": token_of[tokenizer.sot_token_id], "eos_token": token_of[tokenizer.eot_token_id],
               "unk_token": token_of[tokenizer.eot_token_id], "pad_token": token_of[pad_id]}
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(directory / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
    })


# --------------------------------------------------------------------------------------------
# Public exports


def export_transformers(model: TextTransformer, out: str | os.PathLike, *, tokenizer: CLIPTokenizer | None = None,
                        pad_id: int = 0, with_projection: bool = False, full: bool = False,
                        dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as a ``transformers`` folder (see the module docstring); returns ``out``.

    ``pad_id``: the tokenizer's pad token (0 as OpenCLIP; 49407, end-of-text, for SD 1.x).
    ``full=True`` needs a whole CLIP model and writes ``CLIPModel`` (+ ``preprocessor_config.json``).
    """
    tokenizer = tokenizer or build_tokenizer(context_length=model.context_length)
    if full:
        _check_full_model(model)
        if with_projection:
            raise ValueError("full=True writes the whole CLIPModel (which has the projection); "
                             "with_projection is for text-only exports")
    with _atomic_directory(out) as tmp:
        if full:
            _write_clip_model(model, tmp, tokenizer=tokenizer, pad_id=pad_id, dtype=dtype)
        else:
            write_text_encoder(model, tmp, tokenizer=tokenizer, pad_id=pad_id, with_projection=with_projection,
                               dtype=dtype)
        write_tokenizer(tokenizer, tmp, pad_id=pad_id, context_length=model.context_length)
    return Path(out)


def export_diffusers(conditioner: TextConditioner, out: str | os.PathLike,
                     dtype: str | torch.dtype | None = None) -> Path:
    """Write the conditioner's towers as diffusers sub-folders: ``text_encoder/`` + ``tokenizer/``,
    and for a second tower (SDXL, SD 3) ``text_encoder_2/`` (``CLIPTextModelWithProjection``) +
    ``tokenizer_2/``. SD 3 reads both towers' projections, so with ``pooled_from="all"`` both are
    written with theirs.

    The folders go into a diffusers pipeline folder as they are, or load on their own with
    ``CLIPTextModel.from_pretrained(out, subfolder="text_encoder")``.
    """
    with _atomic_directory(out) as tmp:
        for index, (tower, tokenizer, pad_id) in enumerate(
                zip(conditioner.towers, conditioner.tokenizers, conditioner.pad_ids)):
            suffix = "" if index == 0 else f"_{index + 1}"
            write_text_encoder(tower, tmp / f"text_encoder{suffix}", tokenizer=tokenizer, pad_id=pad_id,
                               with_projection=index > 0 or conditioner.pooled_from == "all", dtype=dtype)
            write_tokenizer(tokenizer, tmp / f"tokenizer{suffix}", pad_id=pad_id,
                            context_length=conditioner.context_length)
    return Path(out)


def _check_full_model(model) -> None:
    if not hasattr(model, "visual"):
        raise ValueError("full=True needs a whole CLIP model (ldmclip.create_model), not a text tower")
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("this model has a logit_bias (SigLIP-style loss); transformers' CLIPModel has no place "
                         "for it. Export the text tower alone instead.")


def _write_clip_model(model, directory: Path, *, tokenizer: CLIPTokenizer, pad_id: int,
                      dtype: str | torch.dtype | None) -> None:
    from ..transforms import PreprocessConfig

    dtype = _resolve_dtype(dtype, model)
    state = openclip_to_hf_state_dict(model.state_dict())
    config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model.config.embed_dim,
        "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": dtype_name(dtype),
        "text_config": text_config_dict(model, tokenizer, pad_id), "vision_config": _vision_config_dict(model),
    }
    _save_safetensors(state, directory / "model.safetensors", dtype)
    _write_json(directory / "config.json", config)
    pp = PreprocessConfig.from_dict({**model.preprocess_cfg, "size": model.image_size})
    size = model.image_size
    _write_json(directory / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pp.mean), "image_std": list(pp.std), "do_convert_rgb": True,
    })
