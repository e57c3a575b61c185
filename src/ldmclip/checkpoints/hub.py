"""Model names that point at a checkpoint: ``hf-hub:org/repo[/folder]`` (the Hugging Face cache, offline
once cached) and ``local-dir:/path``."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.formats import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES
from .hf import HF_CONFIG_NAME, HF_WEIGHT_NAMES
from .errors import CheckpointError

__all__ = ["resolve_hf_hub", "checkpoint_folder"]


def resolve_hf_hub(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding ``hf-hub:`` repo ``name``: the cache when present, else a download.

    ``name`` is ``org/repo`` or ``org/repo/sub/folder`` (e.g. a diffusers pipeline's
    ``org/repo/text_encoder``), whose folder is returned. ``cache_dir`` is the Hugging Face cache to use
    (OpenCLIP's ``cache_dir``; default: huggingface_hub's own)."""
    from huggingface_hub import snapshot_download

    parts = name.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(f"hf-hub:{name} is not a repository name: use hf-hub:org/repo or hf-hub:org/repo/folder")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [OPENCLIP_CONFIG_NAME, *OPENCLIP_WEIGHT_NAMES, HF_CONFIG_NAME, *HF_WEIGHT_NAMES,
                "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer*.json"]
    if sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True,
                                              cache_dir=cache_dir))
    except Exception:  # not cached (huggingface_hub raises several types): try the network
        snapshot = None
    if snapshot is None:
        try:
            snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
        except Exception as error:
            raise CheckpointError(
                f"cannot get hf-hub:{name}: it is not in the Hugging Face cache "
                f"({cache_dir or os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}) and "
                f"downloading failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Download it on a machine with network access (huggingface-cli download {repo_id}) and copy the cache."
            ) from None
    folder = snapshot / sub if sub else snapshot
    if not folder.is_dir():
        raise CheckpointError(f"hf-hub:{name}: the repository {repo_id} has no folder {sub!r} (in {snapshot})")
    return folder


def checkpoint_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder an ``hf-hub:``/``local-dir:`` model name points at; ``None`` for other name forms.
    ``cache_dir``: the Hugging Face cache of ``hf-hub:`` names."""
    if name.startswith(HF_HUB_PREFIX):
        return resolve_hf_hub(name[len(HF_HUB_PREFIX):], cache_dir=cache_dir)
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"'local-dir:' folder not found: {folder}")
        return folder
    return None
