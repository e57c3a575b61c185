"""Score heads: small models applied to the normalised image embeddings of ``ldmclip embed`` (``--head
NAME=FILE``), each giving one float32 column NAME, e.g. an aesthetic score.

Two state-dict layouts are read, their layer sizes taken from the tensors (no config file):

* a single linear layer: ``weight`` [1, D] and ``bias`` [1] (LAION's linear aesthetic head on ViT-L/14,
  ``sa_0_4_vit_l_14_linear.pth``: 768 -> 1);
* a stack of linear layers keyed ``layers.N.weight`` / ``layers.N.bias``, the ``nn.Sequential`` of LAION's
  improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, class ``MLP`` in
  ``simple_inference.py``: Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
  Dropout(0.1), Linear(64, 16), Linear(16, 1), with its ReLUs commented out, so no activation between
  the layers). The indices between the linear layers are its Dropouts, identities at inference.

Files are ``.safetensors`` or pickled ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``
(nothing in a file can run code); a ``{"state_dict": ...}`` wrapper is unwrapped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..core.errors import UserError
from ..core.files import tensors_sha256

__all__ = ["load_head", "head_identity", "parse_head_option", "check_head", "head_input_width", "HEAD_NAME_RE", "BUILTIN_COLUMNS"]

HEAD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a name ``ldmclip filter --where`` can use
BUILTIN_COLUMNS = ("key", "caption", "clip_score", "width", "height", "shard")  # the metadata's own columns
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def parse_head_option(text: str) -> tuple[str, str]:
    """``"aesthetic=sac+logos+ava1-l14-linearMSE.pth"`` -> ``("aesthetic", "sac+logos+...pth")``."""
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise UserError(f"--head {text!r}: write it NAME=FILE, e.g. --head aesthetic=aesthetic-head.safetensors")
    if not HEAD_NAME_RE.match(name):
        raise UserError(f"--head {text!r}: the name {name!r} must be letters, digits and _ (not starting with a "
                        "digit), so that ldmclip filter --where can use it as a column")
    return name, path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"head file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise UserError(f"cannot read the head {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "give a .safetensors file or a .pth/.pt state dict") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"the head {path} is not a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, where: str) -> nn.Linear:
    if weight.dim() != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
        raise UserError(f"{where}: a linear layer needs weight [out, in] and bias [out], got "
                        f"{list(weight.shape)} and {None if bias is None else list(bias.shape)}")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer


def load_head(path: str | os.PathLike) -> nn.Module:
    """The head in ``path`` as an ``nn.Module`` (float32, eval mode) mapping [B, D] to [B, 1]; see the
    module docs for the layouts. Anything else is a ``UserError`` naming the keys found."""
    path = Path(path)
    state = _read_state_dict(path)
    if set(state) <= {"weight", "bias"} and "weight" in state:
        head: nn.Module = _linear(state["weight"], state.get("bias"), str(path))
    else:
        head = _sequential(state, path)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise UserError(f"the head {path} has a layer of {a.out_features} outputs followed by one of "
                            f"{b.in_features} inputs")
    if linears[-1].out_features != 1:
        raise UserError(f"the head {path} gives {linears[-1].out_features} values per image; a head column "
                        "needs exactly one (a score)")
    return head.eval()


def _sequential(state: Mapping[str, torch.Tensor], path: Path) -> nn.Sequential:
    indices: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            shown = ", ".join(sorted(state)[:6])
            raise UserError(f"the head {path} has keys this reader does not know ({shown}); a head is a single "
                            "Linear (weight, bias) or a stack keyed layers.N.weight / layers.N.bias")
        indices.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    modules: list[nn.Module] = []
    for index in range(max(indices) + 1):
        if index in indices:
            if "weight" not in indices[index]:
                raise UserError(f"the head {path} has layers.{index}.bias without layers.{index}.weight")
            modules.append(_linear(indices[index]["weight"], indices[index].get("bias"), f"{path} layers.{index}"))
        else:
            modules.append(nn.Identity())  # a Dropout in the trained model: the identity at inference
    return nn.Sequential(*modules)


def head_input_width(head: nn.Module) -> int:
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


def head_identity(head: nn.Module) -> dict[str, object]:
    """What the manifest records of a head: its layer sizes and a hash of its weights (not its path,
    which may differ between runs that give the same scores)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    return {"layers": sizes, "sha256": tensors_sha256(head.state_dict())}


def check_head(name: str, head: nn.Module, embed_dim: int, taken: set[str]) -> None:
    """Refuse a head that cannot score this model's embeddings, or whose column name is taken."""
    if name in BUILTIN_COLUMNS or name in taken:
        what = "a built-in column" if name in BUILTIN_COLUMNS else "another head's column"
        raise UserError(f"--head {name}: {name!r} is {what} ({', '.join(BUILTIN_COLUMNS)} are built in); "
                        "give the head another name")
    width = head_input_width(head)
    if width != embed_dim:
        raise UserError(f"--head {name}: the head takes {width}-wide embeddings, but the model's embeddings are "
                        f"{embed_dim}-wide; use the head made for this model (e.g. a ViT-L/14 head needs ViT-L-14)")

