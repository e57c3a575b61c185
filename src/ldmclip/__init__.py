"""ldmclip: CLIP for people who train latent diffusion models.

Train CLIP, load OpenCLIP / OpenAI / Hugging Face checkpoints with identical numerics, and use the
text tower to condition latent diffusion models.
"""

from .conditioning import ConditionerOutput, TextConditioner, TextEmbeddingCache
from .core.version import __version__
from .models import CLIP, CLIPConfig
from .registry import (create_model, create_model_and_transforms, get_model_config, get_tokenizer, list_models,
                       load_text_tower, load_text_towers)

__all__ = ["CLIP", "CLIPConfig", "ConditionerOutput", "TextConditioner", "TextEmbeddingCache", "create_model",
           "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models", "load_text_tower",
           "load_text_towers", "__version__"]
