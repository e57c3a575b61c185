"""ldmclip: CLIP for people who train latent diffusion models.

Train CLIP, load OpenCLIP / OpenAI / Hugging Face checkpoints with identical numerics, and use the
text tower to condition latent diffusion models.
"""

from .conditioning import ConditionerOutput, TextConditioner, TextEmbeddingCache
from .core.version import __version__
from .models import CLIP, CLIPConfig
from .registry import create_model, create_model_and_transforms, get_model_config, get_tokenizer, list_models
from .registry import get_pretrained_cfg, list_pretrained, list_pretrained_models_by_tag, list_pretrained_tags_by_model

__all__ = ["CLIP", "CLIPConfig", "ConditionerOutput", "TextConditioner", "TextEmbeddingCache", "create_model",
           "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models", "__version__"]
__all__ += ["get_pretrained_cfg", "list_pretrained", "list_pretrained_models_by_tag", "list_pretrained_tags_by_model"]
