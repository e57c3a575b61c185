"""Image↔text retrieval metrics with several captions per image, in bounded memory.

Protocol (the Flickr/COCO one, as LAION's CLIP_benchmark computes it in
``clip_benchmark/metrics/zeroshot_retrieval.py``): every caption belongs to one image.

* text→image: a caption is retrieved at k when its image is among the k images most similar to it;
* image→text: an image is retrieved at k when *any* of its captions is among the k captions most
  similar to it, so its rank is the best rank of its captions.

Mean and median rank follow OpenCLIP's ``open_clip_train.train.get_clip_metrics`` (rank 1 = first;
the median is ``floor(numpy.median)``, i.e. the mean of the two middle ranks rounded down). With one
caption per image the numbers equal ``get_clip_metrics``'s on the same features (barring exact ties,
below). That function only knows one caption per image: run on a Flickr-style table (one row per
caption) the same image appears five times, and image→text counts only the caption of the same row
as correct, so its image→text recall is lower than this protocol's.

Ties: a candidate exactly as similar as the correct one does not count against the query (rank = 1 +
number of strictly more similar candidates). OpenCLIP's ``argsort`` (not a stable sort) orders tied
candidates arbitrarily, so where exact ties occur (identical captions of different images: Flickr8k's
test split has a few) its ranks can be higher by the number of ties; recall@k differs only if a tie
straddles rank k.

Memory: similarities are computed in ``[image_chunk, text_chunk]`` blocks; each block serves both
directions (a count of more-similar candidates per image and per caption), so nothing of size
``images × captions`` is ever held, and 100k images × 500k captions run in the memory of the features
plus one block. The blocks that hold correct pairs are computed twice (once to read the correct
pairs' scores); with captions grouped by image that is a thin band, a few percent of the work.
"""

from __future__ import annotations

import torch

__all__ = ["retrieval_metrics", "retrieval_ranks", "IMAGE_CHUNK", "TEXT_CHUNK"]

# Block size: 2048 × 8192 float32 similarities (64 MiB) plus two boolean masks of the same shape.
IMAGE_CHUNK = 2048
TEXT_CHUNK = 8192


def _block_similarities(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """One ``[images, texts]`` block of similarities (a separate function so tests can watch the
    block sizes)."""
    # fp32 even inside an autocast region (the trainer validates under bf16 autocast): the scores are
    # compared for exact ties and stored into fp32 tensors.
    with torch.autocast(images.device.type, enabled=False):
        return images @ texts.T


@torch.inference_mode()
def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    image_chunk: int | None = None, text_chunk: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_ranks [I], text_ranks [T])``, 1-based: for each image the best rank of its captions among
    all captions, for each caption the rank of its image among all images.

    ``image_features`` [I, D] and ``text_features`` [T, D] should be normalised (cosine similarity);
    ``text_to_image[t]`` is the index of the image caption ``t`` describes. Every image needs at least one
    caption. Computed in blocks of ``image_chunk × text_chunk`` (module defaults when ``None``).
    """
    image_chunk = image_chunk or IMAGE_CHUNK
    text_chunk = text_chunk or TEXT_CHUNK
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"features must be [images, dim] and [texts, dim], got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    device = image_features.device
    images = image_features.float()
    texts = text_features.float().to(device)
    text_to_image = torch.as_tensor(text_to_image, device=device).long()
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have one entry per caption ({num_texts}), got "
                         f"{tuple(text_to_image.shape)}")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError("text_to_image refers to images that do not exist")
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = (captions_per_image == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{int((captions_per_image == 0).sum())} image(s) have no caption (e.g. {missing})")

    # Each caption's similarity to its own image, taken from the very block products the counts below
    # compare against (a separately computed dot product can differ in the last bit, which would turn a
    # tie into a win or a loss). Only blocks that hold own pairs are needed: with captions grouped by
    # image, a thin band along the diagonal.
    own_score = torch.empty(num_texts, device=device)
    for t0 in range(0, num_texts, text_chunk):
        t1 = min(t0 + text_chunk, num_texts)
        owners = text_to_image[t0:t1]
        for i0 in (torch.unique(owners // image_chunk) * image_chunk).tolist():
            i1 = min(i0 + image_chunk, num_images)
            inside = ((owners >= i0) & (owners < i1)).nonzero().flatten()
            sims = _block_similarities(images[i0:i1], texts[t0:t1])
            own_score[t0 + inside] = sims[owners[inside] - i0, inside]
    # Each image's best similarity to its own captions: the score a competing caption must beat.
    best_own = torch.full((num_images,), float("-inf"), device=device)
    best_own.scatter_reduce_(0, text_to_image, own_score, reduce="amax")

    image_beaten_by = torch.zeros(num_images, dtype=torch.long, device=device)  # captions above the best own
    text_beaten_by = torch.zeros(num_texts, dtype=torch.long, device=device)    # images above the own image
    for i0 in range(0, num_images, image_chunk):
        i1 = min(i0 + image_chunk, num_images)
        image_ids = torch.arange(i0, i1, device=device)
        for t0 in range(0, num_texts, text_chunk):
            t1 = min(t0 + text_chunk, num_texts)
            sims = _block_similarities(images[i0:i1], texts[t0:t1])                 # [ci, ct]
            own = text_to_image[None, t0:t1] == image_ids[:, None]                    # [ci, ct]
            image_beaten_by[i0:i1] += ((sims > best_own[i0:i1, None]) & ~own).sum(dim=1)
            text_beaten_by[t0:t1] += ((sims > own_score[None, t0:t1]) & ~own).sum(dim=0)
    return image_beaten_by + 1, text_beaten_by + 1


def _median_rank(ranks: torch.Tensor) -> float:
    # floor(numpy.median(ranks)), as get_clip_metrics reports it (torch.median would take the lower middle).
    ordered = ranks.sort().values
    n = ordered.numel()
    middle = ordered[(n - 1) // 2: n // 2 + 1]
    return float(int(middle.sum().item()) // middle.numel())


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), image_chunk: int | None = None,
                      text_chunk: int | None = None) -> dict[str, float]:
    """Recall@k both ways (fractions), plus mean and median rank, under the multi-caption protocol of the
    module docs. Keys: ``image_to_text_R@1``, ..., ``image_to_text_mean_rank``,
    ``image_to_text_median_rank``, and the same for ``text_to_image`` (OpenCLIP's key names)."""
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image,
                                              image_chunk=image_chunk, text_chunk=text_chunk)
    metrics: dict[str, float] = {}
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            metrics[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.double().mean().item()
        metrics[f"{name}_median_rank"] = _median_rank(ranks)
    return metrics
