"""Model code, pure ``nn.Module``s: the config dataclasses, layers, the two towers and CLIP. Building a
model by name and loading its weights is :mod:`ldmclip.registry`."""

from .clip import CLIP
from .config import CLIPConfig, TextConfig, VisionConfig
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vision import VisionTransformer

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "TextTransformer", "VisionTransformer", "ModifiedResNet"]
