"""The training loop of ``ldmclip train``: read it top to bottom.

``train(cfg)`` runs three plain functions in turn, each reading top to bottom:

* ``_set_up(cfg, info, output) -> Run``: the run folder, model, data, optimizer, the
  :class:`~ldmclip.train.checkpointer.Checkpointer`, and the resume if asked; it prints the run's
  folder, model, device, precision and data first;
* ``_loop(run)``: steps until done (or a signal), logging, validating and checkpointing on the way;
* ``_finish(run) -> TrainResult``: the final checkpoint and validation, the final model in the
  OpenCLIP hub layout, the curves and ``summary.json``.

No callbacks and no hidden state: everything a run holds is a field of :class:`Run`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import losses
from ..core.errors import UserError
from ..core.files import write_json_atomic
from ..core.precision import autocast, resolve_precision
from ..registry import create_model, get_tokenizer
from ..transforms import PreprocessConfig
from . import distributed
from .anchor import TextAnchor, build_anchor
from .checkpointer import Checkpointer, list_checkpoints, rng_state, set_rng_state
from .config import TrainConfig
from .ema import EMA
from .data import (DataPosition, MapStyleData, StreamData, Validation, build_train_data, build_validation,
                   record_trained_keys)
from .metrics import MetricsLog, plot_training_curves
from .optim import build_optimizer, build_scheduler
from .param_groups import ParamGroup, build_param_groups, format_param_groups, optimizer_groups
from .parallelize import (apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp, apply_sync_batchnorm,
                          clip_gradients, frozen_towers, is_fsdp, lock_towers, unwrap)
from .step import contrastive_step
from .timing import DataWaitWarning, StepTimer


class TrainingError(UserError):
    """A run that cannot go on for a reason its message explains (unreadable data, a diverged loss, a
    ``--resume`` that does not fit): the command line shows it as one line."""


class PeerFailure(RuntimeError):
    """A collective failed because another process died, was killed or hangs. Not a ``UserError``: the
    command line keeps its traceback and its cause (an NCCL or gloo error), which is what to look at."""


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


class _StopWhileWaiting(BaseException):
    """Raised by the signal handler inside :meth:`StopRequest.next_or_none` to end a wait for data. A
    ``BaseException``, like ``KeyboardInterrupt``: the data code's ``except Exception`` (a shard error
    is counted and the stream goes on) must not swallow it."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (it then saves and exits).

    A wait for data (:meth:`next_or_none`) is cut short by the first signal: a stream that is slow or
    stuck (a hanging read, shards that give nothing) must not keep a run from stopping."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        self._waiting = False
        self._pid = os.getpid()

    def next_or_none(self, items: Iterator[Any]) -> Any:
        """``next(items)``, or ``None`` when a stop was requested before or while waiting for it."""
        try:
            try:
                self._waiting = True
                if self.signal is not None:
                    return None
                return next(items)
            finally:
                self._waiting = False
        except _StopWhileWaiting:  # (caught out here too: the signal may come inside the finally)
            return None

    def __enter__(self) -> "StopRequest":
        self._pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler (Ctrl-C reaches the
            return                    # whole process group): the run's own process does the stopping
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        if self._waiting:
            self._waiting = False
            raise _StopWhileWaiting

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


@dataclass
class Run:
    """Everything a run holds, built by :func:`_set_up`; the loop changes only ``progress``,
    ``val_metrics`` and ``interrupted``."""

    cfg: TrainConfig
    info: distributed.DistInfo
    output: Path
    model: torch.nn.Module         # as it runs: DDP-wrapped or FSDP2-sharded
    clip_model: torch.nn.Module    # the CLIP module itself
    precision: str
    train_data: MapStyleData | StreamData
    validation: Validation | None
    total_steps: int
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    checkpointer: Checkpointer
    progress: Progress
    log: MetricsLog | None         # rank 0 only
    val_metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    param_groups: list[ParamGroup] = field(default_factory=list)  # what the optimizer's groups are
    ema: EMA | None = None         # --ema: the moving average of the weights (validated, saved as final/)
    anchor: TextAnchor | None = None  # the frozen starting text tower: anchor_drift, --anchor-weight's loss

    @property
    def device(self) -> torch.device:
        return self.info.device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def default_output(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.model).stem.replace(':', '-')}-{stamp}"


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured; under ``torchrun`` / ``srun`` with several processes, distributed.

    The process group is set up here (and torn down at the end) unless one is already initialised.
    A collective that fails because another process died or hangs becomes a :class:`PeerFailure`
    naming the likely cause, so no process waits forever."""
    cfg.validate()  # a bad number is one line, before any process group or run folder exists
    info = distributed.init_distributed(cfg.device, cfg.dist_timeout)
    try:
        result = _train(cfg, info)
    except Exception as error:
        if info.enabled and not isinstance(error, TrainingError) and distributed.is_collective_failure(error):
            raise PeerFailure(
                f"rank {info.rank} of {info.world_size}: a collective operation failed, most likely because "
                f"another process died, was killed or hangs (see its log; a hung peer is given up on after "
                f"--dist-timeout {cfg.dist_timeout:g} s). This process stops too. Cause: "
                f"{type(error).__name__}: {str(error)[:500]}") from error
        raise  # (the process group is not torn down: that could wait on a dead peer)
    distributed.shutdown(info)
    return result


def _train(cfg: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    """Set up, loop, finish. A run that fails before its first checkpoint takes the run folder with
    it, if it created that folder (a folder the user had, or one holding checkpoints, stays)."""
    output = Path(distributed.broadcast_object(info, str(Path(cfg.output) if cfg.output else default_output(cfg))))
    created = info.is_main and not output.exists()
    run = None
    try:
        run = _set_up(cfg, info, output)
        _loop(run)
        return _finish(run)
    except BaseException:
        if run is not None and run.log is not None:
            run.log.close()
        if created:
            _remove_unfinished_run_folder(output)
        raise


def _set_up(cfg: TrainConfig, info: distributed.DistInfo, output: Path) -> Run:
    main = info.is_main
    # ---- the run directory, device, precision and seed
    if main:
        output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output / "config.json", cfg.to_dict())
    precision = resolve_precision(cfg.precision, info.device)
    seed_everything(cfg.seed)

    # ---- model and tokenizer; speed/memory options and parallelism applied from outside the model
    clip_model = _build_model(cfg, info.device)
    anchor = build_anchor(cfg, clip_model)  # (before DDP / FSDP2: each process keeps the copy whole)
    tokenizer = get_tokenizer(cfg.model)
    preprocess = PreprocessConfig.from_dict(clip_model.preprocess_cfg)
    if info.enabled:
        # Same initial weights on every rank (same seed above); from here on each rank draws its own
        # random numbers (patch dropout), or all ranks would drop the same patches.
        seed_everything(cfg.seed + info.rank)
        if cfg.sync_bn:
            clip_model = apply_sync_batchnorm(clip_model, info.device)
        model = apply_fsdp(clip_model, mixed_precision=precision == "amp_bf16") if cfg.fsdp \
            else apply_ddp(clip_model, info.device)
    else:
        model = clip_model
        if cfg.fsdp and main:
            print("--fsdp: a single process has nothing to shard over; training unsharded")
        if cfg.sync_bn and main:
            print("--sync-bn: a single process's batch statistics are the global batch's already")
    clip_model = unwrap(model)  # (FSDP2 shards it in place)

    # ---- data: each rank loads its slice of every global batch
    train_data = build_train_data(cfg, tokenizer, preprocess, info.rank, info.world_size)
    validation = build_validation(cfg, tokenizer, preprocess)
    total_steps = train_data.total_steps(cfg)

    # ---- loss (over the global batch), optimizer, schedule, checkpoints
    loss_fn = losses.build_loss(cfg.loss, tile_size=cfg.tile_size, rank=info.rank, world_size=info.world_size)
    # (built from the CLIP module's own names: DDP's and compile's prefixes play no part)
    param_groups = build_param_groups(clip_model, cfg)
    optimizer = build_optimizer(clip_model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps,
                                groups=optimizer_groups(clip_model, param_groups))
    scheduler = build_scheduler(optimizer, cfg.warmup, total_steps)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "amp_fp16")
    # (of the CLIP module after sharding and locking: FSDP2's DTensor shards, the trainable parameters)
    ema = EMA(clip_model, cfg.ema, cfg.ema_warmup) if cfg.ema else None
    checkpointer = Checkpointer(output / "checkpoints", model, optimizer, cfg.keep_checkpoints, info, ema=ema)
    run = Run(cfg, info, output, model, clip_model, precision, train_data, validation, total_steps, loss_fn,
              optimizer, scheduler, scaler, checkpointer, Progress(), log=None, param_groups=param_groups, ema=ema,
              anchor=anchor)
    if main:
        print(_start_banner(run))
        print(format_param_groups(param_groups))
        ema_settings = {"ema_settings": ema.settings()} if ema is not None else {}
        anchor_settings = {"anchor_settings": anchor.settings()} if anchor is not None else {}
        write_json_atomic(output / "config.json", {**cfg.to_dict(), "param_groups": _group_dicts(param_groups),
                                                   **ema_settings, **anchor_settings})
    _resume(run)
    run.log = MetricsLog(output) if main else None
    return run


def _build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The CLIP of ``--model`` on ``device``, with the loss's scale/bias, locked towers, activation
    checkpointing and compilation applied (in that order; parallelism comes after)."""
    model = create_model(cfg.model, pretrained=cfg.pretrained, patch_dropout=cfg.patch_dropout).to(device)
    if cfg.loss == "siglip" and model.logit_bias is None:
        with torch.no_grad():  # SigLIP's initialisation (Zhai et al. 2023): scale 10, bias -10
            model.logit_scale.fill_(losses.SIGLIP_INIT_LOGIT_SCALE)
        model.logit_bias = torch.nn.Parameter(torch.tensor(losses.SIGLIP_INIT_LOGIT_BIAS, device=device))
        model.config.init_logit_bias = losses.SIGLIP_INIT_LOGIT_BIAS
    lock_towers(model, cfg.lock_image, cfg.lock_text, cfg.lock_image_unlocked_groups, cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    return model


def _start_banner(run: Run) -> str:
    """What a person wants to see before the progress bar: where, what, on what, with which data."""
    cfg, info = run.cfg, run.info
    total = sum(p.numel() for p in run.clip_model.parameters())
    trainable = sum(p.numel() for p in run.clip_model.parameters() if p.requires_grad)
    locked = f", {_millions(trainable)} trainable" if trainable != total else ""
    pretrained = f" ({cfg.pretrained})" if cfg.pretrained else ""
    processes = f" x {info.world_size} processes ({'FSDP2' if is_fsdp(run.model) else 'DDP'})" \
        if info.enabled else ""
    lines = [f"run folder:  {run.output}",
             f"model:       {cfg.model}{pretrained}, {_millions(total)} parameters{locked}",
             f"device:      {info.device}{processes}",
             f"precision:   {run.precision}",
             f"data:        {run.train_data.description}; global batch {cfg.batch_size}, {run.total_steps:,} steps",
             f"validation:  {run.validation.description if run.validation is not None else 'none (no --val-data)'}"]
    if run.ema is not None:
        lines.append(f"EMA:         decay {cfg.ema:g}{' with warm-up' if cfg.ema_warmup else ''}; validation and "
                     f"final/ use the EMA weights, final_raw/ gets the trained ones")
    if run.anchor is not None and run.anchor.active:
        lines.append(f"anchor:      {cfg.anchor_weight:g} x the drift of text layer {cfg.anchor_layer} from the starting "
                     f"weights (loss_anchor)")
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"


def _resume(run: Run) -> None:
    """Load the checkpoint ``--resume`` names (a .pt file, or a sharded folder written by an FSDP2
    run on any number of processes), if there is one."""
    try:
        found = run.checkpointer.resume(run.cfg.resume)  # 'latest': the newest that can be read
    except ValueError as error:  # torch's words for an optimizer state of other groups
        if "parameter group" not in str(error):
            raise
        raise TrainingError(f"--resume: the checkpoint's optimizer has other parameter groups than this run "
                            f"({error}); resume with the --lr-image, --lr-text, --layer-decay, --param-groups "
                            f"and --lock-* options the run was started with") from error
    if found is None:
        return
    path, saved = found
    _check_resumed_groups(run, saved.get("param_groups"))
    _note_changed_ema_decay(run, saved.get("config"))
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    run.progress = Progress.from_dict(saved["progress"])
    _restore_rng(saved, run.info, run.cfg.seed, run.progress.step)
    if isinstance(run.train_data, StreamData):  # each process's readers, fast-forwarded on the first batch
        run.progress.position = run.train_data.resumed_position(run.progress.position, saved.get("stream_per_rank"),
                                                                run.info.is_main)
    if run.info.is_main:
        print(f"resumed from {path} at step {run.progress.step}")


def _note_changed_ema_decay(run: Run, saved_config: dict[str, Any] | None) -> None:
    """The EMA goes on from the checkpoint's average at the decay given now; a different one is allowed
    (to lengthen a run, say) but is said out loud."""
    before = (saved_config or {}).get("ema")
    if run.info.is_main and run.ema is not None and before is not None and before != run.cfg.ema:
        print(f"--resume: the EMA goes on at --ema {run.cfg.ema:g}, not the {before:g} the checkpoint's run used")


def _save(run: Run) -> Path:
    """Collective: a checkpoint of the run as it is now."""
    info = run.info
    rngs = distributed.gather_objects(info, rng_state())  # every rank's, on rank 0
    trainer = {"scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
               "rng": rngs[0] if info.is_main else None, "rng_per_rank": rngs, "progress": run.progress.to_dict(),
               "config": run.cfg.to_dict(), "world_size": info.world_size,
               "param_groups": _group_dicts(run.param_groups)}
    if isinstance(run.train_data, StreamData):
        trainer["stream_per_rank"] = distributed.gather_objects(info, run.train_data.stream_state(run.progress.position))
    return run.checkpointer.save(run.progress.step, trainer)


def _group_dicts(groups: list[ParamGroup]) -> list[dict[str, Any]]:
    return [group.to_dict() for group in groups]


def _check_resumed_groups(run: Run, saved: list[dict[str, Any]] | None) -> None:
    """The checkpoint's parameter groups must be this run's (a checkpoint of an older ldmclip has none
    stored); the saved lrs and weight decays are the ones that go on (the optimizer state holds them)."""
    if saved is None:
        return
    shape = [(g["name"], g["tensors"], g["params"]) for g in saved]
    if shape != [(g.name, len(g.param_names), g.num_params) for g in run.param_groups]:
        raise TrainingError(f"--resume: the checkpoint was trained with other parameter groups "
                            f"({', '.join(g['name'] for g in saved)}); resume with the --lr-image, --lr-text, "
                            f"--layer-decay, --param-groups and --lock-* options the run was started with")
    if run.info.is_main and [(g["lr"], g["weight_decay"]) for g in saved] != \
            [(g.lr, g.weight_decay) for g in run.param_groups]:
        print("--resume: the learning rates and weight decays the checkpoint was trained with go on "
              "(the ones given now differ and are ignored)")


def _loop(run: Run) -> None:
    """Step until ``total_steps`` (or a signal: then save and stop), logging, validating and
    checkpointing on the way."""
    cfg, info, progress, main = run.cfg, run.info, run.progress, run.info.is_main
    bar = _progress_bar(cfg, run.total_steps, progress.step) if main else None
    image_frozen, text_frozen = frozen_towers(run.clip_model)  # (no gradient into a frozen tower's features)
    window_start, window_samples = time.perf_counter(), 0
    timer, data_warning = StepTimer(run.device, enabled=main), DataWaitWarning(cfg.workers)  # where the time goes
    with StopRequest() as stop, _closing(bar):
        run.model.train()
        batches = run.train_data.batches(progress.position, run.device)
        timer.restart()
        while progress.step < run.total_steps:
            batch = stop.next_or_none(batches)  # None: a signal came while waiting for data
            bad_data = None if batch is None else _bad_fraction_message(progress, batch, cfg)
            # Every rank takes the same decisions: stop (a signal reached any rank), fail (any rank's
            # data is bad), and the batch size (the smallest, so gathered features line up).
            stop_now, bad_anywhere, n = distributed.agree(info, stop=stop.signal is not None,
                                                          bad=bad_data is not None,
                                                          batch=0 if batch is None else batch.images.shape[0])
            if stop_now:
                if main:
                    why = f"received signal {stop.signal}" if stop.signal is not None else "another process received a signal"
                    print(f"\n{why}: saving a checkpoint at step {progress.step} and stopping")
                _save(run)
                run.interrupted = True
                return
            if bad_anywhere:
                raise TrainingError(bad_data or "another process found too much unreadable data (see its error)")
            progress.position = batch.position_after
            progress.skipped.update(batch.skipped)
            if n < 2:
                continue  # a batch with no (or one) readable sample has no contrastive signal

            timer.data_ready()
            record_trained_keys(batch.keys[:n], progress.step + 1, info.rank)
            loss = contrastive_step(run.model, run.loss_fn, batch.images[:n], batch.tokens[:n], run.precision,
                                    cfg.accum, image_frozen, text_frozen, on_forward_done=timer.forward_done,
                                    anchor=run.anchor)
            timer.backward_done()
            loss = distributed.mean_over_ranks(info, loss)  # the global loss; NaN anywhere is NaN everywhere
            if not torch.isfinite(loss):
                _skip_nonfinite_step(run.optimizer, progress, cfg)
                continue
            progress.nonfinite_in_a_row = 0
            run.scaler.unscale_(run.optimizer)
            grad_norm = clip_gradients(run.model, cfg.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            losses.clamp_logit_scale_(run.clip_model)
            if run.ema is not None:  # once per optimizer step (after all --accum micro-batches)
                run.ema.update(run.clip_model)
            timer.step_done()
            progress.step += 1
            progress.samples += n * info.world_size
            window_samples += n * info.world_size

            if main and (progress.step % cfg.log_every == 0 or progress.step == run.total_steps):
                timing = timer.window(window_samples)
                _log_train(run, bar, loss, grad_norm, window_samples / max(time.perf_counter() - window_start, 1e-9),
                           timing)
                _warn(bar, data_warning.check(timing["data_wait_fraction"]))
                window_start, window_samples = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            before_end = progress.step < run.total_steps
            if cfg.eval_every and progress.step % cfg.eval_every == 0 and before_end:
                run.val_metrics = _validate(run)
            if cfg.save_every and progress.step % cfg.save_every == 0 and before_end:
                _save(run)
            timer.restart()  # (logging, validation and checkpoints count in no phase of a step)


def _log_train(run: Run, bar, loss: torch.Tensor, grad_norm: float, samples_per_s: float,
               timing: dict[str, float]) -> None:
    values = {"loss": loss.item(), "lr": run.scheduler.get_last_lr()[0],
              "logit_scale": run.clip_model.logit_scale.exp().item(), "grad_norm": grad_norm,
              "samples_per_s": samples_per_s, "samples": run.progress.samples,
              "skipped": sum(run.progress.skipped.values()), **timing}
    if run.anchor is not None and run.anchor.active:  # (this process's batch)
        values["loss_anchor"] = run.anchor.last_loss.item()
    run.log.log(run.progress.step, "train", values)
    if bar is not None:
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                        scale=f"{values['logit_scale']:.1f}", sps=f"{values['samples_per_s']:.0f}",
                        data=f"{timing['data_wait_fraction']:.0%}", mem=_memory_text(timing))


def _memory_text(timing: dict) -> str:
    """The peak memory for the progress bar: the GPU's on CUDA, else the process's RSS."""
    mib = timing.get("peak_cuda_mib", timing.get("peak_rss_mib"))
    return "?" if mib is None else f"{mib / 1024:.1f}G"


def _warn(bar, message: str | None) -> None:
    """One line for the person watching, above the progress bar if there is one."""
    if message is not None:
        (bar.write if bar is not None else print)(message)


def _finish(run: Run) -> TrainResult:
    """The final checkpoint and validation (unless stopped by a signal), the final model, the plot
    and ``summary.json`` (files by rank 0)."""
    progress, info = run.progress, run.info
    if not run.interrupted:
        _save(run)
        run.val_metrics = _validate(run)
    final = run.output / "final"
    with _ema_weights(run):  # --ema: final/ is the EMA model, final_raw/ the trained weights
        _save_final_model(run.model, final, info.is_main)
    if run.ema is not None:
        _save_final_model(run.model, run.output / "final_raw", info.is_main)
    if info.is_main:
        run.log.close()
        plot_training_curves(run.output / "metrics.jsonl", run.output / "training_curves.png")
        summary = {"steps": progress.step, "samples": progress.samples, "skipped": dict(progress.skipped),
                   "nonfinite_steps": progress.nonfinite_steps, "validation": run.val_metrics,
                   "world_size": info.world_size, **_weights_field(run)}
        write_json_atomic(run.output / "summary.json", summary)
    distributed.barrier(info)
    return TrainResult(run.output, final, progress.step, run.val_metrics, dict(progress.skipped),
                       run.interrupted, info.rank)


def _remove_unfinished_run_folder(output: Path) -> None:
    """Remove a run folder this run created, unless a checkpoint made it worth keeping."""
    if list_checkpoints(output / "checkpoints"):
        return
    shutil.rmtree(output, ignore_errors=True)


def _restore_rng(saved: dict[str, Any], info: distributed.DistInfo, seed: int, step: int) -> None:
    """Each rank's random state as saved; when the number of processes changed, a fresh seed per
    rank (random draws such as patch dropout then differ from an uninterrupted run)."""
    per_rank = saved.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == info.world_size:
        set_rng_state(per_rank[info.rank])
    elif info.world_size == 1:
        set_rng_state(saved["rng"])
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


def _closing(bar):
    """Close the progress bar however the loop ends (None: no bar)."""
    return contextlib.closing(bar) if bar is not None else contextlib.nullcontext()


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


def _validate(run: Run) -> dict[str, float]:
    """Validation metrics; every rank computes them (FSDP2 needs every rank for a forward pass),
    rank 0 (the one with a ``log``) reports them."""
    if run.validation is None:
        return {}
    target = run.clip_model  # DDP: the replica itself, no collectives
    target.eval()
    with _ema_weights(run), autocast(run.precision, run.device):
        metrics = run.validation.evaluate(target, run.device)
        if run.anchor is not None:  # how far the layer the LDM reads has moved (0 at the start)
            metrics["anchor_drift"] = run.anchor.drift(target, run.validation.tokens, run.device)
        if is_fsdp(run.model):  # (before the raw weights are swapped back into the shards)
            run.model.reshard()
    target.train()
    if run.log is not None:
        run.log.log(run.progress.step, "val", {**metrics, **_weights_field(run)})
        shown = "  ".join(format_metric(k, v) for k, v in metrics.items() if not k.endswith("rank"))
        print(f"\nvalidation at step {run.progress.step}: {shown}")
    return metrics


def _ema_weights(run: Run):
    """With --ema, a block in which the model holds the EMA weights (every rank enters it)."""
    return run.ema.swap_into(run.clip_model) if run.ema is not None else contextlib.nullcontext()


def _weights_field(run: Run) -> dict[str, str]:
    """What metrics.jsonl and summary.json say the validation was computed with."""
    return {"weights": "ema"} if run.ema is not None else {}


def format_metric(key: str, value: float) -> str:
    """One metric as a person reads it: a percentage (metrics.jsonl keeps the fraction)."""
    return f"{key} {100 * value:.2f}%"


def format_summary(result: TrainResult) -> str:
    if result.rank != 0:
        return f"rank {result.rank}: finished {result.steps} steps (rank 0 reports the run)"
    lines = [f"finished {result.steps} steps; run folder: {result.output}",
             f"final model (OpenCLIP hub layout): {result.final_model}",
             f"  load it with ldmclip.create_model('local-dir:{result.final_model}')"]
    raw = result.final_model.with_name("final_raw")
    if raw.is_dir():
        lines[1] += " (the EMA of the weights; the trained weights are in final_raw/)"
    if result.skipped:
        lines.append("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    for key, value in result.metrics.items():
        if not math.isnan(value) and not key.endswith("rank"):
            lines.append(f"  {key:<38} {100 * value:6.2f}%")  # as format_metric, in a column
    return "\n".join(lines)
