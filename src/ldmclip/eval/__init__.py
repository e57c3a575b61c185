"""Evaluation: zero-shot classification and image–text retrieval."""

from .retrieval import retrieval_metrics
from .zeroshot import build_zero_shot_classifier, zero_shot_accuracy

__all__ = ["build_zero_shot_classifier", "retrieval_metrics", "zero_shot_accuracy"]
