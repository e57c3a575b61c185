"""Weight-space interpolation of two checkpoints of one architecture (WiSE-FT, Wortsman et al. 2022).

``interpolate_state_dicts(a, b, alpha)`` is ``(1 - alpha) * a + alpha * b`` for every floating tensor;
integer and boolean buffers (counters, ids) are taken from ``a``. A pure function of two state dicts:
reading the checkpoints (any layout) and writing the result are the caller's (``ldmclip merge``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import CheckpointError

__all__ = ["interpolate_state_dicts"]


def interpolate_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` key by key, in each tensor's own dtype (computed in float64 first).

    ``alpha`` 0 and 1 return copies of ``a``'s and ``b``'s tensors bit for bit (arithmetic would turn
    ``-0.0`` into ``0.0`` and ``0 * inf`` into NaN). Different keys, shapes or dtypes are a
    :class:`CheckpointError` naming them: the two are not the same architecture."""
    if not 0.0 <= alpha <= 1.0:
        raise CheckpointError(f"alpha must be from 0 (the first checkpoint) to 1 (the second), got {alpha:g}")
    _check_same_layout(a, b)
    merged = {}
    for key, first in a.items():
        second = b[key]
        if alpha == 0.0 or not (first.is_floating_point() or first.is_complex()):
            merged[key] = first.detach().clone()
        elif alpha == 1.0:
            merged[key] = second.detach().clone()
        else:
            mixed = (1.0 - alpha) * first.detach().double() + alpha * second.detach().double()
            merged[key] = mixed.to(first.dtype)
    return merged


def _check_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = [f"{len(keys)} key(s) only in the {which} (e.g. {', '.join(keys[:3])})"
                 for which, keys in (("first", only_a), ("second", only_b)) if keys]
        raise CheckpointError(f"the two checkpoints are not the same architecture: {'; '.join(parts)}")
    for key, first in a.items():
        second = b[key]
        if first.shape != second.shape:
            raise CheckpointError(f"the two checkpoints are not the same architecture: {key} is "
                                  f"{tuple(first.shape)} in the first and {tuple(second.shape)} in the second")
        if first.dtype != second.dtype:
            raise CheckpointError(f"{key} is {first.dtype} in the first checkpoint and {second.dtype} in the second; "
                                  f"convert one so that both have the same dtype")
