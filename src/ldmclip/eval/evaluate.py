"""Run a model over evaluation data: zero-shot classification and retrieval end to end.

The functions here own the loops (DataLoader, mixed precision, progress bars, bad-sample counts); the
maths is in ``zeroshot`` and ``retrieval``. Each returns a JSON-friendly dict of results.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..data.samples import SampleStats, make_dataloader
from .retrieval import retrieval_metrics
from .sources import REASON_BAD_LABEL, RetrievalSource, ZeroShotSource
from .zeroshot import (CONFUSION_MATRIX_MAX_CLASSES, NoImagesError, build_zero_shot_classifier,
                       classification_metrics, confusion_matrix, plot_confusion_matrix, zero_shot_logits)

__all__ = ["evaluate_zero_shot", "evaluate_retrieval", "REASON_NO_TOKENS"]

REASON_NO_TOKENS = "caption_without_tokens"  # a caption that tokenizes to nothing (e.g. only control characters)
REASON_NO_USABLE_CAPTION = "no_usable_caption"  # an image read fine whose every caption tokenized to nothing
AutocastFactory = Callable[[], contextlib.AbstractContextManager]


def _no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _loader(dataset, tokenizer, batch_size: int, workers: int, shards: int, device: torch.device):
    if shards:
        workers = min(workers, shards)  # a worker without a shard would sit idle (and warn)
    return make_dataloader(dataset, tokenizer, batch_size, num_workers=workers, persistent_workers=False,
                           pin_memory=device.type == "cuda")


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal, silence in logs and tests
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)


def _empty_token_rows(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Rows that hold nothing between start- and end-of-text (CLIP tokenizers put EOT right after SOT)."""
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None or tokens.shape[1] < 2:
        return torch.zeros(tokens.shape[0], dtype=torch.bool)
    return tokens[:, 1] == eot


def _rename(counts: Counter, renames: dict[str, str]) -> dict[str, int]:
    return dict(sorted(Counter({renames.get(k, k): v for k, v in counts.items()}).items()))


def _skips(stats: SampleStats, renames: dict[str, str] | None = None) -> dict:
    out = stats.as_dict()
    out["reasons"] = _rename(stats.counts, renames or {})
    return out


@torch.inference_mode()
def evaluate_zero_shot(model, tokenizer, source: ZeroShotSource, templates: Sequence[str], *,
                       batch_size: int = 64, device: str | torch.device = "cpu", workers: int = 0,
                       autocast: AutocastFactory = _no_autocast, confusion_png: str | Path | None = None,
                       progress: bool = True) -> dict:
    """Top-1/top-5/mean per-class accuracy of the zero-shot classifier on ``source``; ``predictions`` and
    ``labels`` (tensors) are included under ``"_tensors"`` for callers that compare them.

    When the classes are the data's own (``source.classes_from_data``), a class none of whose images
    could be read is left out (its images are counted under ``"skipped"`` by reason) and named under
    ``"excluded_classes"``; ``num_classes``, the predictions and labels then cover the other classes
    (``_tensors["classifier"]`` keeps every class). No readable image at all is a ``NoImagesError``."""
    device = torch.device(device)
    started = time.perf_counter()
    classifier = build_zero_shot_classifier(model, tokenizer, source.classnames, templates, batch_size=batch_size,
                                            device=device, autocast=autocast, progress=progress)
    num_classes = len(source.classnames)
    stats = SampleStats().update(source.stats)
    loader = _loader(source.dataset, None, batch_size, workers, source.shards, device)
    bar = _progress(source.size, "zero-shot", progress)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            stats.update(batch)
            bar.update(len(batch) + sum(batch.skipped.values()))
            labels, keep = [], []
            for i, text in enumerate(batch.captions):  # the label travels as the caption string
                label = int(text) if text.isascii() and text.isdigit() else -1
                if 0 <= label < num_classes:
                    labels.append(label)
                    keep.append(i)
                else:
                    stats.counts[REASON_BAD_LABEL] += 1
            if keep:
                images = batch.images if len(keep) == len(batch) else batch.images[keep]
                yield images, torch.tensor(labels)

    try:
        logits, labels = zero_shot_logits(model, classifier, batches(), device=device, autocast=autocast)
    except NoImagesError:
        raise NoImagesError(f"{source.description}: no readable image, so no class can be scored "
                            f"({stats.summary()})") from None
    finally:
        bar.close()
    classnames, excluded = list(source.classnames), []
    if source.classes_from_data:
        logits, labels, classnames, excluded = _drop_classes_without_images(logits, labels, classnames)
    num_classes = len(classnames)
    top = logits.topk(min(5, num_classes), dim=1).indices
    metrics = classification_metrics(top, labels, num_classes)
    matrix = confusion_matrix(top[:, 0], labels, num_classes)
    result = {
        "data": source.description,
        "num_classes": num_classes,
        "num_templates": len(templates),
        **{k: metrics[k] for k in ("num_images", "top1", "top5", "mean_per_class_accuracy") if k in metrics},
        "per_class_accuracy": dict(zip(_unique_names(classnames), metrics["per_class_accuracy"])),
        "skipped": _skips(stats, {"missing_caption": "missing_label", "empty_caption": "missing_label",
                                  "bad_caption_encoding": REASON_BAD_LABEL}),
    }
    if excluded:
        result["excluded_classes"] = {"count": len(excluded), "reason": "no readable image", "names": excluded}
    if num_classes <= CONFUSION_MATRIX_MAX_CLASSES:
        result["confusion_matrix"] = matrix.tolist()
        if confusion_png is not None:
            result["confusion_matrix_png"] = str(plot_confusion_matrix(matrix, classnames, confusion_png))
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["_tensors"] = {"predictions": top, "labels": labels, "classifier": classifier}
    return result


