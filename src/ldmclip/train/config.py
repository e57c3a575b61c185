"""The training configuration: one typed object, filled from defaults, a YAML/JSON file and flags.

Every field is also a command-line flag of ``ldmclip train`` (``--batch-size`` for ``batch_size``),
generated from this dataclass by ``ldmclip.cli.train`` so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.precision import PRECISIONS


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# The built-in demo's length: under 5 minutes on a 2-core CPU with start-up and validation. Steps and the
# model are what buy its accuracy; no learning-rate, warm-up or batch-size change beat the defaults at an
# equal budget (benchmarks/small_budget.py; README "Faster learning per minute").
DEFAULT_SYNTHETIC_STEPS = 1100


@dataclass
class TrainConfig:
    # what to train
    # The defaults are tuned for the built-in synthetic demo (`ldmclip train` with no options, a few
    # minutes on a 2-core CPU); real data needs its own --model, --batch-size and --lr.
    # RN-T-64, a tiny ModifiedResNet: a convolution's locality learns the demo's shapes far sooner than a
    # ViT's patches do (600 steps: 82% zero-shot against ViT-T-8-64's 44%, in 129 s against 118 s).
    model: str = _opt("RN-T-64", "model config name, JSON path, hf-hub:org/repo or local-dir:PATH")
    pretrained: str | None = _opt(None, "initial weights (file, folder, hf-hub:org/repo or an OpenCLIP pretrained tag); "
                                        "default: random init")
    # data
    data: str = _opt("synthetic", "'synthetic', a CSV/TSV/parquet file (with --images), or webdataset shards "
                                  "like 'data/{00000..00099}.tar'")
    images: str | None = _opt(None, "image root folder for a CSV/TSV/parquet --data")
    split: str | None = _opt(None, "file listing the image names to train on (e.g. flickr8k/train.txt)")
    image_column: str = _opt("image", "image-path column of a CSV/TSV/parquet --data")
    caption_column: str = _opt("caption", "caption column of a CSV/TSV/parquet --data")
    val_data: str | None = _opt(None, "validation data for retrieval recall (same forms as --data); "
                                      "default: held-out synthetic scenes when --data is synthetic")
    val_split: str | None = _opt(None, "file listing the validation image names (e.g. flickr8k/test.txt)")
    val_size: int = _opt(1000, "number of validation image–caption pairs to evaluate")
    workers: int = _opt(1, "data-loading worker processes")
    shuffle_buffer: int = _opt(2000, "shuffle buffer for webdataset shards")
    resampled: bool = _opt(True, "webdataset shards: each worker draws shards with replacement, endlessly "
                                 "(no: each epoch reads every shard once, split over processes and workers)")
    # schedule
    output: str | None = _opt(None, "run directory (default: runs/<model>-<timestamp>)")
    steps: int | None = _opt(None, f"optimizer steps to run (default {DEFAULT_SYNTHETIC_STEPS} on synthetic data; "
                                   "or use --epochs)")
    epochs: float | None = _opt(None, "passes over the data (CSV data only); converted to steps")
    batch_size: int = _opt(64, "contrastive batch size: the GLOBAL batch, over all processes and accumulation "
                               "micro-batches (each of W processes loads batch_size/W samples a step; the "
                               "loss sees all batch_size pairs)")
    accum: int = _opt(1, "split each process's batch into this many micro-batches (features are cached, so "
                         "the loss still sees the whole batch)")
    # 5e-4: at 3e-3 the synthetic demo learned colours but never shapes (zero-shot 16% vs 43% after
    # 1,000 steps; measured with a contrastive-only script too: 24% vs 72% on one-object scenes).
    lr: float = _opt(5e-4, "peak learning rate")
    wd: float = _opt(0.1, "AdamW weight decay (not applied to gains, biases, embeddings or logit_scale)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    warmup: int = _opt(100, "linear warm-up steps before the cosine decay")
    grad_clip: float | None = _opt(1.0, "clip the gradient norm to this value (0 or none to disable)")
    # loss
    loss: str = _opt("clip", "contrastive loss", choices=["clip", "siglip"])
    tile_size: int | None = _opt(None, "compute the CLIP loss in tiles of this size (exact; memory O(N·D))")
    # speed and memory
    precision: str = _opt("auto", "'auto' (bf16 autocast on CUDA and on CPUs with fast bf16, else fp32), "
                                  "'amp_bf16', 'amp_fp16' (CUDA) or 'fp32'",
                          choices=list(PRECISIONS))
    grad_checkpointing: bool = _opt(False, "recompute activations in backward (less memory, ~30% slower)")
    compile: bool = _opt(False, "torch.compile the model")
    lock_image: bool = _opt(False, "freeze the image tower (LiT)")
    lock_text: bool = _opt(False, "freeze the text tower")
    # parameter groups (train/param_groups.py): per-tower lr, layer-wise lr decay, partial unlocking
    lr_image: float | None = _opt(None, "peak learning rate of the image tower (default: --lr)")
    lr_text: float | None = _opt(None, "peak learning rate of the text tower (default: --lr)")
    layer_decay: float | None = _opt(None, "layer-wise lr decay D (e.g. 0.75; BEiT/MAE): in each tower, block k of L "
                                           "trains at lr x D^(L-k), the embeddings at lr x D^(L+1), the final "
                                           "LayerNorm and projection (and logit_scale) at lr; default: off")
    param_groups: str | None = _opt(None, "YAML or JSON file: a list of rules, the first whose pattern matches a "
                                          "parameter's name wins, e.g. [{pattern: 'visual.*', lr_scale: 0.1}, "
                                          "{regex: 'resblocks\\.(0|1)\\.', lr: 1e-5, wd: 0}]. 'pattern' is a glob "
                                          "over names such as visual.transformer.resblocks.0.attn.in_proj_weight, "
                                          "'regex' a Python regular expression searched in the name; 'lr' / 'wd' "
                                          "set the value outright, 'lr_scale' multiplies the tower's lr (after "
                                          "--layer-decay), 'wd_scale' multiplies --wd (gains, biases, embeddings "
                                          "and logit_scale never decay)")
    lock_image_unlocked_groups: int = _opt(0, "with --lock-image (implied when above 0): leave the last N groups "
                                              "of the image tower trainable, as OpenCLIP's option of that name "
                                              "(ViT groups, last first: the projection, the last block with "
                                              "ln_post, each block before it, the embeddings)")
    lock_text_unlocked_layers: int = _opt(0, "with --lock-text (implied when above 0): leave the last N groups of "
                                             "the text tower trainable, as OpenCLIP's option of that name (last "
                                             "first: text_projection, the last block with ln_final, each block "
                                             "before it, the embeddings)")
    # exponential moving average of the weights (train/ema.py)
    ema: float | None = _opt(None, "keep an exponential moving average (EMA) of the weights with this decay, e.g. "
                                   "0.9999 (0.999 for runs of a few thousand steps), updated after every "
                                   "optimizer step and checkpointed; validation then uses the EMA weights, "
                                   "final/ holds the EMA model and final_raw/ the trained weights; default: off")
    ema_warmup: bool = _opt(True, "with --ema: decay min(D, (1+n)/(10+n)) at update n (TensorFlow's and "
                                  "latent-diffusion's warm-up), so early weights fade fast; no: D from the start")
    # keep what the LDM reads (train/anchor.py): the drift of one text layer from its starting weights
    anchor_layer: str = _opt("penultimate", "text layer whose drift from the starting weights (relative L2 on the "
                                            "validation captions, 'anchor_drift' in the validation metrics) is "
                                            "reported when fine-tuning (--pretrained), and which --anchor-weight "
                                            "holds in place: 'penultimate' (SD 2.x, SDXL), 'last' (SD 1.x) or an "
                                            "index as transformers numbers "
                                            "hidden_states (0: the embeddings, -2: the penultimate block)")
    anchor_weight: float | None = _opt(None, "add W x ||h - h0||^2 / ||h0||^2 (h: a token's --anchor-layer "
                                             "hidden state, h0: that of a frozen copy of the starting text tower), "
                                             "averaged over each caption's tokens (start through end of text; "
                                             "not the padding), then over the batch, "
                                             "so a fine-tuned text encoder stays usable by a U-Net trained on the "
                                             "original ('loss_anchor' in metrics.jsonl); e.g. 1; default: off")
    patch_dropout: float = _opt(0.0, "fraction of image patches dropped during training (FLIP)")
    device: str = _opt("auto", "'auto' (cuda if available; cuda:LOCAL_RANK under torchrun/srun), 'cpu' or 'cuda[:N]'")
    # several processes (launched by torchrun or srun; see README "Training on many GPUs")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimizer state with FSDP2 (for models that do "
                             "not fit replicated; with amp_bf16, bf16 all-gathers and fp32 gradient "
                             "reduction); default under several processes: DDP")
    sync_bn: bool = _opt(False, "DDP: BatchNorm (ResNet image towers) normalises with the statistics of the "
                                "global batch (SyncBatchNorm) instead of each process's own batch (default, "
                                "as OpenCLIP's); no effect on ViTs")
    dist_timeout: float = _opt(600.0, "seconds a process waits in a collective before giving up (a dead or "
                                      "hung peer then stops the run with an error instead of a hang)")
    # bookkeeping
    seed: int = _opt(0, "random seed (the whole run is reproducible from it on CPU)")
    save_every: int = _opt(500, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "number of recent checkpoints to keep")
    eval_every: int = _opt(500, "run validation every N steps (0: only at the end)")
    log_every: int = _opt(10, "write metrics every N steps")
    resume: str | None = _opt(None, "checkpoint file to resume from, or 'latest' (newest in --out)")
    max_bad_fraction: float = _opt(0.5, "stop when more than this fraction of samples is unreadable")
    max_nonfinite_steps: int = _opt(20, "stop after this many non-finite losses in a row")
    progress: bool = _opt(True, "show a progress bar")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every number against its range before anything starts (the command line and
        :func:`ldmclip.train.train` both call this): a bad one is a one-line :class:`UserError` naming its
        flag, instead of a ``ZeroDivisionError`` or ``length must be >= 0, got -320`` from deep inside."""
        for name, spec in _RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{_flag(name)} must be a number, got {value!r}")
            if not _in_range(value, spec):
                raise UserError(f"{_flag(name)} must be {_range_text(spec)}, got {value:g}{_HINTS.get(name, '')}")
        parse_anchor_layer(self.anchor_layer)
        if self.sync_bn and self.fsdp:
            raise UserError("--sync-bn is for DDP; under --fsdp BatchNorm normalises with each process's own "
                            "batch statistics (drop one of the two flags)")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Field values from a YAML or JSON file (unknown keys are an error)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise UserError(f"{path} must hold a mapping of option names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        if "out" in values and "output" not in values:  # `out:` as the flag is spelled (--out)
            values["output"] = values.pop("out")
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown option(s) in {path}: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return values


# name -> (low, high) bounds as text: "[1," is at least 1, "(0," more than 0, "[0, 1)" from 0 up to but not
# including 1. Zero is allowed where it means "off" (--save-every 0, --grad-clip 0, --warmup 0, --workers 0).
_RANGES: dict[str, str] = {
    "batch_size": "[1,", "accum": "[1,", "steps": "[1,", "epochs": "(0,", "val_size": "[1,", "workers": "[0,",
    "shuffle_buffer": "[0,", "lr": "[0,", "wd": "[0,", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "[0,",
    "warmup": "[0,", "grad_clip": "[0,", "tile_size": "[1,", "patch_dropout": "[0, 1)", "dist_timeout": "(0,",
    "save_every": "[0,", "keep_checkpoints": "[0,", "eval_every": "[0,", "log_every": "[1,",
    "max_bad_fraction": "[0, 1]", "max_nonfinite_steps": "[1,",
    "lr_image": "[0,", "lr_text": "[0,", "layer_decay": "(0, 1]", "lock_image_unlocked_groups": "[0,",
    "lock_text_unlocked_layers": "[0,", "ema": "(0, 1)", "anchor_weight": "[0,",
}
_OPTIONAL = frozenset({"steps", "epochs", "grad_clip", "tile_size", "lr_image", "lr_text", "layer_decay",
                       "ema", "anchor_weight"})  # None: default / off
_HINTS = {"steps": " (leave it out for the default)", "epochs": " (leave it out to give --steps instead)"}


def parse_anchor_layer(value: str | int) -> str | int:
    """``--anchor-layer`` as :func:`ldmclip.models.text.hidden_state_index` takes it: 'last', 'penultimate' or
    an int (the flag's text '-2' or a config file's -2); whether the layer exists is checked against the model."""
    if isinstance(value, bool):
        raise UserError(f"--anchor-layer must be 'penultimate', 'last' or a layer index, got {value!r}")
    if isinstance(value, int) or value in ("last", "penultimate"):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise UserError(f"--anchor-layer must be 'penultimate', 'last' or a layer index such as -2, "
                        f"got {value!r}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _in_range(value: float, spec: str) -> bool:
    low, high = (part.strip() for part in spec.split(","))
    low_ok = value >= float(low[1:]) if low[0] == "[" else value > float(low[1:])
    if not high:
        return low_ok
    return low_ok and (value <= float(high[:-1]) if high[-1] == "]" else value < float(high[:-1]))


def _range_text(spec: str) -> str:
    low, high = (part.strip() for part in spec.split(","))
    if not high:
        return f"at least {low[1:]}" if low[0] == "[" else f"more than {low[1:]}"
    if low[0] == "(":  # an open lower end cannot read "from": 0 is not allowed in (0, 1]
        return f"more than {low[1:]} and " + (f"at most {high[:-1]}" if high[-1] == "]" else f"less than {high[:-1]}")
    return f"from {low[1:]} to {high[:-1]}" + ("" if high[-1] == "]" else f" (less than {high[:-1]})")
