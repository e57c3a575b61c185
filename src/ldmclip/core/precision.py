"""Precision and dtype names, written once: which compute precision is fast on this machine, the
autocast context for it, and the names of stored dtypes (``--precision`` and ``--dtype`` of every
command, the ``precision=`` of ``create_model``)."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from .errors import UserError

__all__ = ["PRECISIONS", "DTYPES", "COMPACT_DTYPES", "MODEL_PRECISIONS", "cpu_has_fast_bf16", "resolve_precision", "autocast",
           "canonical_dtype_name", "dtype_from_name", "dtype_name", "precision_dtype", "get_cast_dtype",
           "get_input_dtype"]

# Compute precision of a command (``--precision``): "auto" is resolved per device by resolve_precision.
PRECISIONS = ("auto", "amp_bf16", "amp_fp16", "fp32")

# Stored dtypes (``--dtype``): the short names are the spelling; torch's long names are accepted too.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# Compact stored dtypes of the text-embedding cache (``cache-text --dtype``), kept with a float32 scale
# per token (``ldmclip.conditioning.quantize``); not weight dtypes, so not in DTYPES.
COMPACT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

# ``create_model(precision=...)``: the weight dtype. Mixed precision keeps fp32 weights; autocast is
# applied by whoever runs the model.
MODEL_PRECISIONS = {**DTYPES, "amp": torch.float32, "amp_bf16": torch.float32, "amp_fp16": torch.float32}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32 (about 2.5x with AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into a concrete precision for ``device``; validate the rest."""
    if precision == "auto":
        if device.type == "cuda":
            return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
        return "amp_bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "amp_fp16" and device.type != "cuda":
        raise UserError("amp_fp16 needs a CUDA device; on CPU use amp_bf16 or fp32")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def canonical_dtype_name(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> str:
    """``"float16"`` -> ``"fp16"``; a clear error for a name outside ``allowed``."""
    short = _LONG_NAMES.get(name, name)
    if short not in allowed:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(allowed)}")
    return short


def dtype_from_name(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (short or long spelling)."""
    return DTYPES[canonical_dtype_name(name, allowed)]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's long name of a floating dtype (``"float16"``), as ``transformers`` configs store it."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"cannot store weights as {dtype}; use float32, float16 or bfloat16")
    return str(dtype).removeprefix("torch.")


def precision_dtype(precision: str) -> torch.dtype:
    """The weight dtype of a ``create_model`` precision name (mixed-precision names keep fp32 weights)."""
    if precision not in MODEL_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(MODEL_PRECISIONS)}")
    return MODEL_PRECISIONS[precision]


def get_cast_dtype(precision: str) -> torch.dtype | None:
    """OpenCLIP's ``get_cast_dtype``: the dtype a model's weights are cast to for ``precision``
    (``bf16``/``fp16``), ``None`` for every other name (fp32 and the mixed-precision ones)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def get_input_dtype(precision: str) -> torch.dtype | None:
    """OpenCLIP's ``get_input_dtype``: the dtype to cast input images to for ``precision``
    (``bf16``/``pure_bf16``, ``fp16``/``pure_fp16``), ``None`` otherwise (autocast casts)."""
    return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
            "fp16": torch.float16, "pure_fp16": torch.float16}.get(precision)
