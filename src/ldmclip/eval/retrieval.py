"""Image↔text retrieval recall with several captions per image (the Flickr/COCO protocol)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways, plus mean and median rank (1 = first).

    ``image_features`` [I, D] and ``text_features`` [T, D] are normalised; ``text_to_image[t]`` is the
    image caption ``t`` describes. An image counts as retrieved at k when any of its captions is in
    the top k; a caption when its image is. Similarities are computed ``chunk`` rows at a time, so
    memory stays bounded for large sets.
    """
    text_to_image = text_to_image.to(image_features.device)
    num_images = image_features.shape[0]
    # text -> image: the rank of the right image among all images.
    text_ranks = []
    for start in range(0, text_features.shape[0], chunk):
        sims = text_features[start:start + chunk].float() @ image_features.float().T
        target = sims.gather(1, text_to_image[start:start + chunk, None])
        text_ranks.append((sims > target).sum(dim=1) + 1)
    text_ranks = torch.cat(text_ranks)
    # image -> text: the best rank among the image's captions.
    image_ranks = []
    for start in range(0, num_images, chunk):
        sims = image_features[start:start + chunk].float() @ text_features.float().T  # [c, T]
        own = text_to_image[None, :] == torch.arange(start, start + sims.shape[0], device=sims.device)[:, None]
        best_own = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        image_ranks.append((sims > best_own).sum(dim=1) + 1)
    image_ranks = torch.cat(image_ranks)
    metrics: dict[str, float] = {}
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            metrics[f"{name}_R@{k}"] = (ranks <= k).float().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.float().mean().item()
        metrics[f"{name}_median_rank"] = ranks.float().median().item()
    return metrics
