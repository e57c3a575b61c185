"""Resumable training checkpoints: the :class:`Checkpointer` the trainer holds (after torchtitan's).

It is the one owner of the choice between the two formats, for save, resume and load. A
checkpoint holds everything the next step depends on: model, optimizer, scheduler, grad scaler,
the random-number generators (of every process), the data position and the running counters.

Both formats are written under a temporary name and renamed, so a run killed at any moment never
leaves a partial checkpoint that ``--resume latest`` would pick up:

* ``checkpoints/step_00001234.pt``: one file, written by rank 0 (single process and DDP, where
  every process holds the whole model and optimizer). Resumable by a single process or DDP.
* ``checkpoints/step_00001234/``: a ``torch.distributed.checkpoint`` (DCP) folder, written by
  FSDP2 runs: every process writes its own shards of the model and optimizer state (``*.distcp`` +
  ``.metadata``, from ``get_state_dict``), and rank 0 adds ``trainer_state.pt`` with the rest.
  DCP reshards on load, so it resumes on any number of processes — FSDP2, DDP or a single one.

An :class:`~ldmclip.train.ema.EMA` given to the Checkpointer is saved and loaded with the model, as
``ema`` beside ``model`` and ``optimizer`` (in the DCP folder as shards, like the model's).
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.errors import CheckpointError
from ..checkpoints.state_dict import read_pickle
from ..core.errors import UserError
from ..core.files import save_torch
from . import distributed
from .ema import EMA
from .parallelize import is_fsdp, unwrap

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
EMA_KEY = "ema"
HAS_EMA = "has_ema"  # in a sharded checkpoint's trainer_state.pt: whether its DCP shards hold an EMA


def rng_state() -> dict[str, Any]:
    """This process's random state (Python, torch CPU, every CUDA device)."""
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


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE).is_file() and (path / ".metadata").is_file()


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory`` (files and sharded folders), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p.is_file() if m.group(2) else is_sharded_checkpoint(p))]
    return [p for _, p in sorted(found)]


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run in ``directory``.

    ``model`` is the model as the trainer runs it (wrapped by DDP or sharded by FSDP2): an FSDP2
    model is saved as a sharded folder by every process, anything else as one ``.pt`` file by rank
    0. Loading reads either format written before (a sharded folder into any model; a ``.pt`` file
    into an unsharded one). ``keep`` > 0 keeps only the newest ``keep`` checkpoints."""

    def __init__(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int,
                 info: distributed.DistInfo, ema: EMA | None = None):
        self.directory, self.model, self.optimizer = Path(directory), model, optimizer
        self.keep, self.info, self.ema = keep, info, ema
        self.sharded = is_fsdp(model)

    # ---- save

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: write the checkpoint of ``step``; on every rank it is complete on return."""
        if self.sharded:
            path = self._save_sharded(step, trainer_state)
        else:  # single process or DDP: every rank holds the same state; rank 0 writes it
            path = self.directory / f"step_{step:08d}.pt"
            if self.info.is_main:
                payload = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                           **self._ema_state(), **trainer_state}
                save_torch(path, payload)
                self._prune()
        distributed.barrier(self.info)
        return path

    def _save_sharded(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every process writes its shards with DCP into ``step_<step>.tmp/``; then rank 0 adds
        ``trainer_state.pt``, renames the folder to ``step_<step>/`` and prunes old checkpoints."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f"step_{step:08d}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(self.info)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state, **self._ema_state()}, checkpoint_id=str(tmp))
        if self.info.is_main:
            save_torch(tmp / TRAINER_STATE, {**trainer_state, HAS_EMA: self.ema is not None})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        return final

    def _ema_state(self) -> dict[str, Any]:
        return {EMA_KEY: self.ema.state_dict()} if self.ema is not None else {}

    def _prune(self) -> None:
        for old in list_checkpoints(self.directory)[:-self.keep] if self.keep > 0 else []:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    # ---- resume

    def find(self, resume: str | None) -> Path | None:
        """The checkpoint ``--resume`` names: a file or sharded folder, or 'latest' (None when there
        is none yet, or when ``resume`` is empty)."""
        if not resume:
            return None
        if resume == LATEST:
            found = list_checkpoints(self.directory)
            return found[-1] if found else None
        path = Path(resume)
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise UserError(f"--resume {resume}: no such checkpoint file or sharded checkpoint folder")
        return path

    def resume(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        """``(path, rest of the trainer state)`` of the checkpoint ``--resume`` names, loaded (see
        :meth:`load`); None when there is none to resume from.

        ``latest`` takes the newest checkpoint that can be read: newer ones that cannot (truncated,
        damaged) are skipped, and one line on stderr names each and why. A checkpoint named explicitly
        that cannot be read is a :class:`CheckpointError` naming it."""
        if resume != LATEST:
            path = self.find(resume)
            return None if path is None else (path, self.load(path))
        found = list_checkpoints(self.directory)
        skipped: list[str] = []
        for path in reversed(found):
            try:
                saved = self._read(path)
            except CheckpointError as error:
                skipped.append(f"{path.name} ({error})")
                continue
            if skipped and self.info.is_main:
                print(f"--resume latest: skipped {len(skipped)} newer checkpoint(s) that cannot be read: "
                      f"{'; '.join(skipped)}; resuming from {path}", file=sys.stderr, flush=True)
            return path, self._apply(path, saved)
        if skipped:
            raise CheckpointError(f"--resume latest: no checkpoint in {self.directory} can be read: "
                                  f"{'; '.join(skipped)}")
        return None

    def load(self, path: Path) -> dict[str, Any]:
        """Load model and optimizer state from ``path`` into the trainer's; returns the rest of the
        trainer state (scheduler, scaler, rng, progress...). Collective for a sharded folder. A file that
        cannot be read is a :class:`CheckpointError` naming it."""
        return self._apply(path, self._read(path))

    def _read(self, path: Path) -> dict[str, Any]:
        """What can be read of ``path`` before anything of the trainer is changed: a ``.pt`` file whole,
        a sharded folder's trainer state (its shards are read by DCP when applied)."""
        if is_sharded_checkpoint(path):
            return read_pickle(path / TRAINER_STATE)
        if self.sharded:
            raise UserError(f"--resume {path} is a single-file checkpoint of a single-process or DDP run; "
                            f"resume it without --fsdp (sharded checkpoints are folders)")
        saved = read_pickle(path)
        if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and "optimizer" in saved):
            raise CheckpointError(f"{path} is not a checkpoint of ldmclip train (no model and optimizer state); "
                                  f"to start from its weights, use --pretrained")
        return saved

    def _apply(self, path: Path, saved: dict[str, Any]) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            saved_ema = bool(saved.pop(HAS_EMA, False))
            with_ema = self.ema is not None and saved_ema
            self._note_dropped_ema(path, saved_ema)
            self._load_sharded(path, with_ema)
            if self.ema is not None and not with_ema:
                self._start_ema_here(path)
            return saved
        unwrap(self.model).load_state_dict(saved.pop("model"))
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        ema_state = saved.pop(EMA_KEY, None)
        self._note_dropped_ema(path, ema_state is not None)
        if self.ema is not None:
            if ema_state is None:
                self._start_ema_here(path)
            else:
                self.ema.load_state_dict(ema_state)
        return saved

    def _note_dropped_ema(self, path: Path, saved_ema: bool) -> None:
        if saved_ema and self.ema is None and self.info.is_main:
            print(f"--resume: {path} holds an EMA of the weights, which this run (without --ema) does not "
                  f"keep; add --ema to continue it", file=sys.stderr, flush=True)

    def _start_ema_here(self, path: Path) -> None:
        """A checkpoint of a run without --ema, resumed with it: the EMA starts from its weights."""
        self.ema.reset(unwrap(self.model))
        if self.info.is_main:
            print(f"--ema: {path} holds no EMA (its run had no --ema); the EMA starts from its weights",
                  file=sys.stderr, flush=True)

    def _load_sharded(self, path: Path, with_ema: bool = False) -> None:
        """DCP reshards into the model and optimizer as they are sharded now (FSDP2 on any number of
        processes, DDP or a single process)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model = unwrap(self.model)
        model_state, optim_state = get_state_dict(model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if with_ema:  # loaded in place into the EMA's own tensors (DTensor shards under FSDP2)
            state[EMA_KEY] = self.ema.state_dict()
        single = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():  # loading a sharded checkpoint into one process is intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=str(path), no_dist=single)
        set_state_dict(model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if with_ema:
            self.ema.load_state_dict(state[EMA_KEY])
