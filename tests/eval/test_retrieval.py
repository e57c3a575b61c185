"""Retrieval metrics: equal to OpenCLIP's ``get_clip_metrics``, multi-caption protocol, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmclip.eval import retrieval, retrieval_metrics, retrieval_ranks


def random_features(num_images: int, captions: list[int], dim: int = 16, seed: int = 0):
    """Normalised features where each caption is near its image (so recalls are not all zero)."""
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    text_to_image = torch.tensor([i for i, n in enumerate(captions) for _ in range(n)])
    texts = F.normalize(images[text_to_image] + 1.2 * torch.randn(len(text_to_image), dim, generator=generator),
                        dim=-1)
    return images, texts, text_to_image


def reference_metrics(images, texts, text_to_image) -> dict[str, float]:
    """OpenCLIP's ``get_clip_metrics`` (open_clip_train/train.py) written out for several captions per
    image: one dense similarity matrix, ``argsort`` per query, the position of the first correct item
    (OpenCLIP's ``torch.where(ranking == ground_truth)`` with one caption per image). OpenCLIP has no
    multi-caption retrieval; this follows the Flickr/COCO protocol of LAION's CLIP_benchmark."""
    logits_per_image = images @ texts.T
    positives = text_to_image[None, :] == torch.arange(len(images))[:, None]  # [I, T]
    preds = {}
    ranking = torch.argsort(logits_per_image, dim=1, descending=True)           # [I, T] caption ids
    preds["image_to_text"] = torch.stack([torch.nonzero(positives[i][ranking[i]])[0, 0]
                                          for i in range(len(images))]).numpy()
    ranking = torch.argsort(logits_per_image.T, dim=1, descending=True)         # [T, I] image ids
    preds["text_to_image"] = torch.where(ranking == text_to_image[:, None])[1].numpy()
    metrics = {}
    for name, p in preds.items():
        metrics[f"{name}_mean_rank"] = p.mean() + 1
        metrics[f"{name}_median_rank"] = np.floor(np.median(p)) + 1
        for k in [1, 5, 10]:
            metrics[f"{name}_R@{k}"] = np.mean(p < k)
    return metrics


def assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key] == pytest.approx(float(theirs[key]), rel=1e-12, abs=1e-12), key


def test_one_caption_per_image_equals_open_clip_get_clip_metrics():
    train = pytest.importorskip("open_clip_train.train")
    images, texts, text_to_image = random_features(57, [1] * 57, seed=1)
    theirs = train.get_clip_metrics(images, texts, logit_scale=torch.tensor(37.0))
    assert_same(retrieval_metrics(images, texts, text_to_image), theirs)
    assert 0 < theirs["image_to_text_R@1"] < 1 and 0 < theirs["text_to_image_R@10"] < 1


@pytest.mark.parametrize("num_images", [2, 9, 40])
def test_several_captions_per_image_equal_the_dense_reference(num_images):
    captions = [1 + (i * 7) % 5 for i in range(num_images)]  # 1 to 5 captions per image
    images, texts, text_to_image = random_features(num_images, captions, seed=num_images)
    assert_same(retrieval_metrics(images, texts, text_to_image), reference_metrics(images, texts, text_to_image))


@pytest.mark.parametrize("image_chunk,text_chunk", [(1, 1), (3, 7), (7, 3), (40, 1), (1, 500), (16, 64), (None, None)])
def test_chunked_equals_dense_for_any_chunk_size(image_chunk, text_chunk):
    images, texts, text_to_image = random_features(40, [5] * 20 + [1, 2, 3, 4] * 5, seed=3)
    dense = retrieval_ranks(images, texts, text_to_image, image_chunk=10**6, text_chunk=10**6)
    chunked = retrieval_ranks(images, texts, text_to_image, image_chunk=image_chunk, text_chunk=text_chunk)
    assert torch.equal(dense[0], chunked[0]) and torch.equal(dense[1], chunked[1])


def test_memory_is_bounded_by_the_block_size(monkeypatch):
    """With the module's block sizes patched small, no similarity block larger than them is ever built,
    and the result is still the dense one: the same code path runs 100k × 500k in one block's memory."""
    images, texts, text_to_image = random_features(300, [5] * 300, seed=4)  # 300 images × 1,500 captions
    expected = reference_metrics(images, texts, text_to_image)
    shapes = []
    original = retrieval._block_similarities

    def spy(a, b):
        shapes.append((a.shape[0], b.shape[0]))
        return original(a, b)

    monkeypatch.setattr(retrieval, "IMAGE_CHUNK", 32)
    monkeypatch.setattr(retrieval, "TEXT_CHUNK", 128)
    monkeypatch.setattr(retrieval, "_block_similarities", spy)
    assert_same(retrieval_metrics(images, texts, text_to_image), expected)
    assert max(s[0] for s in shapes) <= 32 and max(s[1] for s in shapes) <= 128
    # ceil(300/32) × ceil(1500/128) blocks, plus the ones holding correct pairs read once more (captions
    # are grouped by image, so each caption chunk touches one or two image chunks)
    assert 10 * 12 < len(shapes) <= 10 * 12 + 2 * 12


def test_ties_count_in_the_query_favour_and_own_pairs_never_count_against_themselves():
    # Two identical images: each caption ties with the other image; rank = 1 + strictly better ones.
    images = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), dim=-1)
    text_to_image = torch.tensor([0, 1, 2, 2])
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image)
    assert text_ranks.tolist() == [1, 1, 1, 3]
    assert image_ranks.tolist() == [2, 2, 1]  # caption 3 beats images 0 and 1's captions; image 2 has caption 2


def test_median_rank_is_numpys_median_rounded_down():
    assert retrieval._median_rank(torch.tensor([1, 4])) == 2.0  # numpy: floor(2.5); torch.median: 1
    assert retrieval._median_rank(torch.tensor([3, 1, 2])) == 2.0
    assert retrieval._median_rank(torch.tensor([1, 2, 3, 6])) == 2.0


def test_bad_inputs_are_clear_errors():
    images, texts, _ = random_features(3, [1, 1, 1])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="do not exist"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(images, texts, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features must be"):
        retrieval_metrics(images, texts[:, :3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="at least one image"):
        retrieval_metrics(images[:0], texts, torch.tensor([0, 1, 2]))


def test_inside_bf16_autocast_the_numbers_are_the_fp32_ones():
    # The trainer validates inside its bf16 autocast region; the scores must stay fp32 there.
    images, texts, text_to_image = random_features(30, [1 + i % 3 for i in range(30)], seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = retrieval_metrics(images, texts, text_to_image, image_chunk=7, text_chunk=11)
    assert_same(under_autocast, retrieval_metrics(images, texts, text_to_image))
