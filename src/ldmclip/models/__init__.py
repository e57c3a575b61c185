"""Model code: layers, the two towers, the CLIP wrapper and the factory."""

from .clip import CLIP
from .config import CLIPConfig, TextConfig, VisionConfig
from .factory import create_model, create_model_and_transforms, get_model_config, get_tokenizer, list_models
from .text import TextTransformer
from .vision import VisionTransformer

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "TextTransformer", "VisionTransformer",
           "create_model", "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models"]
