"""ldmclip: CLIP for people who train latent diffusion models.

Train CLIP, load OpenCLIP / OpenAI / Hugging Face checkpoints with identical numerics, and use the
text tower to condition latent diffusion models. The names OpenCLIP's clients call (``tokenize``,
``create_model_from_pretrained``, ``build_zero_shot_classifier``, ``image_transform``, ...) are here
under OpenCLIP's names and signatures (the README's migration table lists what differs).
"""

from .conditioning import ConditionerOutput, TextConditioner, TextEmbeddingCache
from .core.precision import get_cast_dtype, get_input_dtype
from .core.version import __version__
from .eval import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES, build_zero_shot_classifier
from .models import CLIP, CLIPConfig
from .registry import (add_model_config, create_model, create_model_and_transforms, create_model_from_pretrained,
                       get_model_config, get_tokenizer, list_models, load_text_tower, load_text_towers)
from .registry import get_pretrained_cfg, list_pretrained, list_pretrained_models_by_tag, list_pretrained_tags_by_model
from .tokenizer import tokenize
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN,
                         OPENAI_DATASET_STD, image_transform)

__all__ = ["CLIP", "CLIPConfig", "ConditionerOutput", "IMAGENET_CLASSNAMES", "IMAGENET_MEAN", "IMAGENET_STD",
           "INCEPTION_MEAN", "INCEPTION_STD", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD", "OPENAI_IMAGENET_TEMPLATES",
           "SIMPLE_IMAGENET_TEMPLATES", "TextConditioner", "TextEmbeddingCache", "build_zero_shot_classifier",
           "create_model", "create_model_and_transforms", "create_model_from_pretrained", "get_cast_dtype",
           "get_input_dtype", "get_model_config", "get_tokenizer", "image_transform", "list_models", "tokenize",
           "__version__"]
__all__ += ["add_model_config", "get_pretrained_cfg", "list_pretrained", "list_pretrained_models_by_tag",
            "list_pretrained_tags_by_model"]
__all__ += ["load_text_tower", "load_text_towers"]
