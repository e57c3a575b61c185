"""Resumable training checkpoints: written atomically, restored exactly.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler, grad scaler,
the random-number generators, the data position and the running counters. It is one file,
``checkpoints/step_00001234.pt``, written under a temporary name and renamed, so a run killed at
any moment never leaves a partial file that ``--resume latest`` would pick up.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import atomic_write

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_random_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_random_state(state: Any) -> tuple:
    # weights_only loading turns the nested tuples of random.getstate() into lists.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step_<step>.pt`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = directory / f"step_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """The checkpoint file ``--resume`` names: a path, or 'latest' (None when there is none yet)."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
