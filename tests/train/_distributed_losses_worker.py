"""Run by tests/train/test_distributed.py under torchrun with 2 gloo processes (not a test module).

Each rank holds its slice of a global batch; the distributed losses' value and gradients, after
the averaging DDP does, must equal the single-process loss on the whole global batch. Prints one
line "OK <name> <errors>" per loss on rank 0, or raises.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ldmclip.losses import ClipLoss, SigLipLoss


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def check(name: str, make_loss, with_bias: bool, rank: int, world: int) -> None:
    n, dim = 5, 16
    generator = torch.Generator().manual_seed(11)
    images = F.normalize(torch.randn(world * n, dim, generator=generator), dim=-1)
    texts = F.normalize(images + 0.7 * torch.randn(world * n, dim, generator=generator), dim=-1)
    scale = torch.tensor(7.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True) if with_bias else None

    # single process, whole global batch (every rank computes it, for reference)
    ref_images, ref_texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    ref_loss = make_loss(0, 1)(ref_images, ref_texts, scale, bias)
    ref_loss.backward()
    ref_scale_grad = scale.grad.clone()
    ref_bias_grad = bias.grad.clone() if with_bias else None
    scale.grad = None
    if with_bias:
        bias.grad = None

    # distributed: this rank's slice
    rows = slice(rank * n, (rank + 1) * n)
    local_images = images[rows].clone().requires_grad_()
    local_texts = texts[rows].clone().requires_grad_()
    loss = make_loss(rank, world)(local_images, local_texts, scale, bias)
    loss.backward()
    # what DDP does to parameter gradients: average over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    scale_grad = scale.grad.clone()
    dist.all_reduce(scale_grad)
    scale_grad /= world
    errors = {
        "loss": relative_error(mean_loss, ref_loss.detach()),
        # a feature's gradient reaches the parameters of its own rank only, then is averaged: /world
        "image_grad": relative_error(local_images.grad / world, ref_images.grad[rows]),
        "text_grad": relative_error(local_texts.grad / world, ref_texts.grad[rows]),
        "scale_grad": relative_error(scale_grad, ref_scale_grad),
    }
    if with_bias:
        bias_grad = bias.grad.clone()
        dist.all_reduce(bias_grad)
        errors["bias_grad"] = float((bias_grad / world - ref_bias_grad).abs())
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    if bad:
        raise AssertionError(f"rank {rank}: {name}: {bad}")
    if rank == 0:
        print(f"OK {name} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_default_dtype(torch.float64)  # compare math, not rounding
    check("clip", lambda r, w: ClipLoss(rank=r, world_size=w), False, rank, world)
    check("clip_bias", lambda r, w: ClipLoss(rank=r, world_size=w), True, rank, world)
    check("tiled", lambda r, w: ClipLoss(tile_size=3, rank=r, world_size=w), False, rank, world)
    check("tiled_bias", lambda r, w: ClipLoss(tile_size=4, rank=r, world_size=w), True, rank, world)
    check("siglip", lambda r, w: SigLipLoss(rank=r, world_size=w), True, rank, world)

    # shards are split by the process group's rank when it is initialised
    from ldmclip.data.shards import ShardDataset

    assert ShardDataset("unused-{000..003}.tar", None).node_info() == (rank, world)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
