"""Loss rows: peak memory and time of one contrastive-loss forward+backward at N×D, ldmclip's exact
tiled loss against the dense ``ClipLoss`` (ldmclip's; OpenCLIP's in ``extra``). Measured with
``benchmarks/loss_memory.py``'s ``measure`` — in a fresh process per measurement on CPU, where the peak
is ``ru_maxrss`` — with the implementations interleaved from repeat to repeat. A dense case whose N×N
buffers would not fit in the memory available is not run; its row then compares with the estimate."""

from __future__ import annotations

import statistics

import torch

from . import loss_memory as lm
from .common import Profile, Row, check, close_check

TILE = lm.DEFAULT_TILE


def _grad_check(n: int, d: int) -> dict:
    """In-process, fp32: the tiled loss and its gradients equal the dense loss's."""
    from ldmclip.losses import ClipLoss

    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    out = []
    for loss_fn in (ClipLoss(tile_size=max(8, n // 4)), ClipLoss()):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        loss = loss_fn(x, y, scale)
        loss.backward()
        out.append((loss.detach(), x.grad, y.grad, scale.grad))
    ok = [close_check(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(*out)]
    return check(all(c["ok"] for c in ok), n=n, max_abs_diff=max(c.get("max_abs_diff", 0.0) for c in ok))


def bench_loss(profile: Profile) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, dtype = profile.loss_dim, "float32"
    measure = lm._measure_in_subprocess if profile.loss_isolate else lm.measure
    grad = _grad_check(min(512, profile.loss_sizes[0]), d)
    rows = []
    for n in profile.loss_sizes:
        impls, notes = [], []
        for impl in lm.IMPLS:
            if impl in lm.DENSE_NN_BUFFERS:
                need, avail = lm.dense_estimate_bytes(impl, n, dtype), lm._available_bytes(device)
                if need > lm.MEMORY_HEADROOM * avail:
                    notes.append(f"{impl} not run: needs ~{need / 2**30:.1f} GB, "
                                 f"{avail / 2**30:.1f} GB available")
                    continue
            impls.append(impl)
        results: dict[str, dict[str, list]] = {i: {"peak": [], "time": [], "loss": []} for i in impls}
        for rep in range(profile.repeats):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                r = measure(impl, n, d, dtype, TILE, device)
                results[impl]["peak"].append(r["peak_bytes"][0])
                results[impl]["time"].append(r["time_s"][0])
                results[impl]["loss"].append(r["loss"])
        med = {i: {"peak": statistics.median(v["peak"]), "time": statistics.median(v["time"]), "loss": v["loss"][0]}
               for i, v in results.items()}
        tiled = med["ldmclip-tiled"]
        checks = {"tiled_grads_equal_dense_fp32": grad}
        for impl in impls[1:]:
            checks[f"loss_equal_{impl}"] = close_check(torch.tensor(tiled["loss"]), torch.tensor(med[impl]["loss"]),
                                                       rtol=1e-5)
        config = {"n": n, "d": d, "dtype": dtype, "tile_size": TILE, "device": device, "repeats": profile.repeats,
                  "memory": "ru_maxrss growth in a fresh process" if device == "cpu" and profile.loss_isolate
                  else ("max_memory_allocated growth" if device != "cpu" else "in-process (smoke test: not meaningful)"),
                  "includes": "gradients of both feature matrices (2·N·D values)"}
        extra = {impl: med[impl] for impl in impls}
        if "openclip" in med:
            extra["mem_ratio_vs_openclip"] = tiled["peak"] / med["openclip"]["peak"] if med["openclip"]["peak"] else None
            extra["time_ratio_vs_openclip"] = tiled["time"] / med["openclip"]["time"]
        mem = Row(f"loss_memory_{n}", f"loss fwd+bwd N={n:,} D={d}: peak memory", "MB",
                  "dense ClipLoss (ldmclip)", target=0.1, better="lower", checks=dict(checks), config=config,
                  extra=extra, note="; ".join(notes))
        tim = Row(f"loss_time_{n}", f"loss fwd+bwd N={n:,} D={d}: time", "s", "dense ClipLoss (ldmclip)",
                  target=1.5, better="lower", checks=dict(checks), config=config, extra=extra, note="; ".join(notes))
        mem.ours_all = [p / 2**20 for p in results["ldmclip-tiled"]["peak"]]
        tim.ours_all = list(results["ldmclip-tiled"]["time"])
        if "ldmclip-dense" in results:
            mem.theirs_all = [p / 2**20 for p in results["ldmclip-dense"]["peak"]]
            tim.theirs_all = list(results["ldmclip-dense"]["time"])
        else:
            # dense does not fit: compare the memory with its estimate, and leave the time unmeasured
            mem.theirs = lm.dense_estimate_bytes("ldmclip-dense", n, dtype) / 2**20
            mem.peer = "dense ClipLoss (ldmclip), estimated: does not fit"
            tim.status = "skipped"
        rows += [mem.finish(), tim.finish()]
    return rows
