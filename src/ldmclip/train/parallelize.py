"""Ways of running a model that the model itself knows nothing about.

Each function takes a model and changes how it runs (the torchtitan way); the trainer composes
them in this order: lock towers → activation checkpointing → compile → DDP or FSDP2.

The trainer runs the model only through ``model(images, tokens)`` (``CLIP.forward``: normalised
features, ``logit_scale.exp()`` and ``logit_bias``), the one entry point DDP and FSDP2 hook into.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import UserError
from ..models.layers import ResidualAttentionBlock, Transformer, keep_in_eval_mode
from ..models.resnet import Bottleneck, ModifiedResNet
from ..models.text import is_text_key


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each residual block's activations in backward instead of storing them: the
    transformer blocks of both towers and the bottleneck blocks of a ResNet image tower.

    Sets the ``grad_checkpointing`` flag of every transformer stack and ResNet tower (the one mechanism,
    also behind OpenCLIP's ``model.set_grad_checkpointing()``), so module names and state-dict keys do not change
    (checkpoints stay loadable with and without this option).
    """
    for module in model.modules():
        if isinstance(module, (Transformer, ModifiedResNet)):
            module.grad_checkpointing = True
    return model


def apply_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Under DDP, BatchNorm over the global batch (``SyncBatchNorm``: statistics all-reduced in each
    forward) instead of each process's own batch. The modules are swapped in place with the same
    parameters and buffers, so the state-dict keys are unchanged; a model without BatchNorm (a ViT)
    is returned as it is. PyTorch's DDP runs SyncBatchNorm on GPUs only."""
    if device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA devices (PyTorch's DDP runs SyncBatchNorm on GPUs only; this run "
                        f"is on {device.type}); leave it out for each process's own batch statistics")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def lock_tower(tower: nn.Module) -> None:
    """Freeze a tower (LiT: Zhai et al. 2022): no gradients, no updates, and eval mode (no dropout,
    no patch dropout) that stays on when the model around it is put back in ``train()`` mode."""
    for param in tower.parameters():
        param.requires_grad_(False)
    keep_in_eval_mode(tower)


def lock_text_tower(model: nn.Module) -> None:
    """Freeze the text tower of a CLIP (every parameter outside ``visual`` but the logit scale and
    bias); its modules run in eval mode, as :func:`lock_tower`'s."""
    for name, param in model.named_parameters():
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
            param.requires_grad_(False)
    for name, child in model.named_children():
        if name != "visual":
            keep_in_eval_mode(child)


def lock_towers(model: nn.Module, lock_image: bool = False, lock_text: bool = False, image_unlocked_groups: int = 0,
                text_unlocked_layers: int = 0) -> None:
    """``--lock-image`` / ``--lock-text`` with OpenCLIP's partial unlocking: a tower locked whole runs in
    eval mode (:func:`lock_tower`, :func:`lock_text_tower`); with N unlocked groups (which implies the
    lock) only ``requires_grad`` changes, through the model's own ``lock_image_tower(unlocked_groups)`` /
    ``lock_text_tower(unlocked_layers)``, as OpenCLIP 3.3.0's trainer calls them."""
    if image_unlocked_groups > 0:
        model.lock_image_tower(unlocked_groups=image_unlocked_groups)
    elif lock_image:
        lock_tower(model.visual)
    if text_unlocked_layers > 0:
        model.lock_text_tower(unlocked_layers=text_unlocked_layers)
    elif lock_text:
        lock_text_tower(model)


def frozen_towers(model: nn.Module) -> tuple[bool, bool]:
    """(image tower frozen, text tower frozen): whether no parameter of the tower trains, so that the
    step need not back-propagate into its features."""
    image = not any(p.requires_grad for p in model.visual.parameters())
    text = not any(p.requires_grad for n, p in model.named_parameters() if is_text_key(n))
    return image, text


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each residual block (small graphs compile fast and are reused across layers)."""
    for module in list(model.modules()):
        blocks = getattr(module, "resblocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile()
    return model


# ---------------------------------------------------------------------------------------------
# Data parallel


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Replicate the model on every process and average gradients with all-reduce (DDP).

    Parameters are broadcast from rank 0 at wrap time; gradient buckets are all-reduced while
    backward is still running. Reach the model itself with :func:`unwrap`.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters(recurse=False) if p.dim() == 0]


def apply_fsdp(model: nn.Module, mixed_precision: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard parameters, gradients and optimizer state over the processes with FSDP2 (``fully_shard``).

    Each residual block of both towers (a ResNet's bottlenecks too) is its own unit (its parameters
    are all-gathered just before it runs and freed after), then the root takes what is left
    (embeddings, projections, final norms, a ResNet's stem and attention pool). BatchNorm buffers
    are not sharded: each process normalises with its own batch's statistics and keeps its own
    running averages, and a checkpoint holds one process's copy (as under DDP without --sync-bn).
    ``mixed_precision=True`` all-gathers and computes in bf16 and reduces gradients
    in fp32 (``MixedPrecisionPolicy``); the sharded master weights and optimizer state stay fp32.

    ``fully_shard`` cannot shard 0-dim parameters, and OpenCLIP's ``logit_scale`` / ``logit_bias``
    are scalars (changing their shape would break checkpoint compatibility), so they stay
    replicated, outside FSDP, and a hook averages their gradients across processes.

    Compose after activation checkpointing and compile (compile wraps the blocks' forward; FSDP hooks
    the modules). The model is changed in place (its class becomes an ``FSDPModule``) and returned.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, Bottleneck))]
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    scalars = _scalar_parameters(model)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=set(scalars))
    world = dist.get_world_size()
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient(world))
    # Validation and zero-shot classification call the towers directly.
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    model._ldmclip_fsdp = True
    return model


def _average_gradient(world: int):
    def hook(param: torch.Tensor) -> None:
        # Linear, so also right when gradients accumulate over micro-batches: the part averaged
        # before is the same on every rank.
        dist.all_reduce(param.grad)
        param.grad.div_(world)

    return hook


def is_fsdp(model: nn.Module) -> bool:
    return bool(getattr(model, "_ldmclip_fsdp", False))


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for a backward pass that should (not) reduce gradients across processes yet.

    DDP: ``no_sync()`` while accumulating micro-batches, the reduction happens in the last one.
    FSDP2 reduce-scatters in every backward (keeping unsharded gradients around instead would cost
    the memory FSDP saves), and a single process has nothing to sync.
    """
    no_sync = getattr(model, "no_sync", None)
    if enabled or no_sync is None or is_fsdp(model):
        return contextlib.nullcontext()
    return no_sync()


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the total gradient norm to ``max_norm`` (no clipping when falsy); returns the norm before.

    With FSDP2 the gradients are shards (``DTensor``) plus the replicated scalars: the squared
    norms of the local shards are summed over processes, the replicated ones counted once.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not is_fsdp(model):
        if max_norm:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    from torch.distributed.tensor import DTensor

    sharded = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]
    replicated = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in sharded:
        total += grad.detach().double().pow(2).sum()
    dist.all_reduce(total)
    for grad in replicated:
        total += grad.detach().double().pow(2).sum()
    norm = float(total.sqrt())
    if max_norm and norm > 0 and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for grad in sharded + replicated:
                grad.mul_(coef)
    return norm
