"""The training loop of ``ldmclip train``: read it top to bottom.

``train(cfg)`` sets up the run (model, data, optimizer), resumes if asked, then steps until done,
logging, validating and checkpointing on the way, and ends by saving the final model in the
OpenCLIP hub layout.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import losses
from ..registry import create_model, get_tokenizer
from ..transforms import PreprocessConfig
from . import distributed
from . import state as checkpoint_state
from .config import TrainConfig
from .data import DataPosition, build_train_data, build_validation
from .metrics import MetricsLog, plot_training_curves
from .optim import build_optimizer, build_scheduler
from .parallelize import (apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp, clip_gradients,
                          is_fsdp, lock_text_tower, lock_tower, unwrap)
from ..core.precision import autocast, resolve_precision
from .step import contrastive_step


class TrainingError(RuntimeError):
    """A run that cannot go on (unreadable data, diverged loss); the message says what to do."""


@dataclass
class Progress:
    """Counters that are checkpointed with the weights."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.position.epoch, "batches": self.position.batches,
                "samples": self.samples, "skipped": dict(self.skipped), "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Progress":
        return cls(step=raw["step"], position=DataPosition(raw["epoch"], raw["batches"]), samples=raw["samples"],
                   skipped=Counter(raw["skipped"]), nonfinite_steps=raw["nonfinite_steps"],
                   nonfinite_in_a_row=raw["nonfinite_in_a_row"])


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (it then saves and exits)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    output: Path
    final_model: Path
    steps: int
    metrics: dict[str, float]
    skipped: dict[str, int]
    interrupted: bool = False
    rank: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def default_output(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.model).stem.replace(':', '-')}-{stamp}"


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured; under ``torchrun`` / ``srun`` with several processes, distributed.

    The process group is set up here (and torn down at the end) unless one is already initialised.
    A collective that fails because another process died or hangs becomes a :class:`TrainingError`
    naming the likely cause, so no process waits forever."""
    info = distributed.init_distributed(cfg.device, cfg.dist_timeout)
    try:
        result = _train(cfg, info)
    except Exception as error:
        if info.enabled and not isinstance(error, TrainingError) and distributed.is_collective_failure(error):
            raise TrainingError(
                f"rank {info.rank} of {info.world_size}: a collective operation failed, most likely because "
                f"another process died, was killed or hangs (see its log; a hung peer is given up on after "
                f"--dist-timeout {cfg.dist_timeout:g} s). This process stops too. Cause: "
                f"{type(error).__name__}: {str(error)[:500]}") from error
        raise  # (the process group is not torn down: that could wait on a dead peer)
    distributed.shutdown(info)
    return result


def _train(cfg: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    main = info.is_main
    # ---- the run directory (rank 0 names it), device, precision and seed
    output = Path(distributed.broadcast_object(info, str(Path(cfg.output) if cfg.output else default_output(cfg))))
    checkpoint_dir = output / "checkpoints"
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    # ---- model and tokenizer; speed/memory options and parallelism applied from outside the model
    model = create_model(cfg.model, pretrained=cfg.pretrained, patch_dropout=cfg.patch_dropout).to(device)
    tokenizer = get_tokenizer(cfg.model)
    preprocess = PreprocessConfig.from_dict(model.preprocess_cfg)
    if cfg.loss == "siglip" and model.logit_bias is None:
        with torch.no_grad():  # SigLIP's initialisation (Zhai et al. 2023): scale 10, bias -10
            model.logit_scale.fill_(losses.SIGLIP_INIT_LOGIT_SCALE)
        model.logit_bias = torch.nn.Parameter(torch.tensor(losses.SIGLIP_INIT_LOGIT_BIAS, device=device))
        model.config.init_logit_bias = losses.SIGLIP_INIT_LOGIT_BIAS
    if cfg.lock_image:
        lock_tower(model.visual)
    if cfg.lock_text:
        lock_text_tower(model)
    if cfg.grad_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if info.enabled:
        # Same initial weights on every rank (same seed above); from here on each rank draws its own
        # random numbers (patch dropout), or all ranks would drop the same patches.
        seed_everything(cfg.seed + info.rank)
        model = apply_fsdp(model, mixed_precision=precision == "amp_bf16") if cfg.fsdp else apply_ddp(model, device)
    elif cfg.fsdp and main:
        print("--fsdp: a single process has nothing to shard over; training unsharded")
    clip_model = unwrap(model)  # the CLIP module itself (FSDP2 shards it in place)

    # ---- data: each rank loads its slice of every global batch
    train_data = build_train_data(cfg, tokenizer, preprocess, info.rank, info.world_size)
    validation = build_validation(cfg, tokenizer, preprocess)
    total_steps = train_data.total_steps(cfg)

    # ---- loss (over the global batch), optimizer, schedule
    loss_fn = losses.build_loss(cfg.loss, tile_size=cfg.tile_size, rank=info.rank, world_size=info.world_size)
    optimizer = build_optimizer(clip_model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")

    # ---- resume (a .pt file, or a sharded folder written by an FSDP2 run on any number of processes)
    progress = Progress()
    resume_from = checkpoint_state.resolve_resume(cfg.resume, checkpoint_dir) if cfg.resume else None
    if resume_from is not None:
        if checkpoint_state.is_sharded_checkpoint(resume_from):
            saved = checkpoint_state.load_sharded_checkpoint(resume_from, clip_model, optimizer)
        else:
            if is_fsdp(model):
                raise TrainingError(f"--resume {resume_from} is a single-file checkpoint of a single-process or "
                                    f"DDP run; resume it without --fsdp (sharded checkpoints are folders)")
            saved = checkpoint_state.load_checkpoint(resume_from)
            clip_model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        progress = Progress.from_dict(saved["progress"])
        _restore_rng(saved, info, cfg.seed, progress.step)
        if main:
            print(f"resumed from {resume_from} at step {progress.step}")

    def save(step: int) -> Path:
        rngs = distributed.gather_objects(info, checkpoint_state.rng_state())  # every rank's, on rank 0
        trainer = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "rng": rngs[0] if main else None, "rng_per_rank": rngs, "progress": progress.to_dict(),
                   "config": cfg.to_dict(), "world_size": info.world_size}
        if is_fsdp(model):
            path = checkpoint_state.save_sharded_checkpoint(checkpoint_dir, step, model, optimizer, trainer,
                                                            cfg.keep_checkpoints, main)
        else:  # single process or DDP: every rank holds the same state; rank 0 writes it
            path = checkpoint_dir / f"step_{step:08d}.pt"
            if main:
                payload = {"model": clip_model.state_dict(), "optimizer": optimizer.state_dict(), **trainer}
                path = checkpoint_state.save_checkpoint(checkpoint_dir, step, payload, cfg.keep_checkpoints)
        distributed.barrier(info)  # on every rank, the checkpoint is complete when save() returns
        return path

    log = MetricsLog(output) if main else None
    val_metrics: dict[str, float] = {}
    bar = _progress_bar(cfg, total_steps, progress.step) if main else None
    window_start, window_samples = time.perf_counter(), 0
    interrupted = False

    # ---- the loop
    with StopRequest() as stop:
        model.train()
        batches = train_data.batches(progress.position, device)
        while progress.step < total_steps:
            batch = next(batches)
            bad_data = _bad_fraction_message(progress, batch, cfg)
            # Every rank takes the same decisions: stop (a signal reached any rank), fail (any rank's
            # data is bad), and the batch size (the smallest, so gathered features line up).
            stop_now, bad_anywhere, n = distributed.agree(info, stop=stop.signal is not None,
                                                          bad=bad_data is not None, batch=batch.images.shape[0])
            if stop_now:
                if main:
                    why = f"received signal {stop.signal}" if stop.signal is not None else "another process received a signal"
                    print(f"\n{why}: saving a checkpoint at step {progress.step} and stopping")
                save(progress.step)
                interrupted = True
                break
            if bad_anywhere:
                raise TrainingError(bad_data or "another process found too much unreadable data (see its error)")
            progress.position = batch.position_after
            progress.skipped.update(batch.skipped)
            if n < 2:
                continue  # a batch with no (or one) readable sample has no contrastive signal

            loss = contrastive_step(model, loss_fn, batch.images[:n], batch.tokens[:n], precision, cfg.accum,
                                    cfg.lock_image, cfg.lock_text)
            loss = distributed.mean_over_ranks(info, loss)  # the global loss; NaN anywhere is NaN everywhere
            if not torch.isfinite(loss):
                _skip_nonfinite_step(optimizer, progress, cfg)
                continue
            progress.nonfinite_in_a_row = 0
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(model, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.clamp_logit_scale_(clip_model)
            progress.step += 1
            progress.samples += n * info.world_size
            window_samples += n * info.world_size

            if main and (progress.step % cfg.log_every == 0 or progress.step == total_steps):
                elapsed = time.perf_counter() - window_start
                values = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                          "logit_scale": clip_model.logit_scale.exp().item(), "grad_norm": grad_norm,
                          "samples_per_s": window_samples / max(elapsed, 1e-9), "samples": progress.samples,
                          "skipped": sum(progress.skipped.values())}
                log.log(progress.step, "train", values)
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                                    scale=f"{values['logit_scale']:.1f}", sps=f"{values['samples_per_s']:.0f}")
                window_start, window_samples = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and progress.step % cfg.eval_every == 0 and progress.step < total_steps:
                val_metrics = _validate(model, validation, precision, device, log, progress.step)
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < total_steps:
                save(progress.step)

    if bar is not None:
        bar.close()
    # ---- the end: final checkpoint, validation, model, plot (files by rank 0)
    if not interrupted:
        save(progress.step)
        val_metrics = _validate(model, validation, precision, device, log, progress.step)
    final = output / "final"
    _save_final_model(model, final, main)
    if main:
        log.close()
        plot_training_curves(output / "metrics.jsonl", output / "training_curves.png")
        summary = {"steps": progress.step, "samples": progress.samples, "skipped": dict(progress.skipped),
                   "nonfinite_steps": progress.nonfinite_steps, "validation": val_metrics,
                   "world_size": info.world_size}
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(info)
    return TrainResult(output, final, progress.step, val_metrics, dict(progress.skipped), interrupted, info.rank)


def _restore_rng(saved: dict[str, Any], info: distributed.DistInfo, seed: int, step: int) -> None:
    """Each rank's random state as saved; when the number of processes changed, a fresh seed per
    rank (random draws such as patch dropout then differ from an uninterrupted run)."""
    per_rank = saved.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == info.world_size:
        checkpoint_state.set_rng_state(per_rank[info.rank])
    elif info.world_size == 1:
        checkpoint_state.set_rng_state(saved["rng"])
    else:
        seed_everything(seed + 1_000_003 * step + info.rank)


def _save_final_model(model: torch.nn.Module, directory: Path, main: bool) -> None:
    """The final model in the OpenCLIP hub layout, written by rank 0. FSDP2: the shards are gathered
    into a full state dict on rank 0's CPU first (a collective)."""
    clip_model = unwrap(model)
    if not is_fsdp(model):
        if main:
            clip_model.save_pretrained(directory)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..models.clip import CLIP

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        plain = CLIP(clip_model.config)
        plain.preprocess_cfg = dict(clip_model.preprocess_cfg)
        plain.load_state_dict(full)
        plain.save_pretrained(directory)


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="training")


