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
from ..models import create_model, get_tokenizer
from ..transforms import PreprocessConfig
from . import state as checkpoint_state
from .config import TrainConfig
from .data import DataPosition, build_train_data, build_validation
from .metrics import MetricsLog, plot_training_curves
from .optim import build_optimizer, build_scheduler
from .parallelize import apply_activation_checkpointing, apply_compile, lock_text_tower, lock_tower
from .precision import autocast, resolve_precision
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_output(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.model).stem.replace(':', '-')}-{stamp}"


def train(cfg: TrainConfig) -> TrainResult:
    # ---- the run directory, device, precision and seed
    output = Path(cfg.output) if cfg.output else default_output(cfg)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output / "checkpoints"
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # ---- model and tokenizer; speed/memory options applied from outside the model
    model = create_model(cfg.model, pretrained=cfg.pretrained, patch_dropout=cfg.patch_dropout).to(device)
    tokenizer = get_tokenizer(cfg.model)
    preprocess = PreprocessConfig.from_dict(model.preprocess_cfg)
    if cfg.lock_image:
        lock_tower(model.visual)
    if cfg.lock_text:
        lock_text_tower(model)
    if cfg.grad_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)

    # ---- data
    train_data = build_train_data(cfg, tokenizer, preprocess)
    validation = build_validation(cfg, tokenizer, preprocess)
    total_steps = train_data.total_steps(cfg)

    # ---- loss, optimizer, schedule
    loss_fn = losses.build_loss(cfg.loss, tile_size=cfg.tile_size)
    if cfg.loss == "siglip" and model.logit_bias is None:
        with torch.no_grad():  # SigLIP's initialisation (Zhai et al. 2023): scale 10, bias -10
            model.logit_scale.fill_(losses.SIGLIP_INIT_LOGIT_SCALE)
        model.logit_bias = torch.nn.Parameter(torch.tensor(losses.SIGLIP_INIT_LOGIT_BIAS, device=device))
        model.config.init_logit_bias = losses.SIGLIP_INIT_LOGIT_BIAS
    optimizer = build_optimizer(model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")

    # ---- resume
    progress = Progress()
    resume_from = checkpoint_state.resolve_resume(cfg.resume, checkpoint_dir) if cfg.resume else None
    if resume_from is not None:
        saved = checkpoint_state.load_checkpoint(resume_from)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        checkpoint_state.set_rng_state(saved["rng"])
        progress = Progress.from_dict(saved["progress"])
        print(f"resumed from {resume_from} at step {progress.step}")

    def save(step: int) -> Path:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "rng": checkpoint_state.rng_state(), "progress": progress.to_dict(), "config": cfg.to_dict()}
        return checkpoint_state.save_checkpoint(checkpoint_dir, step, payload, cfg.keep_checkpoints)

    log = MetricsLog(output)
    val_metrics: dict[str, float] = {}
    bar = _progress_bar(cfg, total_steps, progress.step)
    window_start, window_samples = time.perf_counter(), 0
    interrupted = False

    # ---- the loop
    with StopRequest() as stop:
        model.train()
        batches = train_data.batches(progress.position, device)
        while progress.step < total_steps:
            if stop.signal is not None:
                print(f"\nreceived signal {stop.signal}: saving a checkpoint at step {progress.step} and stopping")
                save(progress.step)
                interrupted = True
                break
            batch = next(batches)
            progress.position = batch.position_after
            progress.skipped.update(batch.skipped)
            _check_bad_fraction(progress, batch, cfg)
            if batch.images.shape[0] < 2:
                continue  # a batch with no (or one) readable sample has no contrastive signal

            loss = contrastive_step(model, loss_fn, batch.images, batch.tokens, precision, cfg.accum,
                                    cfg.lock_image, cfg.lock_text)
            if not torch.isfinite(loss):
                _skip_nonfinite_step(optimizer, progress, cfg)
                continue
            progress.nonfinite_in_a_row = 0
            scaler.unscale_(optimizer)
            grad_norm = _clip_gradients(model, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.clamp_logit_scale_(model)
            progress.step += 1
            progress.samples += batch.images.shape[0]
            window_samples += batch.images.shape[0]

            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - window_start
                values = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                          "logit_scale": model.logit_scale.exp().item(), "grad_norm": grad_norm,
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
    # ---- the end: final checkpoint, validation, model, plot
    if not interrupted:
        save(progress.step)
        val_metrics = _validate(model, validation, precision, device, log, progress.step)
    log.close()
    final = output / "final"
    model.save_pretrained(final)
    plot_training_curves(output / "metrics.jsonl", output / "training_curves.png")
    summary = {"steps": progress.step, "samples": progress.samples, "skipped": dict(progress.skipped),
               "nonfinite_steps": progress.nonfinite_steps, "validation": val_metrics}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(output, final, progress.step, val_metrics, dict(progress.skipped), interrupted)


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="training")


def _clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0


def _skip_nonfinite_step(optimizer: torch.optim.Optimizer, progress: Progress, cfg: TrainConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    progress.nonfinite_steps += 1
    progress.nonfinite_in_a_row += 1
    if progress.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingError(
            f"the loss was NaN or infinite {progress.nonfinite_in_a_row} steps in a row (step {progress.step}). "
            f"Try a lower --lr, a longer --warmup, --precision fp32 or amp_bf16 instead of amp_fp16, "
            f"or --grad-clip 1.0.")


def _check_bad_fraction(progress: Progress, batch, cfg: TrainConfig) -> None:
    bad = sum(progress.skipped.values())
    seen = progress.samples + bad + batch.images.shape[0]
    if seen >= 256 and bad / seen > cfg.max_bad_fraction:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in progress.skipped.most_common(5))
        raise TrainingError(
            f"{bad} of the first {seen} samples could not be used ({reasons}). Check --data/--images "
            f"(or raise --max-bad-fraction if this much bad data is expected).")


def _validate(model, validation, precision: str, device: torch.device, log: MetricsLog, step: int) -> dict[str, float]:
    if validation is None:
        return {}
    model.eval()
    with autocast(precision, device):
        metrics = validation.evaluate(model, device)
    model.train()
    log.log(step, "val", metrics)
    shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not k.endswith("rank"))
    print(f"\nvalidation at step {step}: {shown}")
    return metrics


def format_summary(result: TrainResult) -> str:
    lines = [f"finished {result.steps} steps; run folder: {result.output}",
             f"final model (OpenCLIP hub layout): {result.final_model}",
             f"  load it with ldmclip.create_model('local-dir:{result.final_model}')"]
    if result.skipped:
        lines.append("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    for key, value in result.metrics.items():
        if not math.isnan(value) and not key.endswith("rank"):
            lines.append(f"  {key:<38} {100 * value:6.2f}%")
    return "\n".join(lines)
