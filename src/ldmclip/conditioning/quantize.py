"""Compact storage of the text-embedding cache: int8 and fp8 (e4m3) values with a float32 scale per
token (hidden states ``[U, T, W]``: one scale per ``(row, token)``, shape ``[U, T]``) or per row (pooled
``[U, D]``: shape ``[U]``). Both directions are here side by side; ``cache.py`` writes with
:func:`quantize` (through :class:`QuantizedRows`, batch by batch) and ``cache_reader.py`` reads with
:func:`dequantize`.

int8
    Symmetric absmax, round to nearest: ``scale = max|x| / 127`` over the token's channels,
    ``q = round(x / scale)`` in ``[-127, 127]``, ``x̂ = q * scale``. So ``|x̂ - x| <= scale / 2`` for
    every element: the error is relative to the token's largest value, not to each element.

fp8 (``torch.float8_e4m3fn``, safetensors ``F8_E4M3``)
    ``scale = max|x| / 448`` (448 is e4m3's largest finite value), ``q = fp8(x / scale)``,
    ``x̂ = q * scale``. e4m3 has 3 mantissa bits, so a value that lands in its normal range
    (``|x / scale| >= 2**-6``) keeps a relative error ``<= 2**-4``; smaller ones are subnormal
    (absolute error ``<= scale * 2**-10``). Why a scale at all, when e4m3 could hold CLIP's outputs
    as they are: e4m3 has only 2**15 of normal range below 448, and where that range sits matters.
    Unscaled, every value under 2**-6 = 0.016 loses relative precision and values under 2**-10 become
    0; the hidden states of a layer-normed tower are mostly of order 0.1-1 with a few channels (and
    the start token) one to two orders of magnitude larger, and the layer-norm gains of trained
    weights move all of it. The per-token scale puts each token's largest value at 448, so its range
    is used whatever the magnitudes are, and it cannot overflow; it costs 4 bytes per token (0.5% of
    an fp8 token of width 768). ``benchmarks/cache_compact.py`` measures both ("fp8, no scale").

A token whose values are all zero gets scale 0 and zeros (no division by zero); exact zeros stay zero
in both formats. Quantising is deterministic (the same input gives the same bytes)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.precision import COMPACT_DTYPES

__all__ = ["COMPACT_DTYPES", "QMAX", "SCALE_SUFFIX", "is_compact", "quantize", "dequantize", "QuantizedRows",
           "stored_tensors"]

# The largest stored magnitude of each format: the token's absmax maps to it.
QMAX = {"int8": 127.0, "fp8": float(torch.finfo(torch.float8_e4m3fn).max)}
SCALE_SUFFIX = "_scale"  # "hidden" -> "hidden_scale" in a shard file
SCALE_DTYPE = torch.float32


def is_compact(dtype: str) -> bool:
    """Whether the cache dtype name is one stored with scales (int8, fp8)."""
    return dtype in COMPACT_DTYPES


def quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scale)`` of ``x`` in the compact format ``dtype`` (``"int8"`` or ``"fp8"``), one scale per
    vector along the last dimension: ``values`` has ``x``'s shape, ``scale`` its shape without the last
    dimension (float32)."""
    if not is_compact(dtype):
        raise ValueError(f"not a compact dtype: {dtype!r} (use one of {', '.join(COMPACT_DTYPES)})")
    x = x.detach().to(torch.float32)
    qmax = QMAX[dtype]
    scale = x.abs().amax(dim=-1) / qmax
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # all-zero token: q = 0
    y = x / divisor
    if dtype == "int8":
        values = y.round().clamp_(-qmax, qmax).to(torch.int8)
    else:  # the clamp guards the absmax element against x / (absmax / 448) rounding to just above 448
        values = y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
    return values.contiguous(), scale.to(SCALE_DTYPE).contiguous()


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values * scale`` (the inverse of :func:`quantize`), computed in float32, returned as ``dtype``."""
    return (values.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


class QuantizedRows:
    """``n`` rows of shape ``shape`` stored in a compact format, filled batch by batch
    (``rows[start:stop] = x``) so that a shard never needs a float copy of all its rows."""

    def __init__(self, n: int, shape: Sequence[int], dtype: str) -> None:
        self.dtype = dtype
        self.shape = torch.Size((n, *shape))
        self.values = torch.empty(self.shape, dtype=COMPACT_DTYPES[dtype])
        self.scale = torch.empty(self.shape[:-1], dtype=SCALE_DTYPE)

    def __setitem__(self, rows: slice, x: torch.Tensor) -> None:
        self.values[rows], self.scale[rows] = quantize(x, self.dtype)


def stored_tensors(name: str, rows: torch.Tensor | QuantizedRows) -> dict[str, torch.Tensor]:
    """The tensors of a shard file for ``rows``: ``{name: rows}``, or ``{name: values, name_scale: scale}``."""
    if isinstance(rows, QuantizedRows):
        return {name: rows.values, name + SCALE_SUFFIX: rows.scale}
    return {name: rows}
