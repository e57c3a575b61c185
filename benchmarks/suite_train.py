"""Training-step rows: samples/s of one optimisation step (forward, loss, backward, AdamW, logit-scale
clamp) with ldmclip and with OpenCLIP 3.3.0 (model + ``ClipLoss`` + AdamW, the way
``open_clip_train`` runs a step), on the same weights, images, captions and precision; and the fraction
of the machine's measured bf16 matmul rate that the ldmclip ViT-B-16 step reaches."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from .common import Profile, Row, check, close_check, find_flickr8k, flickr_rows

PRECISION = "amp_bf16"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register_openclip_config(name: str) -> None:
    """Make one of ldmclip's packaged configs (e.g. the small CPU ones) known to OpenCLIP."""
    import open_clip

    from ldmclip.registry import _packaged_configs

    if name not in open_clip.list_models():
        open_clip.add_model_config(str(_packaged_configs()[name]))


def training_batch(name: str, batch: int, seed: int = 0,
                   image_size: int | None = None) -> tuple[torch.Tensor, list[str], str]:
    """``batch`` Flickr8k images (eval-transformed to the model's size) with one caption each, or
    random images with synthetic captions when Flickr8k is absent."""
    from ldmclip.registry import get_model_config
    from ldmclip.transforms import PreprocessConfig, image_transform, load_image

    size = image_size or get_model_config(name).vision_cfg.image_size
    flickr = find_flickr8k()
    if flickr is None:
        from .common import captions

        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=gen), captions(batch, None), "synthetic"
    transform = image_transform(PreprocessConfig(image_size=size), is_train=False)
    images, texts, seen = [], [], set()
    for image, caption in flickr_rows(flickr, n=batch * 5 + 5):
        if image in seen:
            continue
        seen.add(image)
        images.append(transform(load_image(flickr / "images" / image)))
        texts.append(caption)
        if len(images) == batch:
            break
    return torch.stack(images), texts, "Flickr8k"


def _openclip_param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    # open_clip_train/main.py: no weight decay on gains, biases and logit_scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


def build_pair(name: str, device: torch.device, precision: str = PRECISION, image_size: int | None = None,
               tile_size: int | None = None):
    """(ldmclip step, OpenCLIP step, ldmclip model, OpenCLIP model): same initial weights (at
    ``image_size`` when given: OpenCLIP's ``force_image_size``). ``tile_size``: ldmclip's loss is the
    exact tiled one (OpenCLIP's stays dense, as ``open_clip_train`` has no other)."""
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    import ldmclip
    from ldmclip.losses import ClipLoss, clamp_logit_scale_
    from ldmclip.train.optim import build_optimizer
    from ldmclip.train.step import contrastive_step

    torch.manual_seed(0)
    sized = {"image_size": image_size} if image_size else {}
    ours = ldmclip.create_model(name, device=device, **sized).train()
    register_openclip_config(name)
    theirs = open_clip.create_model(name, output_dict=True, force_image_size=image_size)
    theirs.load_state_dict(ours.state_dict())
    theirs = theirs.to(device).train()
    hyper = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6}
    our_opt = build_optimizer(ours, weight_decay=0.2, **hyper)
    their_opt = torch.optim.AdamW(_openclip_param_groups(theirs, 0.2), **hyper)  # as open_clip_train
    our_loss, their_loss = ClipLoss(tile_size=tile_size), OpenClipLoss()

    def our_step(images, tokens):
        loss = contrastive_step(ours, our_loss, images, tokens, precision)
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)
        clamp_logit_scale_(ours)
        return loss

    def their_step(images, tokens):
        # open_clip_train/train.py, one step without accumulation: autocast forward and loss,
        # backward, optimizer step, clamp of logit_scale.
        their_opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32"):
            out = theirs(images, tokens)
            loss = their_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        their_opt.step()
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    return our_step, their_step, ours, theirs


