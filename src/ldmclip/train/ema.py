"""An exponential moving average (EMA) of the trained weights, held by the trainer beside the model.

``ema.update(model)`` after every optimizer step (with ``--accum``: once per optimizer step, not per
micro-batch) moves each kept tensor towards the weights::

    ema <- d_n * ema + (1 - d_n) * weight,   d_n = min(decay, (1 + n) / (10 + n))

where ``n`` counts the updates (1 for the first). The warm-up term ``(1 + n) / (10 + n)`` is the
``num_updates`` schedule of TensorFlow's ``tf.train.ExponentialMovingAverage``, which the CompVis
latent-diffusion code (``ldm/modules/ema.py``, ``LitEma``) uses for its U-Nets: early on the EMA
follows the weights closely (d_1 = 2/11), so a short run is not dominated by the random initial
weights that a plain decay of 0.9999 would keep for ~10,000 steps. ``warmup=False`` uses ``decay``
from the first update.

What is kept: an fp32 copy of every trainable parameter, on the parameter's device (frozen ones never
change, so their EMA is the weights themselves; buffers such as BatchNorm statistics are the model's).
Under FSDP2 the parameters are ``DTensor`` shards and so are their copies: each process keeps (and
updates, with no communication) the EMA of its own shards, and the checkpointer saves them through the
same DCP path as the model, which reshards them on load. Under DDP every process keeps the same copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core.errors import UserError

UPDATES = "updates"
WEIGHTS = "weights"


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of update number ``updates`` (1 for the first): ``min(decay, (1 + n) / (10 + n))``
    with warm-up, else ``decay``."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a ``DTensor``'s local shard (a view, so writing to it writes the
    shard), any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class EMA:
    """The moving average of ``model``'s trainable parameters (``model``: the CLIP module itself, whose
    parameters may be FSDP2 ``DTensor`` shards; not a DDP wrapper, so the names carry no prefix)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay, self.warmup = decay, warmup
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s weights (no update counted yet)."""
        self.updates = 0
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        with torch.no_grad():
            self.weights: dict[str, torch.Tensor] = {
                name: param.detach().to(torch.float32, copy=True) for name, param in model.named_parameters()
                if param.requires_grad}

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(local EMA tensors, the matching local parameters of ``model``), in the same order."""
        params = dict(model.named_parameters())
        missing = [name for name in self.names if name not in params]
        if missing:
            raise KeyError(f"the model has no parameter(s) {', '.join(missing[:3])} that the EMA keeps")
        return [_local(self.weights[n]) for n in self.names], [_local(params[n].detach()) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``'s current weights; returns the decay it used."""
        self.updates += 1
        decay = ema_decay(self.decay, self.updates, self.warmup)
        averages, params = self._pairs(model)
        if averages:
            # lerp(ema, w, 1 - d) = ema + (1 - d) (w - ema): one fused pass over all tensors
            torch._foreach_lerp_(averages, [p.float() for p in params], 1.0 - decay)
        return decay

    @contextlib.contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the EMA weights (for validation, or to save them); on the
        way out its own weights are back, bit for bit. A swap, one tensor at a time, so it costs no
        second copy of the model. Under FSDP2 every process must enter (the forward passes inside
        all-gather)."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        for average, param in zip(*self._pairs(model)):
            held = param.clone()
            param.copy_(average)
            average.copy_(held)

    # ---- checkpoints

    def state_dict(self) -> dict[str, object]:
        """The EMA as tensors only (``updates`` is a 0-dim tensor), so DCP can save it beside the model:
        under FSDP2 ``weights`` are DTensor shards, written by every process."""
        return {UPDATES: torch.tensor(self.updates, dtype=torch.int64), WEIGHTS: dict(self.weights)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Copy a saved EMA in (the names must be this EMA's: the same trainable parameters)."""
        weights = state[WEIGHTS]
        if sorted(weights) != sorted(self.names):
            extra, missing = sorted(set(weights) - set(self.names)), sorted(set(self.names) - set(weights))
            raise UserError(f"--resume: the checkpoint's EMA keeps other parameters than this run trains (saved "
                            f"only: {', '.join(extra[:3]) or '-'}; here only: {', '.join(missing[:3]) or '-'}); "
                            f"resume with the --lock-* options the run was started with")
        with torch.no_grad():
            for name in self.names:
                if weights[name] is not self.weights[name]:  # (DCP loads in place: then it is the same)
                    self.weights[name].copy_(weights[name])
        self.updates = int(state[UPDATES])

    def settings(self) -> dict[str, object]:
        """What config.json records of the EMA."""
        return {"decay": self.decay, "warmup": "min(decay, (1 + n) / (10 + n))" if self.warmup else "none",
                "updated": "after every optimizer step", "dtype": "float32", "tensors": len(self.names)}
