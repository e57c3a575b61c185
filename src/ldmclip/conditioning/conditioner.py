"""The text conditioner of a latent diffusion model: the tensors SD 1.x, SD 2.x and SDXL feed the U-Net,
and the CLIP part of what SD 3.x and Flux feed their transformers.

A :class:`TextConditioner` wraps one CLIP text tower (or two, for SDXL and SD 3) and its tokenizer and
turns prompts into ``hidden`` ``[B, T, width]`` (the U-Net's cross-attention context) and, when asked,
``pooled`` ``[B, embed_dim]`` (SDXL's and SD 3's extra vector conditioning, Flux's only CLIP input).
With two towers, ``cond(prompts, prompts_2=...)`` gives the second tower prompts of its own, as
diffusers' ``prompt_2`` does (default: the same prompts).

SD 3 and Flux
-------------
``sd3`` is the CLIP half of diffusers' ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L's and
CLIP-G's ``hidden_states[-2]`` (no final LayerNorm) concatenated to ``[B, 77, 768 + 1280]``, and
``pooled`` = both projected pooled embeddings concatenated, ``[B, 768 + 1280]``; CLIP-L pads with
end-of-text, CLIP-G with 0 (``"!"``), as SD 3's two tokenizers do. The T5 part stays yours; join the
two as the pipeline does: zero-pad the CLIP hidden states to T5's width (4096) and concatenate along
the tokens, CLIP first::

    out = cond(prompts)                                              # hidden [B, 77, 2048]
    clip = torch.nn.functional.pad(out.hidden, (0, t5.shape[-1] - out.hidden.shape[-1]))
    prompt_embeds = torch.cat([clip, t5], dim=-2)                    # [B, 77 + T5 tokens, 4096]
    pooled_prompt_embeds = out.pooled                                # [B, 2048]

``flux`` is diffusers' ``FluxPipeline._get_clip_prompt_embeds``: CLIP-L's ``pooler_output`` (the final
LayerNorm at the end-of-text token, *not* projected), ``pooled`` ``[B, 768]``. Flux reads no CLIP
hidden states (its token conditioning is T5's); ``hidden`` is CLIP-L's ``last_hidden_state`` (the
final LayerNorm on the last layer, as ``sd1``), there for a cache or an experiment, and ``clip_skip``
moves only ``hidden``: the pooled output always reads the last layer, in every preset, as in
diffusers (whose Flux pipeline has no ``clip_skip``).

Which layer
-----------
``layer`` picks one entry of the list of hidden states the way ``transformers`` numbers its
``hidden_states`` tuple: index 0 is the token + position embedding, index ``i`` the output of block
``i`` (counting blocks from 1), and negative indices count from the end: ``-1`` (``"last"``) is the
last block, ``-2`` (``"penultimate"``) the one before it. ``final_ln`` applies the tower's final
LayerNorm (``ln_final``) to the chosen layer. Only the blocks up to the chosen layer are run, except
when ``pooled`` needs the last one.

``clip_skip`` counts the way AUTOMATIC1111's web UI and kohya's sd-scripts do: ``clip_skip=1`` is the
last layer, ``clip_skip=2`` the penultimate one, i.e. ``layer=-clip_skip``. diffusers counts from 0
instead (its ``clip_skip=1`` is the penultimate layer, and for SDXL and SD 3 it counts from the
penultimate layer already, ``hidden_states[-(clip_skip + 2)]``): diffusers' ``clip_skip=k`` is
``clip_skip=k + 1`` here for SD 1.x/2.x and ``clip_skip=k + 2`` for SDXL and SD 3. ``clip_skip``
replaces the preset's layer and keeps its ``final_ln`` (SD 1.x: with the final LayerNorm, as
diffusers, A1111 and kohya apply it). With two towers it moves both, as in diffusers.

Long prompts
------------
CLIP reads 77 tokens: SOT, 75 text tokens, EOT. With ``max_tokens`` (a multiple of 75, e.g. 225) a
prompt's tokens are cut into 75-token windows, each window is wrapped in SOT/EOT and padded to 77,
every window is encoded on its own and the results are concatenated along the tokens, so ``hidden``
is ``[B, 77 * max_tokens / 75, width]`` for every batch (a fixed shape, which a cache needs; windows
a short prompt does not fill hold the empty prompt, as in A1111). ``pooled`` comes from the first
window, as A1111 and kohya's SDXL scripts do. (kohya's sd-scripts keep only the first SOT and the
last window's EOT/pad, giving ``max_tokens + 2`` tokens; A1111, ComfyUI and compel keep all 77 of
every window, as here. A1111 also moves a window boundary back to a comma when it can; this splits
exactly every 75 tokens.) Prompts longer than the limit are cut, with one warning per call that
says how many. With two towers each one windows its own prompts (``prompts`` or ``prompts_2``); both
get the same number of windows, so their hidden states line up token for token.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints.sd import TEXT_ENCODER_ALONE, find_text_encoders
from ..core.errors import UserError
from ..core.files import tensors_sha256
from ..models.text import TextTransformer, hidden_state_index
from ..registry import get_tokenizer, load_text_tower
from ..tokenizer import CLIPTokenizer, build_tokenizer

logger = logging.getLogger(__name__)

IDENTITY_FORMAT = 1


@dataclass
class ConditionerOutput:
    """What a :class:`TextConditioner` returns for a batch of prompts.

    ``hidden``: ``[B, T, width]`` per-token states (``T`` = 77, or 77 per window with long prompts;
    ``width`` summed over the towers). ``pooled``: ``[B, embed_dim]`` or None when not asked for
    (SD 3: both towers' ``embed_dim`` summed; Flux: the tower's ``width``, not projected).
    ``truncated``: how many of the prompts were longer than the token limit and were cut.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    truncated: int = 0