def _drop_classes_without_images(logits: torch.Tensor, labels: torch.Tensor, classnames: list[str]
                                 ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Leave out the classes no image of which could be read: they have files (an empty class folder is
    refused when the data is opened), but scoring them would let them take predictions from the others
    and change every number. Returns the logits, labels and names of the other classes, and the names
    left out."""
    has_images = torch.bincount(labels, minlength=len(classnames)) > 0
    if has_images.all():
        return logits, labels, classnames, []
    new_label = torch.cumsum(has_images.long(), 0) - 1  # old class index -> index among the kept ones
    kept = [name for name, keep in zip(classnames, has_images.tolist()) if keep]
    excluded = [name for name, keep in zip(classnames, has_images.tolist()) if not keep]
    return logits[:, has_images], new_label[labels], kept, excluded


def _unique_names(names: Sequence[str]) -> list[str]:
    """JSON object keys must be unique; ImageNet's curated names repeat two ('missile', 'sunglasses')."""
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _encode_texts(model, tokenizer, captions: Sequence[str], batch_size: int, device: torch.device,
                  autocast: AutocastFactory, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [T', D], kept [T] bool)``: captions that tokenize to nothing are left out."""
    features, kept = [], []
    bar = _progress(len(captions), "captions", progress, unit="caption")
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(list(captions[start:start + batch_size]))
        empty = _empty_token_rows(tokens, tokenizer)
        kept.append(~empty)
        if not empty.all():
            with autocast():
                features.append(model.encode_text(tokens[~empty].to(device), normalize=True).float())
        bar.update(len(tokens))
    bar.close()
    kept_mask = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool)
    dim = features[0].shape[1] if features else 0
    return (torch.cat(features) if features else torch.zeros(0, dim, device=device)), kept_mask


@torch.inference_mode()
def evaluate_retrieval(model, tokenizer, source: RetrievalSource, *, batch_size: int = 64,
                       device: str | torch.device = "cpu", workers: int = 0,
                       autocast: AutocastFactory = _no_autocast, progress: bool = True,
                       image_chunk: int | None = None, text_chunk: int | None = None) -> dict:
    """Image↔text recall@1/5/10 and mean/median rank on ``source`` (multi-caption protocol, see
    ``ldmclip.eval.retrieval``). Features are under ``"_tensors"``."""
    device = torch.device(device)
    started = time.perf_counter()
    stats = SampleStats()        # per image (tables) or per image–caption pair (shards)
    caption_skips: Counter = Counter(source.caption_skips)  # tables: rows left out, and captions of read images
    multiline = Counter()  # one-caption shards whose caption holds a line break (see _encode_pairs)
    if source.pairs is not None and source.lines_are_captions:
        image_features, text_features, text_to_image = _encode_caption_lines(
            model, tokenizer, source, batch_size, device, workers, autocast, progress, stats, caption_skips)
    elif source.pairs is not None:
        image_features, text_features, text_to_image = _encode_pairs(
            model, tokenizer, source, batch_size, device, workers, autocast, progress, stats, multiline)
    else:
        image_features, text_features, text_to_image = _encode_table(
            model, tokenizer, source, batch_size, device, workers, autocast, progress, stats, caption_skips)
    if image_features.shape[0] < 2:
        raise ValueError(f"{source.description}: fewer than two usable images ({stats.summary()})")
    metrics = retrieval_metrics(image_features, text_features, text_to_image,
                                image_chunk=image_chunk, text_chunk=text_chunk)
    result = {
        "data": source.description,
        "num_images": int(image_features.shape[0]),
        "num_captions": int(text_features.shape[0]),
        **metrics,
        "skipped": _skips(stats),
        **({"captions_skipped": dict(sorted(caption_skips.items()))} if caption_skips else {}),
        **({"multiline_captions": multiline["captions"]} if multiline else {}),
        "seconds": round(time.perf_counter() - started, 3),
        "_tensors": {"image_features": image_features, "text_features": text_features,
                     "text_to_image": text_to_image},
    }
    return result


def _encode_table(model, tokenizer, source: RetrievalSource, batch_size, device, workers, autocast, progress,
                  stats: SampleStats, caption_skips: Counter):
    """Unique images once each, then the captions of the images that could be read."""
    loader = _loader(source.images, None, batch_size, workers, 0, device)
    index = {path: i for i, path in enumerate(source.images.paths)}
    good: list[int] = []
    features = _encode_images(model, loader, source, device, autocast, progress, stats,
                              lambda batch: good.extend(index[key] for key in batch.keys))
    return _encode_captions_of(model, tokenizer, features, [source.captions[i] for i in good],
                               batch_size, device, autocast, progress, stats, caption_skips)


def _encode_images(model, loader, source: RetrievalSource, device, autocast, progress, stats: SampleStats,
                   on_batch) -> torch.Tensor:
    """The unit image features of every readable image of ``loader``; ``on_batch(batch)`` sees each
    non-empty batch (to note which images, and which captions, the rows are)."""
    features = []
    bar = _progress(source.size, "images", progress)
    for batch in loader:
        stats.update(batch)
        bar.update(len(batch) + sum(batch.skipped.values()))
        if len(batch):
            with autocast():
                features.append(model.encode_image(batch.images.to(device), normalize=True).float())
            on_batch(batch)
    bar.close()
    if not features:
        raise ValueError(f"{source.description}: no readable image ({stats.summary()})")
    return torch.cat(features)


def _encode_captions_of(model, tokenizer, image_features: torch.Tensor, captions_of: list[list[str]], batch_size,
                        device, autocast, progress, stats: SampleStats, caption_skips: Counter):
    """The captions of the images read (``captions_of[i]``: those of image ``i``), encoded; an image none
    of whose captions has tokens is dropped. Returns image features, text features, text_to_image."""
    captions, owner = [], []
    for row, image_captions in enumerate(captions_of):
        captions += image_captions
        owner += [row] * len(image_captions)
    text_features, kept = _encode_texts(model, tokenizer, captions, batch_size, device, autocast, progress)
    if not kept.all():
        caption_skips[REASON_NO_TOKENS] += int((~kept).sum())
    text_to_image = torch.tensor(owner, dtype=torch.long)[kept]
    # An image whose every caption tokenized to nothing cannot be retrieved by text: drop it.
    has_caption = torch.bincount(text_to_image, minlength=len(captions_of)) > 0
    if not has_caption.all():
        # already counted as seen (and good): a count here turns them into skipped ones
        stats.counts[REASON_NO_USABLE_CAPTION] += int((~has_caption).sum())
        new_index = torch.cumsum(has_caption.long(), 0) - 1
        image_features, text_to_image = image_features[has_caption.to(image_features.device)], new_index[text_to_image]
    return image_features, text_features, text_to_image.to(image_features.device)


def _encode_caption_lines(model, tokenizer, source: RetrievalSource, batch_size, device, workers, autocast,
                          progress, stats: SampleStats, caption_skips: Counter):
    """One image per sample and each line of its text one caption of it (CLIP_benchmark's retrieval
    shards, split as its reader does: ``str.splitlines``)."""
    loader = _loader(source.pairs, None, batch_size, workers, source.shards, device)
    captions_of: list[list[str]] = []
    features = _encode_images(model, loader, source, device, autocast, progress, stats,
                              lambda batch: captions_of.extend(text.splitlines() for text in batch.captions))
    return _encode_captions_of(model, tokenizer, features, captions_of, batch_size, device, autocast,
                               progress, stats, caption_skips)


def _encode_pairs(model, tokenizer, source: RetrievalSource, batch_size, device, workers, autocast, progress,
                  stats: SampleStats, multiline: Counter):
    """One image and one caption per sample (webdataset shards). Captions holding a line break are
    counted in ``multiline``: CLIP_benchmark's retrieval shards (several captions per image, one per
    line) read this way give one long caption per image and inflated recall."""
    loader = _loader(source.pairs, tokenizer, batch_size, workers, source.shards, device)
    image_features, text_features = [], []
    bar = _progress(source.size, "pairs", progress)
    for batch in loader:
        stats.update(batch)
        bar.update(len(batch) + sum(batch.skipped.values()))
        if not len(batch):
            continue
        multiline["captions"] += sum("\n" in text or "\r" in text for text in batch.captions)
        keep = ~_empty_token_rows(batch.tokens, tokenizer)
        if not keep.all():
            stats.counts[REASON_NO_TOKENS] += int((~keep).sum())
        if keep.any():
            with autocast():
                image_features.append(model.encode_image(batch.images[keep].to(device), normalize=True).float())
                text_features.append(model.encode_text(batch.tokens[keep].to(device), normalize=True).float())
    bar.close()
    if not image_features:
        raise ValueError(f"{source.description}: no readable image–caption pair ({stats.summary()})")
    images, texts = torch.cat(image_features), torch.cat(text_features)
    return images, texts, torch.arange(images.shape[0], device=images.device)