def _skip_nonfinite_step(optimizer: torch.optim.Optimizer, progress: Progress, cfg: TrainConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    progress.nonfinite_steps += 1
    progress.nonfinite_in_a_row += 1
    if progress.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingError(
            f"the loss was NaN or infinite {progress.nonfinite_in_a_row} steps in a row (step {progress.step}). "
            f"Try a lower --lr, a longer --warmup, --precision fp32 or amp_bf16 instead of amp_fp16, "
            f"or --grad-clip 1.0.")


def _bad_fraction_message(progress: Progress, batch, cfg: TrainConfig) -> str | None:
    """Why to stop when too much of the data (on this rank) is unreadable, counting ``batch``; else None."""
    skipped = progress.skipped + Counter(batch.skipped)
    bad = sum(skipped.values())
    seen = progress.samples + bad + batch.images.shape[0]
    if seen >= 256 and bad / seen > cfg.max_bad_fraction:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common(5))
        return (f"{bad} of the first {seen} samples could not be used ({reasons}). Check --data/--images "
                f"(or raise --max-bad-fraction if this much bad data is expected).")
    return None


def _validate(model, validation, precision: str, device: torch.device, log: MetricsLog | None,
              step: int) -> dict[str, float]:
    """Validation metrics; every rank computes them (FSDP2 needs every rank for a forward pass),
    rank 0 (the one with a ``log``) reports them."""
    if validation is None:
        return {}
    target = unwrap(model)  # DDP: the replica itself, no collectives
    target.eval()
    with autocast(precision, device):
        metrics = validation.evaluate(target, device)
    target.train()
    if is_fsdp(model):
        model.reshard()
    if log is not None:
        log.log(step, "val", metrics)
        shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not k.endswith("rank"))
        print(f"\nvalidation at step {step}: {shown}")
    return metrics


def format_summary(result: TrainResult) -> str:
    if result.rank != 0:
        return f"rank {result.rank}: finished {result.steps} steps (rank 0 reports the run)"
    lines = [f"finished {result.steps} steps; run folder: {result.output}",
             f"final model (OpenCLIP hub layout): {result.final_model}",
             f"  load it with ldmclip.create_model('local-dir:{result.final_model}')"]
    if result.skipped:
        lines.append("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    for key, value in result.metrics.items():
        if not math.isnan(value) and not key.endswith("rank"):
            lines.append(f"  {key:<38} {100 * value:6.2f}%")
    return "\n".join(lines)
