"""Resumable training checkpoints: written atomically, restored exactly.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler, grad scaler,
the random-number generators (of every process), the data position and the running counters.

Two formats, both written under a temporary name and renamed, so a run killed at any moment never
leaves a partial checkpoint that ``--resume latest`` would pick up:

* ``checkpoints/step_00001234.pt``: one file, written by rank 0 (single process and DDP, where
  every process holds the whole model and optimizer). Resumable by a single process or DDP.
* ``checkpoints/step_00001234/``: a ``torch.distributed.checkpoint`` (DCP) folder, written by
  FSDP2 runs: every process writes its own shards of the model and optimizer state (``*.distcp`` +
  ``.metadata``, from ``get_state_dict``), and rank 0 adds ``trainer_state.pt`` with the rest.
  DCP reshards on load, so it resumes on any number of processes — FSDP2, DDP or a single one.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
TRAINER_STATE = "trainer_state.pt"


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
    _prune(directory, keep)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory`` (files and sharded folders), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p.is_file() if m.group(2) else is_sharded_checkpoint(p))]
    return [p for _, p in sorted(found)]


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE).is_file() and (path / ".metadata").is_file()


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: a file or sharded folder, or 'latest' (None when there is
    none yet)."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file or sharded checkpoint folder")
    return path


def _prune(directory: Path, keep: int) -> None:
    import shutil

    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_sharded_checkpoint(directory: Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                            keep: int, is_main: bool) -> Path:
    """Collective: every process writes its shards of the model and optimizer state with DCP into
    ``step_<step>.tmp/``; then rank 0 adds ``trainer_state.pt``, renames the folder to
    ``step_<step>/`` and prunes old checkpoints. Call on every rank; the caller barriers after."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = directory / f"step_{step:08d}"
    tmp = directory / f"step_{step:08d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if is_main:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(directory, keep)
    return final


def load_sharded_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Load model and optimizer state from a DCP folder into ``model`` / ``optimizer`` as they are
    sharded now (FSDP2 on any number of processes, DDP or a single process); returns the rest of
    the trainer state. Collective when a process group is initialised."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # loading a sharded checkpoint into one process is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