@dataclass(frozen=True)
class Preset:
    """One published recipe. ``pad`` per tower: ``"eot"`` (the tokenizer's end-of-text id) or an id.
    ``pooled_from``: ``"last"`` (the last tower's pooled output) or ``"all"`` (every tower's,
    concatenated); ``project_pooled``: apply ``text_projection`` to the pooled output."""

    name: str
    description: str
    layer: str | int
    final_ln: bool
    pooled: bool
    pad: tuple[str | int, ...]
    models: tuple[str, ...]  # default model names for from_pretrained
    pooled_from: str = "last"
    project_pooled: bool = True


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd1", "Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 (QuickGELU), last layer with the final "
                  "LayerNorm, padded with EOT (transformers CLIPTextModel.last_hidden_state)",
           "last", True, False, ("eot",), ("ViT-L-14-quickgelu",)),
    Preset("sd2", "Stable Diffusion 2.x: OpenCLIP ViT-H/14, penultimate layer with the final LayerNorm, "
                  "padded with 0 (Stability's FrozenOpenCLIPEmbedder(layer='penultimate'))",
           "penultimate", True, False, (0,), ("ViT-H-14",)),
    Preset("sdxl", "SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both penultimate without the final "
                   "LayerNorm, concatenated (768 + 1280 = 2048), plus bigG's pooled projection; ViT-L pads "
                   "with EOT, bigG with 0 (FrozenCLIPEmbedder(layer='hidden', layer_idx=11) + "
                   "FrozenOpenCLIPEmbedder2(layer='penultimate', legacy=False))",
           "penultimate", False, True, ("eot", 0), ("ViT-L-14-quickgelu", "ViT-bigG-14")),
    Preset("sd3", "Stable Diffusion 3.x, the CLIP part: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both penultimate "
                  "without the final LayerNorm, concatenated (768 + 1280 = 2048), plus both pooled projections "
                  "concatenated (768 + 1280 = 2048); ViT-L pads with EOT, bigG with 0 (diffusers' "
                  "StableDiffusion3Pipeline; join T5 yourself: see the module docstring)",
           "penultimate", False, True, ("eot", 0), ("ViT-L-14-quickgelu", "ViT-bigG-14"), pooled_from="all"),
    Preset("flux", "Flux.1, the CLIP part: CLIP ViT-L/14's pooler_output (final LayerNorm at the end-of-text "
                   "token, no projection, 768); hidden is its last_hidden_state, which Flux does not read "
                   "(diffusers' FluxPipeline._get_clip_prompt_embeds)",
           "last", True, True, ("eot",), ("ViT-L-14-quickgelu",), project_pooled=False),
)}

