"""Which device a command runs on: one rule for ``ldmclip train``, ``cache-text``, ``eval``, ``index``
and ``search``, so ``--device`` means the same everywhere."""

from __future__ import annotations

import torch

from .errors import UserError
from .launch import local_process

__all__ = ["resolve_device"]


def resolve_device(name: str | None = "auto", local_rank: int | None = None,
                   world_size: int | None = None) -> torch.device:
    """The device for ``--device NAME``.

    ``"auto"`` (or ``None``) is CUDA when available, else the CPU. A CUDA device without an index
    (``"auto"`` or ``"cuda"``) is this process's own GPU when several processes run (``cuda:LOCAL_RANK``,
    so ranks do not all land on GPU 0) and the current GPU otherwise; ``"cuda:N"`` is taken as given.
    ``local_rank`` / ``world_size`` default to the launcher's environment (:func:`local_process`).
    """
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and device.index is None:
        env_rank, env_world = local_process()
        local_rank = env_rank if local_rank is None else local_rank
        world_size = env_world if world_size is None else world_size
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return device
