"""Zero-shot classification: a linear classifier made of text embeddings of prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@torch.inference_mode()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str],
                               templates: Sequence[str | Callable[[str], str]],
                               batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[embed_dim, num_classes]`` weights: per class, the mean of the normalised text embeddings of
    every template filled with the class name, renormalised (Radford et al. 2021, sec. 3.1.4)."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [t(name) if callable(t) else t.format(name) for name in classnames for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_prompt = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


@torch.inference_mode()
def zero_shot_accuracy(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: str | torch.device = "cpu", topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (fractions) of ``classifier`` over ``(images, labels)`` batches."""
    correct = {k: 0 for k in topk}
    total = 0
    for images, labels in batches:
        features = model.encode_image(images.to(device), normalize=True).float()
        logits = features @ classifier
        labels = labels.to(device)
        ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
        for k in topk:
            correct[k] += (ranked[:, :k] == labels[:, None]).any(dim=1).sum().item()
        total += labels.numel()
    if total == 0:
        raise ValueError("zero-shot evaluation got no images")
    return {f"top{k}": correct[k] / total for k in topk}
