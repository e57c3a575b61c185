"""Model names that point at a checkpoint: ``hf-hub:org/repo[/folder]`` (the Hugging Face cache, offline
once cached) and ``local-dir:/path``."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.formats import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES
from .hf import HF_CONFIG_NAME, HF_WEIGHT_NAMES
from .errors import CheckpointError

__all__ = ["resolve_hf_hub", "hf_hub_file", "hub_offline", "checkpoint_folder"]

_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub reads as true


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set: as huggingface_hub read it at import, or set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _cache_shown(cache_dir: str | Path | None = None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _not_cached(what: str, cache_dir: str | Path | None, error: Exception | None, command: str,
                note: str = "") -> str:
    """Why ``what`` could not be had (offline, or the download's error), and the command that gets it."""
    if error is None:
        why = "and HF_HUB_OFFLINE=1 is set, so nothing was downloaded"
    else:
        first = str(error).splitlines()[0] if str(error) else ""
        why = f"and downloading failed ({type(error).__name__}: {first})"
    return (f"cannot get {what}: it is not in the Hugging Face cache ({_cache_shown(cache_dir)}) {why}. "
            f"Download it on a machine with network access (huggingface-cli download {command}, or "
            f"hf download {command}{note}) and copy the cache here")


def hf_hub_file(repo_id: str, filenames: tuple[str, ...], *, asked: str,
                cache_dir: str | Path | None = None) -> Path:
    """The first of ``filenames`` that repository ``repo_id`` has: from the cache, else downloaded
    (never with HF_HUB_OFFLINE set). ``asked`` says what the file is for, in the error."""
    from huggingface_hub import hf_hub_download

    cache = str(cache_dir) if cache_dir is not None else None
    for name in filenames:  # the cache first, in order: what is there is used, with no network
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=cache, local_files_only=True))
        except Exception:  # not cached (huggingface_hub raises several types)
            continue
    error: Exception | None = None
    if not hub_offline():
        for name in filenames:
            try:
                return Path(hf_hub_download(repo_id, name, cache_dir=cache))
            except Exception as failed:  # a missing file, or no network: try the next name
                error = failed
    note = f"; {filenames[1]} where the repository has no {filenames[0]}" if len(filenames) > 1 else ""
    raise CheckpointError(_not_cached(f"{asked} ({repo_id}: {' or '.join(filenames)})", cache_dir, error,
                                      f"{repo_id} {filenames[0]}", note)) from None


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
    except Exception:  # not cached (huggingface_hub raises several types): try the network, unless offline
        snapshot = None
    if snapshot is None:
        error: Exception | None = None
        if not hub_offline():
            try:
                snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
            except Exception as failed:
                error = failed
        if snapshot is None:
            raise CheckpointError(_not_cached(f"hf-hub:{name}", cache_dir, error, repo_id)) from None
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