def parity_checks(ours, theirs, images, tokens, rtol: float = 1e-4) -> dict[str, dict]:
    """fp32, same weights, no step taken yet: features and loss of both models agree."""
    from open_clip.loss import ClipLoss as OpenClipLoss

    from ldmclip.losses import ClipLoss

    with torch.no_grad():
        a = ours(images, tokens)
        b = theirs(images, tokens)
        la = ClipLoss()(*a)
        lb = OpenClipLoss()(b["image_features"], b["text_features"], b["logit_scale"])
    return {"image_features_equal_fp32": close_check(a[0], b["image_features"], rtol),
            "text_features_equal_fp32": close_check(a[1], b["text_features"], rtol),
            "loss_equal_fp32": close_check(la, lb, rtol)}


def clip_train_flops(name: str, batch: int, text_len: int) -> float:
    """Matmul FLOPs of one training step counted from the shapes: forward (patch embedding, QKV,
    attention scores and values, output projection, MLP, projections, the B×B logits) times 3
    (backward = twice the forward). Elementwise work, LayerNorm and softmax are not counted."""
    from ldmclip.registry import get_model_config

    cfg = get_model_config(name)
    v, t, e = cfg.vision_cfg, cfg.text_cfg, cfg.embed_dim

    def tower(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
        hidden = int(width * mlp_ratio)
        per_layer = 2 * tokens * (3 * width * width + width * width + 2 * width * hidden) + 4 * tokens * tokens * width
        return layers * per_layer

    grid = (v.image_size // v.patch_size) ** 2
    vision = tower(grid + 1, v.width, v.layers, v.mlp_ratio) + 2 * grid * 3 * v.patch_size ** 2 * v.width \
        + 2 * v.width * e
    text = tower(text_len, t.width, t.layers, t.mlp_ratio) + 2 * t.width * e
    logits = 2 * 2 * batch * batch * e
    return 3.0 * (batch * (vision + text) + logits)


def matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device, repeats: int = 3) -> dict[str, Any]:
    """Best measured bf16 matmul FLOP/s over ``shapes`` ((M, K, N)); each shape timed ``repeats``
    times after a warm-up, the fastest kept (the machine's attainable rate)."""
    results = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        torch.mm(a, b)
        _sync(device)
        iters = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP per timing
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * m * k * n * iters / (time.perf_counter() - start))
        results[f"{m}x{k}x{n}"] = best
    return {"flops_per_s": max(results.values()), "by_shape": results}