TWO_TOWER_PRESETS = tuple(name for name, preset in PRESETS.items() if len(preset.models) == 2)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown conditioning preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def text_tower_config(tower: TextTransformer) -> dict[str, Any]:
    """The architecture of a text tower, read from its tensors (what an export or a cache records)."""
    block = tower.transformer.resblocks[0]
    return {
        "vocab_size": tower.token_embedding.num_embeddings,
        "context_length": tower.positional_embedding.shape[0],
        "width": tower.transformer.width,
        "layers": tower.transformer.layers,
        "heads": block.attn.heads,
        "intermediate_size": block.mlp.c_fc.out_features,
        "embed_dim": tower.text_projection.shape[1],
        "activation": tower.activation,
    }


def weights_sha256(tower: TextTransformer) -> str:
    """sha256 over the text tower's tensors (names, dtypes, shapes and bytes), in key order."""
    return tensors_sha256(tower.text_state_dict())


def _autocast_state(device: torch.device) -> tuple:
    if torch.is_autocast_enabled(device.type):
        return (True, torch.get_autocast_dtype(device.type))
    return (False, None)


# Files of another family that hold a preset's towers: Flux all-in-one checkpoints (ComfyUI's layout) keep
# CLIP-L under SD 3's ``text_encoders.clip_l.`` prefix, and an SD 3 file's CLIP-L is Flux's CLIP-L too.
_BORROWED_FAMILIES: dict[str, tuple[str, ...]] = {"flux": ("sd3",)}


