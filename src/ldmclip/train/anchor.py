"""Keep what the LDM reads: the drift of one text layer from the starting weights, and a loss against it.

A U-Net (or DiT) trained on a CLIP text encoder reads one layer of it, usually the penultimate block
(SD 2.x, SDXL) or the last (SD 1.x). Fine-tuning the text tower moves that layer, and the U-Net then
reads something it was not trained on. :class:`TextAnchor` keeps a frozen copy of the text tower as it
was at the start (the pretrained weights) and

* measures the **drift** of the layer, reported in the validation metrics as ``anchor_drift``:
  ``||h - h0|| / ||h0||`` per token (``h`` the fine-tuned hidden state, ``h0`` the frozen one), averaged
  over each validation caption's tokens, then over the captions; 0 at the start;
* with ``--anchor-weight W`` adds ``W * loss_anchor`` to the contrastive loss, where ``loss_anchor`` is
  ``||h - h0||^2 / ||h0||^2`` per token, averaged over each caption's tokens, then over the batch's
  captions. Relative, so the weight means the same for towers of any width and for layers of any scale
  (CLIP's hidden states grow with depth); per caption first, so short and long captions count alike and
  the mean over the global batch is the mean of equal-sized local (and micro-batch) parts: under DDP
  and with ``--accum`` the gradient is exactly the one-process, one-batch gradient, with no collective.

Which tokens: each caption's start-of-text through its end-of-text token; the padding after it is left
out. SD reads all 77 positions, but under the causal mask a padding position sees only the caption
and is a function of the same weights, so holding the caption's tokens holds most of it, and leaving
the padding out lets the training forward stop at the batch's longest caption (as ``encode_text``
does) instead of running 77 positions.

How the fine-tuned states are read: a forward hook on the block that outputs the layer captures them
during the training forward itself (``model(images, tokens)``), so DDP, FSDP2 and activation
checkpointing see nothing unusual and nothing is computed twice. The frozen copy is a plain
:class:`~ldmclip.models.text.TextTransformer` holding only the blocks up to the layer, outside any
wrapper: not wrapped by DDP, not sharded by FSDP2 (each process keeps it whole: it is built before
the model is sharded), run under ``no_grad`` with the training autocast, its weights kept in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core.errors import UserError
from ..models.text import TextTransformer, hidden_state_index, is_text_key


def caption_mask(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]``: True at each caption's start-of-text through its end-of-text token (the highest id)."""
    eot = tokens.argmax(dim=-1, keepdim=True)
    return torch.arange(length, device=tokens.device) <= eot


