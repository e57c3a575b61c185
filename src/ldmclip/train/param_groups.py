"""Parameter groups as data: the learning rate and weight decay each trainable parameter trains with.

:func:`build_param_groups` reads the options once and returns a list of :class:`ParamGroup` (a name,
the parameter names, their count, the lr and the weight decay); the trainer prints them at start-up
(:func:`format_param_groups`), stores them in the run's ``config.json`` and the checkpoints
(:meth:`ParamGroup.to_dict`) and hands them to AdamW (:func:`optimizer_groups`). The schedule then
multiplies every group's lr by the same factor (``LambdaLR``).

Where a parameter's lr comes from, in order:

1. its tower's lr: ``--lr-image`` for ``visual.*``, ``--lr-text`` for the text tower, ``--lr`` for both by
   default and always for ``logit_scale`` / ``logit_bias``;
2. ``--layer-decay D``: times ``D ** (L + 1 - layer_id)`` within its tower (``L`` blocks): the embeddings
   (patch/token/positional/class embeddings, ``ln_pre``) are layer 0, block ``k`` is layer ``k + 1``, the
   final LayerNorm and projection are layer ``L + 1`` (scale 1). A ResNet image tower decays over its
   stem (0), four stages (1-4) and attention pool (5, scale 1);
3. the first rule of ``--param-groups FILE`` that matches its name: ``lr`` sets the lr outright (no tower
   lr, no layer decay), ``lr_scale`` multiplies the lr of 1-2.

Weight decay is ``--wd`` (or a rule's ``wd``, or ``--wd`` times its ``wd_scale``) for matrices, and 0 for
what ``optim._decays`` leaves out (gains, biases, embeddings, ``logit_scale``) whatever a rule says.

The ``--param-groups`` file (YAML or JSON) is a list of rules, tried in order, the first match wins::

    - pattern: "visual.*"                 # a glob over the full name (fnmatch: * also matches dots)
      lr_scale: 0.1
    - regex: "resblocks\\.(0|1)\\."       # a Python regular expression, searched anywhere in the name
      lr: 1.0e-5
      wd: 0.0

Names are those of ``model.named_parameters()`` (OpenCLIP's state-dict keys), e.g.
``visual.transformer.resblocks.0.attn.in_proj_weight``, ``token_embedding.weight``, ``text_projection``.
Under DDP or ``torch.compile`` the wrappers' prefixes (``module.``, ``_orig_mod.``) are taken off first.

With no option given the groups are the two of before (``all``: matrices with decay, ``all.no_wd``:
the rest), so runs started by an older ldmclip resume with the optimizer state lining up.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import openclip_key_names
from ..core.errors import UserError
from ..models.resnet import ModifiedResNet
from ..models.text import is_text_key
from .config import TrainConfig
from .optim import _decays

__all__ = ["GroupRule", "ParamGroup", "read_group_rules", "layer_id", "tower_depth", "layer_decay_scale",
           "build_param_groups", "optimizer_groups", "format_param_groups", "group_lrs"]

_RULE_KEYS = {"pattern", "regex", "lr", "lr_scale", "wd", "wd_scale"}


@dataclass(frozen=True)
class GroupRule:
    """One entry of a ``--param-groups`` file (``number`` counts from 1, as a person reads the file)."""

    number: int
    pattern: str
    is_regex: bool = False
    lr: float | None = None
    lr_scale: float | None = None
    wd: float | None = None
    wd_scale: float | None = None

    def matches(self, name: str) -> bool:
        if self.is_regex:
            return re.search(self.pattern, name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        return f"rule {self.number} ({'regex' if self.is_regex else 'pattern'} {self.pattern!r})"


def read_group_rules(path: str | Path) -> list[GroupRule]:
    """The rules of a ``--param-groups`` YAML or JSON file; a malformed one is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--param-groups {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as error:  # (yaml and json raise their own error types)
        raise UserError(f"--param-groups {path} cannot be read as {'YAML' if path.suffix != '.json' else 'JSON'}: "
                        f"{str(error).splitlines()[0]}") from error
    if not isinstance(raw, list) or not raw:
        raise UserError(f"--param-groups {path} must hold a non-empty list of rules such as "
                        f"[{{pattern: 'visual.*', lr_scale: 0.1}}]")
    return [_rule(path, number, entry) for number, entry in enumerate(raw, start=1)]


def _rule(path: Path, number: int, entry: Any) -> GroupRule:
    where = f"--param-groups {path}, rule {number}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping like {{pattern: 'visual.*', lr_scale: 0.1}}, got {entry!r}")
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_RULE_KEYS))}")
    if ("pattern" in entry) == ("regex" in entry):
        raise UserError(f"{where}: give exactly one of 'pattern' (a glob) and 'regex'")
    for absolute, scale in (("lr", "lr_scale"), ("wd", "wd_scale")):
        if absolute in entry and scale in entry:
            raise UserError(f"{where}: give '{absolute}' or '{scale}', not both")
    if not any(k in entry for k in ("lr", "lr_scale", "wd", "wd_scale")):
        raise UserError(f"{where}: sets nothing; give one of lr, lr_scale, wd, wd_scale")
    numbers = {}
    for key in ("lr", "lr_scale", "wd", "wd_scale"):
        if key in entry:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"{where}: {key} must be a number of at least 0, got {value!r}")
            numbers[key] = float(value)
    is_regex = "regex" in entry
    pattern = entry["regex" if is_regex else "pattern"]
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{where}: the pattern must be a non-empty string, got {pattern!r}")
    if is_regex:
        try:
            re.compile(pattern)
        except re.error as error:
            raise UserError(f"{where}: {pattern!r} is not a valid regular expression ({error})") from error
    return GroupRule(number, pattern, is_regex, **numbers)


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer parameter group, as data."""

    name: str
    lr: float
    weight_decay: float
    param_names: tuple[str, ...]
    num_params: int

    def to_dict(self) -> dict[str, Any]:
        """What ``config.json`` and the checkpoints keep (the names are left out: they are the model's)."""
        return {"name": self.name, "tensors": len(self.param_names), "params": self.num_params, "lr": self.lr,
                "weight_decay": self.weight_decay}


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def _tower(name: str) -> str:
    if name.startswith("visual."):
        return "image"
    return "text" if is_text_key(name) else "other"


def tower_depth(model: nn.Module, tower: str) -> int:
    """``L``, the number of layers a tower decays over: its transformer blocks, or a ResNet's 4 stages."""
    if tower == "image":
        visual = model.visual
        return len(visual.lock_groups()) - 2 if isinstance(visual, ModifiedResNet) else len(visual.transformer.resblocks)
    return len(model.transformer.resblocks)


_EMBEDDINGS = {"image": ("conv1.", "class_embedding", "positional_embedding", "ln_pre."),
               "text": ("token_embedding.", "positional_embedding")}
_RESNET_STEM = ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3.")


def layer_id(name: str, depth: int, resnet: bool = False) -> int:
    """The layer of a parameter within its tower (the BEiT/MAE ``get_layer_id_for_vit``, both towers):
    0 for the embeddings, ``k + 1`` for block ``k``, ``depth + 1`` for the final LayerNorm and projection.
    A ResNet: 0 for the stem, ``n`` for stage ``layer{n}``, ``depth + 1`` for the attention pool."""
    tower = _tower(name)
    local = name[len("visual."):] if tower == "image" else name
    if tower == "image" and resnet:
        if local.startswith(_RESNET_STEM):
            return 0
        match = re.match(r"layer(\d+)\.", local)
        return int(match.group(1)) if match else depth + 1
    if local.startswith(_EMBEDDINGS.get(tower, ())):
        return 0
    match = re.match(r"transformer\.resblocks\.(\d+)\.", local)
    return int(match.group(1)) + 1 if match else depth + 1


def layer_decay_scale(decay: float, layer: int, depth: int) -> float:
    """``decay ** (depth + 1 - layer)``: the layer-wise lr decay of BEiT (Bao et al. 2021,
    unilm/beit/optim_factory.py) as MAE's ``param_groups_lrd`` writes it (facebookresearch/mae
    util/lr_decay.py: ``layer_scales = [decay ** (num_layers - i)]`` with ``num_layers = blocks + 1``), also
    timm's and OpenCLIP-fine-tuning's: the head at scale 1, block k at ``decay ** (depth - k)``, the
    embeddings at ``decay ** (depth + 1)``."""
    return decay ** (depth + 1 - layer)


def _layer_label(layer: int, depth: int, resnet: bool) -> str:
    if layer == 0:
        return "stem" if resnet else "embed"
    if layer == depth + 1:
        return "head"
    return f"stage{layer}" if resnet else f"block{layer - 1}"


# ---------------------------------------------------------------------------------------------
# The groups


def _canonical_names(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` with wrapper prefixes (DDP's ``module.``, compile's ``_orig_mod.``) removed."""
    named = list(model.named_parameters())
    canonical = openclip_key_names([n for n, _ in named])
    return [(canonical[n] or n, p) for n, p in named]


def build_param_groups(model: nn.Module, cfg: TrainConfig, rules: list[GroupRule] | None = None) -> list[ParamGroup]:
    """The parameter groups of ``model``'s trainable parameters under ``cfg`` (see the module doc).

    ``rules``: those of ``cfg.param_groups`` read already (default: read the file it names, if any).
    Groups come in the order their first parameter appears, each with its decaying matrices first."""
    if rules is None:
        rules = read_group_rules(cfg.param_groups) if cfg.param_groups else []
    named = _canonical_names(model)
    _check_rules_match(rules, [n for n, _ in named])
    per_tower = cfg.lr_image is not None or cfg.lr_text is not None or cfg.layer_decay is not None
    tower_lr = {"image": cfg.lr if cfg.lr_image is None else cfg.lr_image,
                "text": cfg.lr if cfg.lr_text is None else cfg.lr_text, "other": cfg.lr}
    resnet = isinstance(getattr(model, "visual", None), ModifiedResNet)
    depths = {tower: tower_depth(model, tower) for tower in ("image", "text")} if cfg.layer_decay is not None else {}

    entries: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        tower = _tower(name)
        labels, lr = [tower] if per_tower else [], tower_lr[tower]
        if cfg.layer_decay is not None and tower != "other":
            layer = layer_id(name, depths[tower], resnet)
            labels.append(_layer_label(layer, depths[tower], resnet and tower == "image"))
            lr *= layer_decay_scale(cfg.layer_decay, layer, depths[tower])
        decays = _decays(name, param)
        wd = cfg.wd
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is not None:
            labels.append(f"rule{rule.number}")
            lr = rule.lr if rule.lr is not None else lr * (1.0 if rule.lr_scale is None else rule.lr_scale)
            wd = rule.wd if rule.wd is not None else wd * (1.0 if rule.wd_scale is None else rule.wd_scale)
        label = ".".join(labels) or "all"
        entry = entries.setdefault((label, decays), {"lr": lr, "wd": wd if decays else 0.0, "names": [], "numel": 0,
                                                     "first": len(entries)})
        entry["names"].append(name)
        entry["numel"] += param.numel()
    # Labels in order of appearance; within a label the decaying group first (the two groups of before).
    first_seen: dict[str, int] = {}
    for (label, _), entry in entries.items():
        first_seen.setdefault(label, entry["first"])
    order = sorted(entries, key=lambda key: (first_seen[key[0]], not key[1]))
    return [ParamGroup(label if decays else f"{label}.no_wd", entries[(label, decays)]["lr"],
                       entries[(label, decays)]["wd"], tuple(entries[(label, decays)]["names"]),
                       entries[(label, decays)]["numel"]) for label, decays in order]


def _check_rules_match(rules: list[GroupRule], names: list[str]) -> None:
    """A rule that matches no parameter at all (frozen ones included) is almost surely a typo."""
    for rule in rules:
        if not any(rule.matches(name) for name in names):
            examples = ", ".join(n for n in names if n.startswith(("visual.transformer.resblocks.0.", "text_projection"))
                                 or n in ("token_embedding.weight", "logit_scale"))
            raise UserError(f"--param-groups: {rule.describe()} matches no parameter of this model; names look like "
                            f"{examples}")


def optimizer_groups(model: nn.Module, groups: list[ParamGroup]) -> list[dict[str, Any]]:
    """The groups as ``torch.optim`` takes them: ``{"params", "lr", "weight_decay", "name"}`` dicts."""
    by_name = dict(_canonical_names(model))
    return [{"params": [by_name[n] for n in group.param_names], "lr": group.lr, "weight_decay": group.weight_decay,
             "name": group.name} for group in groups]


def format_param_groups(groups: list[ParamGroup]) -> str:
    """A short table for the start-up banner: one row per group name (its decaying and no-decay halves
    together, they share the lr), with the number of tensors and parameters, the lr and the weight decay."""
    rows: dict[str, list] = {}
    for group in groups:
        label = group.name.removesuffix(".no_wd")
        row = rows.setdefault(label, [0, 0, group.lr, set()])
        row[0] += len(group.param_names)
        row[1] += group.num_params
        if not group.name.endswith(".no_wd"):
            row[3].add(group.weight_decay)
    towers = list(dict.fromkeys(label.split(".")[0] for label in rows))
    rows = dict(sorted(rows.items(), key=lambda item: (towers.index(item[0].split(".")[0]), _layer_rank(item[0]))))
    width = max(len("group"), *(len(label) for label in rows))
    lines = [f"parameter groups: {len(groups)} (gains, biases, embeddings, logit_scale: no weight decay)",
             f"  {'group':<{width}}  {'tensors':>7}  {'params':>10}  {'lr':>9}  {'wd':>6}"]
    for label, (tensors, params, lr, wds) in rows.items():
        wd = "/".join(f"{w:g}" for w in sorted(wds)) if wds else "0"
        lines.append(f"  {label:<{width}}  {tensors:>7}  {params:>10,}  {lr:>9.2e}  {wd:>6}")
    return "\n".join(lines)


def _layer_rank(label: str) -> int:
    """Where a group's layer sits in its tower (embeddings first, head last), for the table's order."""
    parts = label.split(".")
    layer = parts[1] if len(parts) > 1 else ""
    if layer == "head":
        return 1 << 30
    number = re.search(r"\d+$", layer)
    return int(number.group()) + 1 if number and layer.startswith(("block", "stage")) else 0


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each named group's current lr (what the schedule made of it)."""
    return {group.get("name", str(index)): group["lr"] for index, group in enumerate(optimizer.param_groups)}
