"""Latent-diffusion conditioning on a CLIP text tower: the SD 1.x / 2.x / SDXL recipes, long
prompts, the empty prompt, the text-embedding cache, and export to the transformers / diffusers layouts."""

from .cache import build_text_cache
from .cache_reader import TextEmbeddingCache
from ..registry import load_text_tower
from .conditioner import PRESETS, ConditionerOutput, TextConditioner

__all__ = ["PRESETS", "ConditionerOutput", "TextConditioner", "TextEmbeddingCache", "build_text_cache", "load_text_tower"]