class TextConditioner(nn.Module):
    """Prompts → the text conditioning of a latent diffusion model (see the module docstring).

    Args:
        model: a CLIP model or a bare text tower (``ldmclip.models.TextTransformer``).
        tokenizer: its tokenizer (default: the CLIP BPE).
        model_2, tokenizer_2: a second tower (SDXL, SD 3); its hidden states are concatenated after
            the first tower's along the features, and ``pooled`` comes from it (or from both, see
            ``pooled_from``). ``forward(prompts, prompts_2=...)`` gives it prompts of its own.
        layer: ``"last"``, ``"penultimate"`` or an index into the hidden states (0 = embedding,
            ``i`` = block ``i``, negative from the end). Default ``"last"``.
        final_ln: apply the final LayerNorm to the chosen layer.
        pooled: also return the pooled embedding (final layer, final LayerNorm, EOT token,
            ``text_projection``) of the last tower.
        pooled_from: ``"last"`` (default: the last tower's pooled embedding, SDXL) or ``"all"`` (every
            tower's, concatenated in order, SD 3).
        project_pooled: apply ``text_projection`` to the pooled embedding (default); False gives the
            EOT state after the final LayerNorm (transformers' ``pooler_output``, Flux).
        pad_id, pad_id_2: the id written after EOT for each tower (default: the tokenizer's).
        context_length: tokens per window (default: the tower's, 77).
        max_tokens: encode long prompts in 75-token windows up to this many tokens (a multiple of
            ``context_length - 2``); None cuts prompts at 75 tokens.
        clip_skip: A1111/kohya convention, ``layer=-clip_skip`` (diffusers' ``clip_skip=k`` is
            ``k + 1`` here); cannot be combined with ``layer``.
        zero_empty_prompt: :meth:`empty_prompt` returns zeros (what diffusers' SDXL pipelines use for
            an empty negative prompt, ``force_zeros_for_empty_prompt``) instead of encoding ``""``.

    The module does not freeze the towers or switch off gradients: run it under
    ``torch.inference_mode()`` (and autocast) to encode, or train through it.
    """

    def __init__(
        self,
        model: TextTransformer,
        tokenizer: CLIPTokenizer | None = None,
        *,
        model_2: TextTransformer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        layer: str | int | None = None,
        final_ln: bool = True,
        pooled: bool = False,
        pad_id: int | None = None,
        pad_id_2: int | None = None,
        context_length: int | None = None,
        max_tokens: int | None = None,
        clip_skip: int | None = None,
        zero_empty_prompt: bool = False,
        pooled_from: str = "last",
        project_pooled: bool = True,
    ):
        super().__init__()
        towers = [model] if model_2 is None else [model, model_2]
        for index, tower in enumerate(towers):
            if not isinstance(tower, TextTransformer):
                raise TypeError(f"model{'' if index == 0 else '_2'} must be an ldmclip CLIP model or text tower "
                                f"(ldmclip.create_model(...)), got {type(tower).__name__}")
        if model_2 is None and (tokenizer_2 is not None or pad_id_2 is not None):
            raise ValueError("tokenizer_2 / pad_id_2 given without model_2")
        self.towers = nn.ModuleList(towers)

        if context_length is None:
            context_length = min(t.context_length for t in towers)
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must be an int >= 3 (SOT, a token, EOT), got {context_length!r}")
        for tower in towers:
            if context_length > tower.context_length:
                raise ValueError(f"context_length {context_length} exceeds the text tower's {tower.context_length}")
        self.context_length = context_length

        if tokenizer is None:
            tokenizer = build_tokenizer(context_length=context_length)
        self.tokenizers = [tokenizer] if model_2 is None else [tokenizer, tokenizer_2 or tokenizer]
        pads = [pad_id, pad_id_2][: len(towers)]
        self.pad_ids = [tok.pad_id if pad is None else int(pad) for tok, pad in zip(self.tokenizers, pads)]
        for tok, pad in zip(self.tokenizers, self.pad_ids):
            if not 0 <= pad < tok.vocab_size:
                raise ValueError(f"pad_id {pad} is outside the vocabulary (size {tok.vocab_size})")

        if clip_skip is not None:
            if layer is not None:
                raise ValueError("pass either layer or clip_skip, not both (clip_skip=n means layer=-n)")
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
                raise ValueError(
                    f"clip_skip counts the way A1111 and kohya do: 1 = last layer, 2 = penultimate; got {clip_skip!r}. "
                    f"diffusers counts from 0: its clip_skip=k is clip_skip=k+1 here.")
            layer = -clip_skip
        self.layer = "last" if layer is None else layer
        self.blocks = [hidden_state_index(self.layer, t.transformer.layers) for t in towers]
        self.final_ln = bool(final_ln)
        self.pooled = bool(pooled)
        if pooled_from not in ("last", "all"):
            raise ValueError(f"pooled_from must be 'last' or 'all', got {pooled_from!r}")
        self.pooled_from = pooled_from
        self.project_pooled = bool(project_pooled)

        body = context_length - 2
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < body \
                    or max_tokens % body:
                raise ValueError(f"max_tokens must be a multiple of {body} (context_length - 2), e.g. {3 * body}; "
                                 f"got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.windows = 1 if max_tokens is None else max_tokens // body
        self.zero_empty_prompt = bool(zero_empty_prompt)
        self.preset: str | None = None  # set by from_preset
        self._empty: dict[tuple, ConditionerOutput] = {}

    # -- construction from recipes -----------------------------------------------------------------
    @classmethod
    def from_preset(
        cls,
        name: str,
        model: TextTransformer,
        tokenizer: CLIPTokenizer | None = None,
        model_2: TextTransformer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        **options: Any,
    ) -> "TextConditioner":
        """A conditioner set up as a published recipe (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``;
        see ``PRESETS``).

        The models are whatever you pass (the preset does not check their size); ``options``
        override the recipe's settings, e.g. ``clip_skip=2``, ``max_tokens=225``, ``pooled=True``.
        """
        preset = get_preset(name)
        if len(preset.pad) == 2 and model_2 is None:
            raise ValueError(f"the {name} preset conditions on two text towers: pass model_2= (and tokenizer_2=); "
                             f"{name}'s are CLIP ViT-L/14 (model) and OpenCLIP ViT-bigG/14 (model_2)")
        if len(preset.pad) == 1 and (model_2 is not None or tokenizer_2 is not None):
            raise ValueError(f"the {name} preset uses one text tower; model_2/tokenizer_2 are for "
                             f"{' and '.join(TWO_TOWER_PRESETS)}")
        if tokenizer is None:
            tokenizer = build_tokenizer(context_length=model.context_length)
        tokenizers = [tokenizer, tokenizer_2 or tokenizer]
        pads = [tok.eot_token_id if pad == "eot" else pad for tok, pad in zip(tokenizers, preset.pad)]
        settings: dict[str, Any] = {"layer": preset.layer, "final_ln": preset.final_ln, "pooled": preset.pooled,
                                    "pad_id": pads[0], "pooled_from": preset.pooled_from,
                                    "project_pooled": preset.project_pooled}
        if model_2 is not None:
            settings["pad_id_2"] = pads[1]
        if options.get("clip_skip") is not None and options.get("layer") is None:
            settings.pop("layer")  # clip_skip takes the place of the recipe's layer
        settings.update(options)
        conditioner = cls(model, tokenizer, model_2=model_2, tokenizer_2=tokenizer_2, **settings)
        conditioner.preset = preset.name
        return conditioner

    @classmethod
    def from_pretrained(
        cls,
        preset: str,
        model: str | None = None,
        pretrained: str | None = None,
        model_2: str | None = None,
        pretrained_2: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **options: Any,
    ) -> "TextConditioner":
        """Load the text towers with :func:`load_text_tower` and wrap them in a preset.

        Model names default to the preset's (sd1 and flux: ``ViT-L-14-quickgelu``; sd2: ``ViT-H-14``;
        sdxl and sd3: ``ViT-L-14-quickgelu`` + ``ViT-bigG-14``); ``pretrained`` takes what
        ``create_model`` takes.
        Only the text towers are built and read (no image tower is ever allocated); they are frozen
        and in eval mode.
        """
        if "checkpoint" in options:  # a single-file SD checkpoint: see from_single_file
            return cls.from_single_file(preset, options.pop("checkpoint"), model, model_2, device, precision,
                                        pretrained=pretrained, pretrained_2=pretrained_2, **options)
        spec = get_preset(preset)
        if len(spec.models) == 1 and (model_2 is not None or pretrained_2 is not None):
            raise ValueError(f"the {preset} preset uses one text tower; model_2/pretrained_2 are for "
                             f"{' and '.join(TWO_TOWER_PRESETS)}")
        names = [model or spec.models[0]] + ([model_2 or spec.models[1]] if len(spec.models) == 2 else [])
        weights = [pretrained, pretrained_2][: len(names)]
        towers = [load_text_tower(n, w, device=device, precision=precision) for n, w in zip(names, weights)]
        tokenizers = [get_tokenizer(n) for n in names]
        second = {"model_2": towers[1], "tokenizer_2": tokenizers[1]} if len(towers) == 2 else {}
        conditioner = cls.from_preset(preset, towers[0], tokenizers[0], **second, **options)
        return conditioner.eval().requires_grad_(False)

    # -- encoding ------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of ``hidden`` (summed over the towers)."""
        return sum(t.transformer.width for t in self.towers)

    @property
    def sequence_length(self) -> int:
        """Tokens in ``hidden``: ``context_length`` per window."""
        return self.context_length * self.windows

    def _pools(self, index: int) -> bool:
        """Whether tower ``index`` contributes to ``pooled``."""
        return self.pooled and (self.pooled_from == "all" or index == len(self.towers) - 1)

    @property
    def pooled_size(self) -> int | None:
        if not self.pooled:
            return None
        return sum(t.text_projection.shape[1] if self.project_pooled else t.transformer.width
                   for index, t in enumerate(self.towers) if self._pools(index))

    def forward(self, prompts: str | Sequence[str],
                prompts_2: str | Sequence[str] | None = None) -> ConditionerOutput:
        """Encode prompts: ``hidden`` ``[B, T, width]`` and ``pooled`` ``[B, embed_dim]`` or None.

        ``prompts_2`` (two towers only, like diffusers' ``prompt_2``): what the second tower reads,
        one per prompt; default: the same prompts. (diffusers also falls back to ``prompt`` when
        ``prompt_2`` is ``""``; here a given value is used as it is.)
        """
        per_tower = self._prompts_per_tower(prompts, prompts_2)
        limit = (self.context_length - 2) * self.windows
        token_ids: dict[tuple[int, int], list[list[int]]] = {}  # BPE runs once per tokenizer and prompt list
        cut = [False] * len(per_tower[0])  # a row counts once however many of its towers cut it
        hiddens, pooled = [], []
        for index, (tower, tokenizer, pad_id, blocks, texts) in enumerate(
                zip(self.towers, self.tokenizers, self.pad_ids, self.blocks, per_tower)):
            key = (id(tokenizer), id(texts))
            if key not in token_ids:
                token_ids[key] = ids = tokenizer.encode_batch(texts)
                cut = [was or len(x) > limit for was, x in zip(cut, ids)]
            tokens = self._windows(token_ids[key], tokenizer, pad_id)
            hidden, tower_pooled = self._encode(tower, tokens, blocks, self._pools(index))
            hiddens.append(hidden)
            if tower_pooled is not None:
                pooled.append(tower_pooled)
        truncated = sum(cut)
        if truncated:
            hint = (f"raise max_tokens (now {self.max_tokens})" if self.max_tokens else
                    f"pass max_tokens={3 * (self.context_length - 2)} to encode long prompts in windows")
            logger.warning("%d of %d prompts are longer than %d tokens and were cut (%s)",
                           truncated, len(cut), limit, hint)
        hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens, dim=-1)
        pooled_out = None if not pooled else pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
        return ConditionerOutput(hidden=hidden, pooled=pooled_out, truncated=truncated)

    def _prompts_per_tower(self, prompts: str | Sequence[str],
                           prompts_2: str | Sequence[str] | None) -> list[list[str]]:
        """One list of prompts per tower (the same list object when they are the same prompts)."""
        first = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts_2 is None:
            return [first] * len(self.towers)
        if len(self.towers) == 1:
            raise ValueError("prompts_2 is for a conditioner with two text towers (model_2=; presets "
                             f"{' and '.join(TWO_TOWER_PRESETS)}); this one has one")
        second = [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
        if len(second) != len(first):
            raise ValueError(f"prompts_2 holds {len(second)} prompts but prompts holds {len(first)}: "
                             f"give one per prompt")
        return [first, second]

    def _windows(self, ids: list[list[int]], tokenizer: CLIPTokenizer, pad_id: int) -> torch.Tensor:
        """``[B * windows, context_length]`` ids: each window is ``SOT, up to 75 ids, EOT, pad...``
        (with one window, exactly what ``tokenizer(prompts)`` gives with this pad id)."""
        body, windows = self.context_length - 2, self.windows
        out = np.full((len(ids), windows, self.context_length), pad_id, dtype=np.int64)
        out[:, :, 0] = tokenizer.sot_token_id
        for row, prompt_ids in enumerate(ids):
            prompt_ids = prompt_ids[: body * windows]
            for window in range(windows):
                chunk = prompt_ids[window * body: (window + 1) * body]
                if chunk or window == 0:
                    out[row, window, 1: 1 + len(chunk)] = chunk
                    out[row, window, 1 + len(chunk)] = tokenizer.eot_token_id
                else:  # a window past the prompt's end holds the empty prompt
                    out[row, window, 1] = tokenizer.eot_token_id
        return torch.from_numpy(out.reshape(-1, self.context_length))

    def _encode(self, tower: TextTransformer, tokens: torch.Tensor, blocks: int,
                want_pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One tower: ``[B, windows * ctx, width]`` hidden states and ``[B, embed_dim]`` pooled (or None)."""
        device = tower.token_embedding.weight.device
        tokens = tokens.to(device)
        inverse = None
        if self.windows > 1 and tokens.shape[0]:
            # Short prompts leave many windows empty and identical: encode each distinct window once.
            tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        x = tower.embed_tokens(tokens)
        x = tower.transformer(x, causal=True, stop_at=blocks)  # runs only the blocks the layer needs
        hidden = tower.ln_final(x) if self.final_ln else x
        pooled = None
        if want_pooled:
            for block in tower.transformer.resblocks[blocks:]:  # the rest of the tower, for the pooled output
                x = block(x, causal=True)
            pooled = tower.pool_text(x, tokens, project=self.project_pooled)
        if inverse is not None:
            hidden = hidden[inverse]
            pooled = None if pooled is None else pooled[inverse]
        batch = hidden.shape[0] // self.windows
        hidden = hidden.reshape(batch, self.windows * self.context_length, hidden.shape[-1])
        if pooled is not None:  # from each prompt's first window
            pooled = pooled.reshape(batch, self.windows, pooled.shape[-1])[:, 0]
        return hidden, pooled

    def empty_prompt(self, zeros: bool | None = None) -> ConditionerOutput:
        """The conditioning of ``""`` (batch of 1), for classifier-free guidance.

        Encoded once and kept while the towers are frozen (no parameter requires grad), per device,
        dtype and autocast setting. ``zeros=True`` (default: the ``zero_empty_prompt`` option) gives
        zeros of the same shapes, as SDXL pipelines use for an empty negative prompt.
        """
        zeros = self.zero_empty_prompt if zeros is None else zeros
        weight = self.towers[0].token_embedding.weight
        frozen = not any(p.requires_grad for p in self.parameters())
        key = (weight.device, weight.dtype, _autocast_state(weight.device))
        out = self._empty.get(key) if frozen else None
        if out is None:
            with torch.no_grad() if frozen else contextlib.nullcontext():
                out = self([""])
            if frozen:
                self._empty[key] = out
        # clones: callers may modify what they get, and a tensor made under inference_mode
        # could not be used in autograd later
        hidden = torch.zeros_like(out.hidden) if zeros else out.hidden.clone()
        pooled = None if out.pooled is None else torch.zeros_like(out.pooled) if zeros else out.pooled.clone()
        return ConditionerOutput(hidden=hidden, pooled=pooled, truncated=0)

    # -- identity ----------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Everything that decides the outputs, JSON-serialisable: the preset and options, each tower's
        architecture and a sha256 of its weights, each tokenizer's special ids. No paths or names, so
        the same weights give the same identity on any machine. Caches use it to refuse mixing."""
        return {
            "format": IDENTITY_FORMAT,
            "preset": self.preset,
            "hidden_state_index": list(self.blocks),
            "final_ln": self.final_ln,
            "pooled": self.pooled,
            "context_length": self.context_length,
            "max_tokens": self.max_tokens,
            "zero_empty_prompt": self.zero_empty_prompt,
            # only when not the default, so caches made before these options existed keep their identity
            **({"pooled_from": self.pooled_from} if self.pooled_from != "last" else {}),
            **({"project_pooled": False} if not self.project_pooled else {}),
            "towers": [
                {"config": text_tower_config(tower), "sha256": weights_sha256(tower),
                 "tokenizer": {"vocab_size": tok.vocab_size, "sot_id": tok.sot_token_id,
                               "eot_id": tok.eot_token_id, "pad_id": pad}}
                for tower, tok, pad in zip(self.towers, self.tokenizers, self.pad_ids)
            ],
        }

    @classmethod
    def from_single_file(
        cls,
        preset: str,
        checkpoint: str | Path,
        model: str | None = None,
        model_2: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **options: Any,
    ) -> "TextConditioner":
        """The preset's text towers read out of one single-file SD checkpoint (``checkpoints.sd``), also
        spelled ``from_pretrained(preset, checkpoint=...)``: ``sdxl`` takes both encoders of an SDXL
        file. Each tower is checked against the preset's model config (or ``model``/``model_2``); a
        file of another family (an SD 1.x file given to ``sdxl``) is refused. A text-encoder file
        (``clip_l.safetensors``) fits a one-tower preset; for two, pass ``pretrained``/``pretrained_2``."""
        for given in ("pretrained", "pretrained_2"):
            if options.pop(given, None) is not None:
                raise UserError(f"pass checkpoint= (a single-file SD checkpoint) or {given}=, not both")
        spec = get_preset(preset)
        found = find_text_encoders(checkpoint)
        held = ", ".join(f"{f.encoder} ({f.prefix or 'no prefix'})" for f in found)
        if not found:
            raise UserError(f"{checkpoint} holds no CLIP text encoder (no SD 1.x/2.x/SDXL/SD 3 text-encoder keys, "
                            f"nor a text encoder alone)")
        family = found[0].family
        borrowed = family in _BORROWED_FAMILIES.get(spec.name, ())
        if family not in (spec.name, TEXT_ENCODER_ALONE) and not borrowed:
            raise UserError(f"{checkpoint} is a {family} checkpoint (text encoders: {held}), not a {spec.name} one; "
                            f"use the {family} preset, or pass the text tower files as pretrained=")
        if borrowed:  # the preset reads only CLIP-L of the file (load_text_tower picks it by its shapes)
            found = [f for f in found if f.encoder == "text_encoder"]
        if len(found) != len(spec.models):
            raise UserError(f"{checkpoint} holds {len(found)} text encoder(s) ({held}) but the {spec.name} preset "
                            f"conditions on {len(spec.models)} ({', '.join(spec.models)})")
        second = {"pretrained_2": checkpoint} if len(spec.models) == 2 else {}
        return cls.from_pretrained(preset, model, checkpoint, model_2, device=device, precision=precision,
                                   **second, **options)

    def extra_repr(self) -> str:
        return (f"preset={self.preset}, layer={self.layer!r}, final_ln={self.final_ln}, pooled={self.pooled}, "
                f"pooled_from={self.pooled_from!r}, project_pooled={self.project_pooled}, "
                f"pad_ids={self.pad_ids}, context_length={self.context_length}, max_tokens={self.max_tokens}")
