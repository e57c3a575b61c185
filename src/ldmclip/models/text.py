"""The causal text Transformer.

Its parameters sit at the top level of the module (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``) because that is where OpenCLIP's ``CLIP`` keeps
them; ``CLIP`` extends this class with an image tower, so a text tower on its own (for LDM
conditioning) and a whole CLIP model share one implementation and one key layout.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .layers import LayerNorm, Transformer, unlock_groups


# The top-level attributes that make up the text tower (a CLIP adds ``visual`` and ``logit_scale``).
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def hidden_state_index(layer: str | int, num_layers: int) -> int:
    """How many blocks to run to reach ``layer`` (0 = just the embeddings), numbered as ``transformers``
    numbers its ``hidden_states``: 0 the token + position embedding, ``i`` the output of block ``i``
    (from 1), negative from the end: ``-1`` / ``"last"`` the last block, ``-2`` / ``"penultimate"`` the
    one before it (what SD 2.x and SDXL read). The one rule for LDM conditioning and the trainer's
    ``--anchor-layer``."""
    named = {"last": -1, "penultimate": -2}
    if isinstance(layer, str):
        if layer not in named:
            raise ValueError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")
        layer = named[layer]
    elif isinstance(layer, bool) or not isinstance(layer, numbers.Integral):  # (numpy ints are Integral)
        raise ValueError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")
    index = int(layer) if layer >= 0 else num_layers + 1 + int(layer)
    if not 0 <= index <= num_layers:
        raise ValueError(f"layer {layer} does not exist in a text tower of {num_layers} blocks "
                         f"(valid: {-num_layers - 1} .. {num_layers}; 0 is the embedding, -1 the last block)")
    return index


def is_text_key(key: str) -> bool:
    """Whether a key of an OpenCLIP ``CLIP`` state dict belongs to the text tower: the one rule, used by
    :meth:`TextTransformer.text_state_dict` and by loaders that read only the text tower's tensors."""
    return key.split(".", 1)[0] in TEXT_PARTS


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, activation: str = "gelu"):
        super().__init__()
        # Kept so that an export (transformers config.json) or a cache can describe the tower.
        self.activation = activation
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        # CLIP's initialisation (Radford et al. 2021): small embeddings, depth-scaled projections.
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower but its last ``unlocked_layers`` groups, with OpenCLIP's groups: the
        embeddings, each block but the last, the last block with ``ln_final``, the projection.
        ``freeze_layer_norm=False`` is refused, as OpenCLIP refuses it (LayerNorms are locked with
        their group)."""
        if not freeze_layer_norm:
            raise ValueError("freeze_layer_norm=False is not supported: LayerNorms are locked like the "
                             "other weights of their group (as in OpenCLIP)")
        for name in TEXT_PARTS:
            part = getattr(self, name)
            for param in [part] if isinstance(part, nn.Parameter) else part.parameters():
                param.requires_grad_(False)
        blocks = list(self.transformer.resblocks)
        groups = [[self.token_embedding, self.positional_embedding], *blocks[:-1],
                  [*blocks[-1:], self.ln_final], self.text_projection]
        unlock_groups(groups, unlocked_layers)

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """The text tower's own tensors, under OpenCLIP's key names (a CLIP's image tower and
        temperature left out)."""
        return {k: v for k, v in self.state_dict().items() if is_text_key(k)}

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, length], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens have length {tokens.shape[1]} but this model's context length is "
                             f"{self.context_length}; tokenize with context_length={self.context_length}")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        length = tokens.shape[1]
        return self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)

    def text_hidden_states(self, tokens: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first ``num_layers`` blocks (all by default), each ``[B, L, width]``.

        ``states[-1]`` is the last computed block, before ``ln_final``. Pass ``num_layers=layers-1``
        to get the penultimate layer without running the last block.
        """
        x = self.embed_tokens(tokens)
        return self.transformer(x, causal=True, stop_at=num_layers, return_all=True)

    def pool_text(self, hidden: torch.Tensor, tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        """``ln_final`` then the state at the end-of-text token (the highest id), projected unless
        ``project=False`` (transformers' ``pooler_output``, which Flux reads)."""
        eot = tokens.argmax(dim=-1)
        pooled = self.ln_final(hidden[torch.arange(hidden.shape[0], device=hidden.device), eot])
        return pooled @ self.text_projection if project else pooled

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self._check_tokens(tokens)
        # The mask is causal and pooling reads the EOT token, so positions after the longest
        # caption's EOT cannot change the result: skip them (most captions are far shorter than 77).
        length = int(tokens.argmax(dim=-1).max()) + 1 if tokens.numel() else tokens.shape[1]
        tokens = tokens[:, :length]
        hidden = self.transformer(self.embed_tokens(tokens), causal=True)
        features = self.pool_text(hidden, tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_batched(self, tokens: torch.Tensor, batch_size: int = 256,
                            normalize: bool = False) -> torch.Tensor:
        """``encode_text`` of many tokenized texts, ``batch_size`` at a time, in batches of similar
        length: the rows are sorted by caption length first (stable), so each batch runs the tower
        only to its own longest caption, and the features come back in the input order.

        Each row's result is ``encode_text`` of that row (up to floating-point rounding)."""
        self._check_tokens(tokens)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        out: torch.Tensor | None = None
        for start in range(0, tokens.shape[0], batch_size):
            rows = order[start:start + batch_size]
            features = self.encode_text(tokens[rows], normalize=normalize)
            if out is None:
                out = features.new_empty(tokens.shape[0], features.shape[1])
            out[rows] = features
        if out is None:
            return self.encode_text(tokens, normalize=normalize)
        return out
