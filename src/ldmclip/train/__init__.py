"""Contrastive training: config, data, optimizer, the step, checkpoints, logging and the loop."""

from .config import TrainConfig
from .loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
