"""Where training numbers go: ``metrics.jsonl``, TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, directory: Path, tensorboard: bool = True):
        self.directory = directory
        self.path = directory / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # tensorboard is optional; the JSON lines carry the same numbers
                self._writer = None

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        record = {"step": step, "kind": kind, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_timing(ax, records: list[dict[str, Any]]) -> None:
    """The data-wait fraction (left axis, 0 to 1) and the mean step time (right axis) per window."""
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["data_wait_fraction"] for r in records], color="tab:red", label="waiting for data")
    ax.set_ylim(0, 1)
    ax.set_ylabel("data-wait fraction", color="tab:red")
    ax.set_title("where the time goes")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    step_time = ax.twinx()
    step_time.plot(steps, [r["step_s"] for r in records], color="tab:blue", label="step time")
    step_time.set_ylabel("step time (s)", color="tab:blue")
    step_time.set_ylim(bottom=0)


_MEMORY_CURVES = (("peak_cuda_mib", "GPU (allocated)"), ("peak_rss_mib", "process (RSS)"),
                  ("workers_peak_rss_mib", "data-loader workers (RSS)"))


def _plot_memory(ax, records: list[dict]) -> None:
    """Peak memory so far per window, in GiB: the GPU's on CUDA, the process's and its workers' RSS."""
    for key, label in _MEMORY_CURVES:
        points = [(r["step"], r[key] / 1024) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set_title("peak memory")
    ax.set_ylabel("GiB")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_training_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss, learning rate, logit scale, where the time goes (data-wait fraction and step time), peak memory
    and validation metrics against step, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("logit_scale", "logit scale (1/temperature)")]
    last_val = val[-1] if val else {}  # (text fields such as "weights": "ema" are no curves)
    val_keys = [k for k, v in last_val.items() if k not in ("step", "kind") and not k.endswith("rank")
                and isinstance(v, (int, float))]
    timing = [r for r in train if "data_wait_fraction" in r]  # (runs of older ldmclip versions have none)
    count = len(panels) + (2 if timing else 0) + (1 if val_keys else 0)
    width = 4.2 * max(count, len(panels) + 1) + (2.5 if val_keys else 0)  # room for the legend on the right
    fig, axes = plt.subplots(1, count, figsize=(width, 3.4))
    for ax, (key, title) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if timing:
        _plot_timing(axes[len(panels)], timing)
        _plot_memory(axes[len(panels) + 1], timing)
    if val_keys:
        ax = axes[-1]
        for key in val_keys:
            points = [(r["step"], r[key]) for r in val if key in r]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title("validation")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
