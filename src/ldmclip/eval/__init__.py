"""Evaluation: zero-shot classification and image–text retrieval (``ldmclip eval``).

Numbers equal OpenCLIP 3.3.0's on the same weights: the zero-shot classifier is OpenCLIP's
``build_zero_shot_classifier``; retrieval ranks follow ``open_clip_train``'s ``get_clip_metrics``,
extended to several captions per image (see ``ldmclip.eval.retrieval``).
"""

from .evaluate import evaluate_retrieval, evaluate_zero_shot
from .retrieval import retrieval_metrics, retrieval_ranks
from .sources import open_retrieval, open_zero_shot, read_classnames
from .sweep import SELECT_METRICS, parse_alphas, plot_sweep, select_alpha, sweep_interpolation
from .templates import (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES, imagenet_classnames,
                        load_templates)
from .zeroshot import (build_zero_shot_classifier, classification_metrics, confusion_matrix, plot_confusion_matrix,
                       zero_shot_accuracy, zero_shot_predictions)

__all__ = [
    "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES", "build_zero_shot_classifier",
    "classification_metrics",
    "confusion_matrix", "evaluate_retrieval", "evaluate_zero_shot", "imagenet_classnames", "load_templates",
    "open_retrieval", "open_zero_shot", "plot_confusion_matrix", "read_classnames", "retrieval_metrics",
    "retrieval_ranks", "zero_shot_accuracy", "zero_shot_predictions",
    "SELECT_METRICS", "parse_alphas", "plot_sweep", "select_alpha", "sweep_interpolation",
]
