"""A WiSE-FT sweep: evaluate the interpolation ``(1 - alpha) * A + alpha * B`` at several alphas.

Each alpha's model is built in memory (no folder is written per alpha) and scored with the same
functions ``ldmclip eval`` uses (:func:`evaluate_zero_shot`, :func:`evaluate_retrieval`), so the numbers
at alpha 0 and 1 are exactly ``ldmclip eval``'s on A and B. ``ldmclip merge --sweep`` composes this
with reading the checkpoints and writing the model at the best alpha.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import interpolate_state_dicts
from ..core.files import atomic_write
from ..models.clip import CLIP
from .evaluate import AutocastFactory, _no_autocast, evaluate_retrieval, evaluate_zero_shot
from .sources import RetrievalSource, ZeroShotSource

__all__ = ["RECALL_KEYS", "SELECT_METRICS", "sweep_interpolation", "select_alpha", "plot_sweep", "parse_alphas"]

RECALL_KEYS = tuple(f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10))
ZERO_SHOT_KEYS = ("num_images", "num_classes", "num_templates", "top1", "top5", "mean_per_class_accuracy")
RETRIEVAL_KEYS = ("num_images", "num_captions", *RECALL_KEYS, "image_to_text_mean_rank", "image_to_text_median_rank",
                  "text_to_image_mean_rank", "text_to_image_median_rank")
# --select: "mean" is the mean of zero-shot top-1 and the mean of the six recalls (whichever are measured).
SELECT_METRICS = ("mean", "top1", "top5", "mean_per_class_accuracy", "mean_recall", *RECALL_KEYS)


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> ``[0.0, 0.25, 0.5]``; each from 0 to 1, no repeats (``ValueError`` otherwise)."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"the alphas must be numbers separated by commas, e.g. 0,0.25,0.5,0.75,1; got {text!r}") from None
    if not alphas:
        raise ValueError("give at least one alpha, e.g. 0,0.25,0.5,0.75,1")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"every alpha must be from 0 (A) to 1 (B); got {', '.join(f'{a:g}' for a in bad)}")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"an alpha is given twice in {text!r}")
    return alphas


def _score(row: dict[str, Any]) -> None:
    """Add ``mean_recall`` (retrieval) and ``mean`` (the default --select metric) to one alpha's row."""
    parts = []
    if "zeroshot" in row:
        parts.append(row["zeroshot"]["top1"])
    if "retrieval" in row:
        row["mean_recall"] = sum(row["retrieval"][k] for k in RECALL_KEYS) / len(RECALL_KEYS)
        parts.append(row["mean_recall"])
    row["mean"] = sum(parts) / len(parts)


def metric_of(row: dict[str, Any], metric: str) -> float:
    """The value of a :data:`SELECT_METRICS` name in one alpha's row (``KeyError`` when not measured)."""
    if metric in ("mean", "mean_recall"):
        return row[metric]
    if metric in RECALL_KEYS:
        return row["retrieval"][metric]
    return row["zeroshot"][metric]


def sweep_interpolation(a: CLIP, b: CLIP, alphas: Sequence[float], tokenizer, *,
                        zero_shot: tuple[ZeroShotSource, Sequence[str]] | None = None,
                        retrieval: RetrievalSource | None = None, batch_size: int = 64,
                        device: str | torch.device = "cpu", workers: int = 0,
                        autocast: AutocastFactory = _no_autocast, progress: bool = True,
                        on_alpha: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per alpha: ``{"alpha", "zeroshot": {...}, "retrieval": {...}, "mean_recall", "mean"}``.

    ``zero_shot`` is ``(source, templates)``; either input may be ``None``, not both. The sources must
    already carry the image transform (A's: the merged model keeps A's preprocessing). A and B must be
    the same architecture (:func:`interpolate_state_dicts` says why not). ``on_alpha(row)`` sees each
    row as soon as it is measured (to print it)."""
    if zero_shot is None and retrieval is None:
        raise ValueError("nothing to evaluate: give a zero-shot source, a retrieval source, or both")
    device = torch.device(device)
    state_a = {k: v.detach().cpu() for k, v in a.state_dict().items()}
    state_b = {k: v.detach().cpu() for k, v in b.state_dict().items()}
    model = CLIP(a.config)  # one working copy, reloaded per alpha
    model.preprocess_cfg = dict(a.preprocess_cfg)
    model.to(device).eval()
    run = dict(batch_size=batch_size, device=device, workers=workers, autocast=autocast, progress=progress)
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state_dicts(state_a, state_b, alpha))
        row: dict[str, Any] = {"alpha": alpha}
        if zero_shot is not None:
            result = evaluate_zero_shot(model, tokenizer, zero_shot[0], zero_shot[1], **run)
            row["zeroshot"] = {k: result[k] for k in ZERO_SHOT_KEYS if k in result}
        if retrieval is not None:
            result = evaluate_retrieval(model, tokenizer, retrieval, **run)
            row["retrieval"] = {k: result[k] for k in RETRIEVAL_KEYS}
        _score(row)
        rows.append(row)
        if on_alpha is not None:
            on_alpha(row)
    return rows


def select_alpha(rows: Sequence[dict[str, Any]], metric: str = "mean") -> dict[str, Any]:
    """The row with the highest ``metric`` (the first of equal ones, in sweep order). A metric that was
    not measured (e.g. ``top1`` without zero-shot data) is a ``ValueError`` naming what was."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    try:
        return max(rows, key=lambda row: metric_of(row, metric))  # max keeps the first of ties
    except KeyError:
        measured = [m for m in SELECT_METRICS if _has(rows[0], m)]
        raise ValueError(f"--select {metric} was not measured in this sweep (zero-shot and retrieval data decide "
                         f"what is); choose one of {', '.join(measured)}") from None


def _has(row: dict[str, Any], metric: str) -> bool:
    try:
        metric_of(row, metric)
    except KeyError:
        return False
    return True


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike, best_alpha: float | None = None) -> Path:
    """A PNG of zero-shot top-1 and mean recall (those measured) against alpha, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(rows, key=lambda row: row["alpha"])
    alphas = [row["alpha"] for row in ordered]
    fig, ax = plt.subplots(figsize=(6, 4))
    if "zeroshot" in ordered[0]:
        ax.plot(alphas, [100 * row["zeroshot"]["top1"] for row in ordered], "o-", label="zero-shot top-1")
    if "retrieval" in ordered[0]:
        ax.plot(alphas, [100 * row["mean_recall"] for row in ordered], "s-", label="mean recall (6 recalls)")
    if best_alpha is not None:
        ax.axvline(best_alpha, color="grey", linestyle=":", label=f"selected alpha {best_alpha:g}")
    ax.set_xlabel("alpha (0 = A, 1 = B)")
    ax.set_ylabel("%")
    ax.set_title("WiSE-FT: accuracy against alpha")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