def _train_row(row_id: str, title: str, name: str, batch: int, steps: int, target: float | None, profile: Profile,
               with_mfu: bool, precision: str = PRECISION, image_size: int | None = None,
               tile_size: int | None = None, prepare: Callable[[Any, Any], None] | None = None) -> list[Row]:
    """One training-step row (and the MFU row when ``with_mfu``). ``prepare(ours, theirs)`` changes both
    models after the fp32 parity checks and before any timed step (``benchmarks/gpu.py``: compile,
    activation checkpointing). On CUDA each side's peak memory goes to ``extra["peak_memory_mb"]``."""
    import ldmclip

    device = _device()
    images, texts, source = training_batch(name, batch, image_size=image_size)
    tokenizer = ldmclip.get_tokenizer(name)
    tokens = tokenizer(texts)
    images, tokens = images.to(device), tokens.to(device)
    row = Row(row_id, title, "samples/s", "OpenCLIP model + ClipLoss + AdamW", target=target,
              config={"model": name, "batch": batch, "steps_per_repeat": steps,
                      "precision": "fp32" if precision == "fp32" else "bf16 autocast", "image_size": image_size,
                      "device": str(device), "captions": source, "repeats": profile.repeats,
                      **({"tile_size": tile_size} if tile_size else {})})
    our_step, their_step, ours, theirs = build_pair(name, device, precision, image_size, tile_size)
    row.checks.update(parity_checks(ours, theirs, images[:4], tokens[:4]))
    if prepare is not None:
        prepare(ours, theirs)
    del ours, theirs  # the step closures keep them
    peaks: dict[str, float] = {}

    def run(step, side: str):
        def go():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                loss = step(images, tokens)
            _sync(device)
            if device.type == "cuda":  # both models are resident: the difference is the step's own memory
                peaks[side] = max(peaks.get(side, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            return batch * steps
        return go

    from .common import interleaved

    rates = interleaved({"ours": run(our_step, "ours"), "theirs": run(their_step, "theirs")}, profile.repeats,
                        profile.warmup)
    if peaks:
        row.extra["peak_memory_mb"] = peaks
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    row.finish()
    rows = [row]
    if with_mfu:
        from ldmclip.registry import get_model_config

        cfg = get_model_config(name)
        text_len = int(tokens.argmax(dim=-1).max()) + 1  # ldmclip runs the text tower to the longest caption
        grid_tokens = (cfg.vision_cfg.image_size // cfg.vision_cfg.patch_size) ** 2 + 1
        width = cfg.vision_cfg.width
        shapes = [(profile.matmul_size,) * 3, (batch * grid_tokens, width, int(width * cfg.vision_cfg.mlp_ratio))]
        rate = matmul_rate(shapes, device)
        ours_flops = clip_train_flops(name, batch, text_len)
        theirs_flops = clip_train_flops(name, batch, cfg.text_cfg.context_length)
        ours_frac = row.ours / batch * ours_flops / rate["flops_per_s"]
        theirs_frac = row.theirs / batch * theirs_flops / rate["flops_per_s"]
        mfu = Row("train_mfu", f"{name} training step: fraction of measured bf16 matmul rate", "fraction",
                  "(machine bf16 matmul rate)", ours=ours_frac, theirs=theirs_frac, target=None,
                  config={"model": name, "batch": batch, "text_len_ldmclip": text_len,
                          "text_len_openclip": cfg.text_cfg.context_length},
                  extra={"matmul_flops_per_s": rate["flops_per_s"], "matmul_by_shape": rate["by_shape"],
                         "step_flops_ldmclip": ours_flops, "step_flops_openclip": theirs_flops,
                         "aim": 0.5, "openclip_fraction": theirs_frac},
                  note=f"aim ≥ 50%; theirs column: OpenCLIP's step (its text tower runs all "
                       f"{cfg.text_cfg.context_length} positions); matmul {rate['flops_per_s'] / 1e12:.2f} TFLOP/s")
        mfu.checks["flops_positive"] = check(ours_flops > 0 and rate["flops_per_s"] > 0)
        mfu.finish()
        mfu.status = "met" if ours_frac >= 0.5 else "missed"
        rows.append(mfu)
    return rows


def bench_train_vitb16(profile: Profile) -> list[Row]:
    name = profile.train_model
    return _train_row("train_vitb16", f"training step {name}, batch {profile.train_batch}, bf16", name,
                      profile.train_batch, profile.train_steps, 1.2, profile, with_mfu=True)


def bench_train_small(profile: Profile) -> list[Row]:
    name = profile.small_model
    return _train_row("train_small", f"training step {name}, batch {profile.small_batch}, bf16", name,
                      profile.small_batch, profile.small_steps, 2.0, profile, with_mfu=False)


def bench_train_resnet(profile: Profile) -> list[Row]:
    """RN50 (a ModifiedResNet image tower: BatchNorm in training mode) against OpenCLIP, in fp32: on
    these CPUs bf16 autocast makes the convolutions' backward slower, not faster."""
    name, size = profile.resnet_model, profile.resnet_image_size
    title = f"training step {name}{f' at {size} px' if size else ''}, batch {profile.resnet_batch}, fp32"
    return _train_row("train_resnet", title, name, profile.resnet_batch, profile.resnet_steps, None, profile,
                      with_mfu=False, precision="fp32", image_size=size)
