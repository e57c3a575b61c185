"""Contrastive training: config, data, optimizer, the step, checkpoints, logging and the loop."""

from .config import TrainConfig
from .loop import PeerFailure, TrainingError, TrainResult, train

__all__ = ["PeerFailure", "TrainConfig", "TrainResult", "TrainingError", "train"]
