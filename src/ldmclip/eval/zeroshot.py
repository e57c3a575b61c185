"""Zero-shot classification: a linear classifier made of text embeddings of prompts.

The classifier is OpenCLIP's ``build_zero_shot_classifier``: per class, the normalised text embeddings
of every template filled with the class name are averaged and renormalised (Radford et al. 2021,
sec. 3.1.4). An image is assigned the classes with the largest ``image_features @ classifier``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import UserError

__all__ = ["NoImagesError", "build_zero_shot_classifier", "zero_shot_logits", "zero_shot_predictions", "classification_metrics",
           "confusion_matrix", "plot_confusion_matrix", "zero_shot_accuracy", "CONFUSION_MATRIX_MAX_CLASSES"]

CONFUSION_MATRIX_MAX_CLASSES = 50  # beyond this the labels of a PNG are unreadable


class NoImagesError(UserError):
    """The batches held no image at all (every sample was unreadable, or the data is empty): no class can
    be scored, so the evaluation stops (a ``UserError``: one line, naming the data)."""


def _check_classnames(tokenizer, classnames: Sequence[str]) -> None:
    blank = [i for i, name in enumerate(classnames) if not str(name).strip()]
    if blank:
        raise ValueError(f"class name {blank[0]} is blank ({len(blank)} blank names)")
    encode = getattr(tokenizer, "encode", None)  # without it (a foreign tokenizer) the check is skipped
    if encode is not None:
        empty = [name for name in classnames if not encode(name)]
        if empty:
            raise ValueError(f"{len(empty)} class name(s) tokenize to nothing, e.g. {empty[0]!r}; "
                             "every prompt for them would be the same empty text")


@torch.inference_mode()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str],
                               templates: Sequence[str | Callable[[str], str]],
                               num_classes_per_batch: int | None = 10, device: str | torch.device = "cpu",
                               use_tqdm: bool = False, *, batch_size: int | None = None,
                               autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                               progress: bool = False) -> torch.Tensor:
    """``[embed_dim, num_classes]`` float32 weights: per class, the mean of the normalised text embeddings
    of every template filled with the class name, renormalised.

    The positional signature is OpenCLIP's (``num_classes_per_batch`` classes' prompts per text batch,
    ``None``: all at once; ``use_tqdm`` a progress bar). ``batch_size`` sets the prompts per batch
    instead (``ldmclip eval``'s); the batching changes no value beyond float rounding. ``templates`` are
    ``str.format`` strings with one ``{}`` or callables; ``autocast`` is a context factory the text tower
    runs in (mixed precision)."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    _check_classnames(tokenizer, classnames)
    if batch_size is None:
        batch_size = (num_classes_per_batch or len(classnames)) * len(templates)
    prompts = [t(name) if callable(t) else t.format(name) for name in classnames for t in templates]
    starts = range(0, len(prompts), batch_size)
    if progress or use_tqdm:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="class prompts", unit="batch", disable=None)
    embeddings = []
    for start in starts:
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        with autocast() if autocast else contextlib.nullcontext():
            embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_prompt = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


@torch.inference_mode()
def zero_shot_logits(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: str | torch.device = "cpu",
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C] float32 on the CPU, labels [N])`` over ``(images, labels)`` batches: every class's
    score is kept, so classes can still be left out once the whole pass has shown which have images."""
    all_logits, all_labels = [], []
    for images, labels in batches:
        if len(labels) == 0:
            continue
        with autocast() if autocast else contextlib.nullcontext():
            features = model.encode_image(images.to(device), normalize=True)
        all_logits.append((features.float() @ classifier.to(device)).cpu())
        all_labels.append(torch.as_tensor(labels).cpu())
    if not all_logits:
        raise NoImagesError("zero-shot evaluation got no images")
    return torch.cat(all_logits), torch.cat(all_labels).long()


@torch.inference_mode()
def zero_shot_predictions(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          device: str | torch.device = "cpu", k: int = 5,
                          autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-k class indices [N, min(k, C)], labels [N])`` over ``(images, labels)`` batches, best first."""
    k = min(k, classifier.shape[1])
    predictions, all_labels = [], []
    for images, labels in batches:
        if len(labels) == 0:
            continue
        with autocast() if autocast else contextlib.nullcontext():
            features = model.encode_image(images.to(device), normalize=True)
        logits = features.float() @ classifier.to(device)
        predictions.append(logits.topk(k, dim=1).indices.cpu())
        all_labels.append(torch.as_tensor(labels).cpu())
    if not predictions:
        raise NoImagesError("zero-shot evaluation got no images")
    return torch.cat(predictions), torch.cat(all_labels).long()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class (top-1)."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(top_predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (fractions; a k is left out when there are no more than k classes, where it would
    be 1.0 by construction), mean per-class accuracy (the mean of the top-1 recall of the classes that
    have images) and per-class top-1 accuracy (``None`` for classes without images)."""
    labels = labels.long()
    out: dict = {"num_images": int(labels.numel())}
    for k in ks:
        if k == 1 or k < num_classes:
            if k > top_predictions.shape[1]:
                raise ValueError(f"top-{k} needs {k} predictions per image, got {top_predictions.shape[1]}")
            out[f"top{k}"] = (top_predictions[:, :k] == labels[:, None]).any(dim=1).double().mean().item()
    correct = (top_predictions[:, 0] == labels).long()
    per_class_total = torch.bincount(labels, minlength=num_classes)
    per_class_correct = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    present = per_class_total > 0
    recall = per_class_correct[present] / per_class_total[present]
    out["mean_per_class_accuracy"] = recall.mean().item()
    out["per_class_accuracy"] = [(per_class_correct[c] / per_class_total[c]).item() if present[c] else None
                                 for c in range(num_classes)]
    return out


def plot_confusion_matrix(matrix: torch.Tensor, classnames: Sequence[str], path: str | os.PathLike,
                          title: str = "zero-shot confusion matrix") -> Path:
    """Write a PNG of the row-normalised confusion matrix (counts written in the cells for small ones);
    written to a temporary name and renamed, so a reader never sees half a file."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe in DataLoader-free CLI runs
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(classnames)
    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), [str(c) for c in classnames], rotation=90, fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in classnames], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def zero_shot_accuracy(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: str | torch.device = "cpu", topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (fractions) of ``classifier`` over ``(images, labels)`` batches; k is capped at the
    number of classes (the trainer's validation uses this)."""
    top, labels = zero_shot_predictions(model, classifier, batches, device=device, k=max(topk))
    return {f"top{k}": (top[:, :k] == labels[:, None]).any(dim=1).double().mean().item() for k in topk}
