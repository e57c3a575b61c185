"""Every checkpoint format, both directions, in one place (above ``models``, below the registry):

- :mod:`.state_dict`: read any file layout into OpenCLIP key names, load with one clear error;
- :mod:`.hf`: ``transformers`` ``CLIPModel`` / ``CLIPTextModel`` keys and configs;
- :mod:`.openclip`: the OpenCLIP hub layout and the config of any checkpoint folder;
- :mod:`.hub`: ``hf-hub:`` and ``local-dir:`` names;
- :mod:`.pretrained`: OpenCLIP's pretrained tags (``laion2b_s32b_b82k``: a repository, mean/std, activation).
- :mod:`.merge`: weight-space interpolation of two checkpoints (WiSE-FT);
- :mod:`.sd`: the text encoders inside single-file Stable Diffusion checkpoints; :mod:`.sd_write` writes
  them back.
"""

from .errors import CheckpointError
from .hf import (HF_CONFIG_NAME, HF_WEIGHT_NAMES, config_from_hf, hf_to_openclip_state_dict, is_hf_dir,
                 is_hf_text_config, openclip_to_hf_state_dict, read_hf_config, read_text_encoder_config)
from .hub import checkpoint_folder, hf_hub_file, hub_offline, resolve_hf_hub
from .pretrained import (PretrainedTag, clean_tag, download_tag_weights, find_tag, models_with_tag,
                         pretrained_registry, unknown_tag_error)
from .merge import interpolate_state_dicts
from .openclip import OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES, find_weights_in_dir, is_openclip_dir, read_dir_config
from .sd import SDTextEncoder, TowerConfig, find_text_encoders, read_text_encoders
from .sd_write import SDWriteResult, write_text_encoders
from .state_dict import (STATE_DICT_SUFFIXES, infer_config, load_into_model, normalize_state_dict,
                         openclip_key_names, read_state_dict, resize_image_positional_embedding, save_state_dict,
                         unwrap_checkpoint)

__all__ = ["HF_CONFIG_NAME", "HF_WEIGHT_NAMES", "OPENCLIP_CONFIG_NAME", "OPENCLIP_WEIGHT_NAMES",
           "STATE_DICT_SUFFIXES", "CheckpointError", "PretrainedTag", "SDTextEncoder", "SDWriteResult", "TowerConfig",
           "checkpoint_folder", "clean_tag", "config_from_hf", "download_tag_weights", "find_tag",
           "find_text_encoders", "find_weights_in_dir", "interpolate_state_dicts",
           "hf_hub_file", "hf_to_openclip_state_dict", "hub_offline",
           "models_with_tag", "pretrained_registry", "unknown_tag_error", "infer_config", "is_hf_dir",
           "is_hf_text_config", "is_openclip_dir", "load_into_model", "normalize_state_dict", "openclip_key_names",
           "openclip_to_hf_state_dict", "read_dir_config", "read_hf_config", "read_state_dict", "read_text_encoders",
           "read_text_encoder_config", "resize_image_positional_embedding", "resolve_hf_hub", "save_state_dict",
           "unwrap_checkpoint", "write_text_encoders"]