def relative_squared_distance(hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``||h - h0||^2 / ||h0||^2`` per token, ``[B, L]``, in fp32."""
    hidden, reference = hidden.float(), reference.float()
    return (hidden - reference).pow(2).sum(-1) / reference.pow(2).sum(-1).clamp_min(1e-12)


def per_caption_mean(per_token: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean of ``per_token`` ``[B, L]`` over each caption's tokens (SOT through EOT)."""
    mask = caption_mask(tokens.to(per_token.device), per_token.shape[1])
    return (per_token * mask).sum(-1) / mask.sum(-1)


def anchor_loss(hidden: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``loss_anchor``: :func:`relative_squared_distance`, averaged over each caption's tokens, then over
    the captions (``tokens`` ``[B, >= L]``)."""
    return per_caption_mean(relative_squared_distance(hidden, reference), tokens).mean()


class TextAnchor:
    """The frozen starting text tower and the capture of the fine-tuned layer (see the module docstring).

    Build it from the model before it is wrapped or sharded; it registers a hook on the model's text
    block that outputs ``layer`` (the hook does nothing outside :meth:`capture`)."""

    def __init__(self, model: TextTransformer, layer: str | int, weight: float | None = None):
        layers = model.transformer.layers
        try:
            self.blocks = hidden_state_index(layer, layers)
        except ValueError as error:
            raise UserError(f"--anchor-layer: {error}") from None
        self.layer = layer
        self.weight = float(weight or 0.0)
        self.frozen = _frozen_copy(model, self.blocks)
        self.last_loss: torch.Tensor | None = None  # the step's loss_anchor (unweighted), set by the step
        self._capturing = False
        self._captured: torch.Tensor | None = None
        self._hook = _capture_hook(model, self.blocks, self._store)

    @property
    def active(self) -> bool:
        """Whether the loss term is on (``--anchor-weight`` above 0); the drift is reported either way."""
        return self.weight > 0

    def settings(self) -> dict[str, object]:
        """What ``config.json`` records."""
        return {"layer": self.layer, "hidden_state_index": self.blocks, "weight": self.weight,
                "loss": "||h - h0||^2 / ||h0||^2 per token, mean over each caption's tokens (SOT..EOT, padding "
                        "excluded), then over the captions",
                "drift": "||h - h0|| / ||h0|| per token, mean over each caption's tokens, then over the captions"}

    def remove(self) -> None:
        """Take the hook off the model."""
        self._hook.remove()

    # ---- the fine-tuned side: captured from the model's own forward

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """A forward pass of the model inside this block leaves the layer's hidden states for :meth:`take`."""
        self._capturing, self._captured = True, None
        try:
            yield
        finally:
            self._capturing = False

    def _store(self, hidden: torch.Tensor) -> None:
        if self._capturing:
            self._captured = hidden

    def take(self) -> torch.Tensor:
        """The hidden states captured by the last forward inside :meth:`capture` (``[B, L, width]``)."""
        hidden, self._captured = self._captured, None
        if hidden is None:
            raise RuntimeError("no text hidden states were captured: run the model's text tower inside capture()")
        return hidden

    # ---- the frozen side

    @torch.no_grad()
    def reference(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """The frozen tower's hidden states of the layer for ``tokens[:, :length]`` (under the caller's autocast)."""
        tokens = tokens[:, :length].to(self.frozen.token_embedding.weight.device)
        return self.frozen.transformer(self.frozen.embed_tokens(tokens), causal=True, stop_at=self.blocks)

    def loss_sum(self, tokens: torch.Tensor) -> torch.Tensor:
        """:func:`anchor_loss` of the hidden states just captured, times the number of captions (divide by the
        number of captions of the whole batch for the mean, when ``tokens`` is a micro-batch)."""
        hidden = self.take()
        distance = relative_squared_distance(hidden, self.reference(tokens, hidden.shape[1]))
        return per_caption_mean(distance, tokens).sum()

    @torch.no_grad()
    def drift(self, model: nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int = 256) -> float:
        """``||h - h0|| / ||h0||`` per token, averaged over each caption's tokens, then over the captions,
        through ``model.encode_text`` (FSDP2 registers it as a forward method)."""
        per_caption = []
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            with self.capture():
                model.encode_text(batch)
            hidden = self.take()
            distance = relative_squared_distance(hidden, self.reference(batch, hidden.shape[1])).sqrt()
            per_caption.append(per_caption_mean(distance, batch))
        return float(torch.cat(per_caption).mean()) if per_caption else 0.0


def build_anchor(cfg, model: TextTransformer) -> TextAnchor | None:
    """The run's anchor (``cfg``: a :class:`~ldmclip.train.config.TrainConfig`), from the model as it starts,
    before DDP or FSDP2. None when the text tower is locked whole (its drift is 0 by construction), and when
    training from scratch without ``--anchor-weight``: the drift from random weights means nothing, and the
    frozen copy would cost a text tower's memory on every GPU (2.8 GB for ViT-bigG-14's) for it."""
    from .config import parse_anchor_layer

    if cfg.pretrained is None and not cfg.anchor_weight:
        return None

    text_trains = any(p.requires_grad for n, p in model.named_parameters() if is_text_key(n))
    if not text_trains:
        if cfg.anchor_weight:
            raise UserError("--anchor-weight holds the text tower's --anchor-layer in place, but the text tower is "
                            "locked (--lock-text): leave out one of the two")
        return None
    return TextAnchor(model, parse_anchor_layer(cfg.anchor_layer), cfg.anchor_weight)


def _frozen_copy(model: TextTransformer, blocks: int) -> TextTransformer:
    """A plain text tower with ``model``'s current text weights, holding only the first ``blocks`` blocks,
    on the model's device, in eval mode and without gradients."""
    cfg = model.config
    frozen = TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.activation)
    frozen.load_state_dict(model.text_state_dict())
    del frozen.transformer.resblocks[blocks:]  # never run: the layer is reached after `blocks` blocks
    frozen.to(model.token_embedding.weight.device).eval()
    frozen.requires_grad_(False)
    return frozen


def _capture_hook(model: TextTransformer, blocks: int, store) -> torch.utils.hooks.RemovableHandle:
    """A hook handing ``store`` the text tower's hidden states after ``blocks`` blocks (0: the embeddings,
    the input of the first block)."""
    resblocks = model.transformer.resblocks
    if blocks == 0:
        return resblocks[0].register_forward_pre_hook(lambda module, args: store(args[0]))
    return resblocks[blocks - 1].register_forward_hook(lambda module, args, output: store(output))
