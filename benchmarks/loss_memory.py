"""Peak memory and time of one CLIP-loss forward+backward: ldmclip tiled vs ldmclip dense vs OpenCLIP.

    python benchmarks/loss_memory.py [--quick] [--json out.json] [--dtype float32|bfloat16|float16]
                                     [--sizes 4096 8192 ...] [--dim 512] [--tile-size 1024] [--repeats 3]
                                     [--threads N] [--device cpu|cuda]

Measurements run in fresh Python subprocesses, so peak-memory counters start clean. On CPU (one
process per case and repeat) the process's resident-set high-water mark is reset once the inputs
exist (``/proc/self/clear_refs``), and the peak is the mark after the forward+backward minus the RSS
at the reset. (``ru_maxrss`` alone cannot do this: a child inherits its parent's high-water mark
across fork and exec, so under a parent that once held a large model every loss read 0 MB.) Where
the reset is not possible the peak falls back to the ``ru_maxrss`` growth. On CUDA (one process per
case, the counter reset before each repeat) it is ``torch.cuda.max_memory_allocated()`` minus the memory allocated once the inputs
exist. Each process first runs a small warm-up pass (N ≤ 1024) that is not measured. Both
measures include the gradients of the two feature matrices (``2·N·D`` values), which every
implementation has to produce. The table reports medians over repeats. A dense case whose
``N×N`` buffers would not fit in the memory available is skipped, with the estimate it was
skipped for. On a shared CPU machine, ``--threads 1`` makes timings far less sensitive to other
jobs (two spinning OpenMP threads compete badly with them).

``run(quick, sizes=[256], ...)`` is the same benchmark as a function returning one dict per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

IMPLS = ("ldmclip-tiled", "ldmclip-dense", "openclip")
FULL_SIZES = (4096, 8192, 16384, 32768)
QUICK_SIZES = (4096, 8192)
DEFAULT_DIM = 512
DEFAULT_TILE = 1024
# N×N buffers (in the logits' dtype) alive at the peak of forward+backward: the logits, the
# log-softmax outputs saved for backward, and the gradients built from them. Measured with this
# script on CPU fp32 as peak / (N²·4): 4.02 (ldmclip dense) and 4.08 (OpenCLIP) at N=8192.
DENSE_NN_BUFFERS = {"ldmclip-dense": 4.0, "openclip": 4.1}
# Run a dense case only if its estimate is below this fraction of the memory available now: the
# estimate is rough, and the machine may be shared with other jobs.
MEMORY_HEADROOM = 0.7

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import run_child, write_json  # noqa: E402


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _itemsize(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype_name]


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_estimate_bytes(impl: str, n: int, dtype_name: str = "float32") -> int:
    """Rough peak of a dense loss: its N×N buffers (features and their grads are negligible)."""
    return int(DENSE_NN_BUFFERS[impl] * n * n * _itemsize(dtype_name))


def _make_loss(impl: str, tile_size: int):
    if impl == "ldmclip-tiled":
        from ldmclip.losses import ClipLoss
        return ClipLoss(tile_size=tile_size)
    if impl == "ldmclip-dense":
        from ldmclip.losses import ClipLoss
        return ClipLoss()
    if impl == "openclip":
        from open_clip.loss import ClipLoss
        return ClipLoss()
    raise ValueError(f"unknown implementation {impl!r}; valid: {', '.join(IMPLS)}")


def _normalised_features(n: int, d: int, dtype, device, generator, chunk: int = 4096):
    """Random L2-normalised [n, d] features, written chunk by chunk so that making them does not
    raise the memory high-water mark above what they occupy."""
    import torch
    out = torch.empty(n, d, dtype=dtype, device=device)
    for i0 in range(0, n, chunk):
        x = torch.randn(min(chunk, n - i0), d, generator=generator)
        out[i0:i0 + chunk] = torch.nn.functional.normalize(x, dim=-1).to(dtype)
    return out.requires_grad_()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> int:
    """This process's RSS high-water mark in bytes (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux ``clear_refs`` value 5) and return it;
    where the reset is not allowed the mark stays, and its growth is what gets measured. Read through
    :func:`_peak_rss`, like the peak after the pass, so both ends use the same counter."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _peak_rss()


def measure(impl: str, n: int, d: int, dtype_name: str, tile_size: int, device: str, iters: int = 1,
            threads: int | None = None) -> dict:
    """``iters`` forward+backward passes in this process: {'peak_bytes': [...], 'time_s': [...], 'loss'}.

    On CPU only the first pass's memory is meaningful, and only in a fresh process
    (``ru_maxrss`` never goes down); on CUDA the peak counter is reset before every pass."""
    import gc

    import torch
    if threads:
        torch.set_num_threads(threads)
    dtype = _dtype(dtype_name)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    loss_fn = _make_loss(impl, tile_size)
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)

    # Warm-up (thread pools, matmul kernels for the tile shapes) so first-call costs are not
    # measured; its N×N buffers are at most 1024² and stay below the measured run's peak.
    small = min(n, 1024)
    w = loss_fn(_normalised_features(small, d, dtype, dev, gen), _normalised_features(small, d, dtype, dev, gen),
                scale)
    w.backward()
    del w

    image = _normalised_features(n, d, dtype, dev, gen)
    text = _normalised_features(n, d, dtype, dev, gen)
    peaks, times = [], []
    for _ in range(iters):
        image.grad = text.grad = scale.grad = None
        gc.collect()
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = _reset_peak_rss()

        start = time.perf_counter()
        loss = loss_fn(image, text, scale)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)

        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        else:
            peaks.append(_peak_rss() - base)
        loss = float(loss.detach())
    return {"peak_bytes": peaks, "time_s": times, "loss": loss}


def _measure_in_subprocess(impl, n, d, dtype_name, tile_size, device, iters=1, threads=None) -> dict:
    return run_child(__file__, {"impl": impl, "n": n, "d": d, "dtype": dtype_name, "tile_size": tile_size,
                                "device": device, "iters": iters, "threads": threads})


def run(quick: bool = False, sizes=None, *, dim: int = DEFAULT_DIM, dtype: str = "float32",
        tile_size: int = DEFAULT_TILE, repeats: int | None = None, impls=IMPLS, device: str | None = None,
        isolate: bool = True, threads: int | None = None, verbose: bool = False) -> list[dict]:
    """Run the benchmark; one dict per (N, implementation).

    ``sizes`` overrides the N list (``quick``: 4096, 8192; else up to 32768); ``repeats`` defaults
    to 1 with ``quick`` and 3 otherwise. ``isolate=False`` measures in this process (times are
    fine, memory numbers are not: use it for smoke tests only). ``threads`` sets
    ``torch.set_num_threads`` in the measuring processes (CPU).
    """
    sizes = list(sizes if sizes is not None else (QUICK_SIZES if quick else FULL_SIZES))
    repeats = repeats if repeats is not None else (1 if quick else 3)
    device = device or _default_device()
    tile_size = int(tile_size)
    rows = []
    for n in sizes:
        for impl in impls:
            row = {"impl": impl, "n": n, "d": dim, "dtype": dtype, "device": device,
                   "tile_size": tile_size if impl == "ldmclip-tiled" else None, "repeats": 0,
                   "status": "ok", "peak_bytes": None, "time_s": None, "note": ""}
            if impl in DENSE_NN_BUFFERS:
                need, avail = dense_estimate_bytes(impl, n, dtype), _available_bytes(device)
                if need > MEMORY_HEADROOM * avail:
                    row.update(status="skipped", note=f"skipped: needs ~{need / 2**30:.1f} GB (limit "
                                                      f"{MEMORY_HEADROOM * avail / 2**30:.1f} GB = "
                                                      f"{MEMORY_HEADROOM:.0%} of {avail / 2**30:.1f} GB available)")
                    rows.append(row)
                    if verbose:
                        print(f"  N={n:6d} {impl:14s} {row['note']}", file=sys.stderr, flush=True)
                    continue
            peaks, times, losses = [], [], []
            try:
                if device.startswith("cuda"):  # the CUDA peak counter resets: one process per case
                    measure_case = _measure_in_subprocess if isolate else measure
                    r = measure_case(impl, n, dim, dtype, tile_size, device, iters=repeats, threads=threads)
                    peaks, times, losses = r["peak_bytes"], r["time_s"], [r["loss"]]
                else:  # ru_maxrss only grows: one fresh process per repeat
                    for _ in range(repeats):
                        if isolate:
                            r = _measure_in_subprocess(impl, n, dim, dtype, tile_size, device, threads=threads)
                        else:
                            r = measure(impl, n, dim, dtype, tile_size, device, threads=threads)
                        peaks.append(r["peak_bytes"][0])
                        times.append(r["time_s"][0])
                        losses.append(r["loss"])
            except Exception as exc:  # keep going: one failed case should not lose the others
                row.update(status="failed", note=f"failed: {exc}")
            if peaks:
                row.update(repeats=len(peaks), peak_bytes=int(statistics.median(peaks)),
                           time_s=statistics.median(times), peak_bytes_all=peaks, time_s_all=times,
                           loss=losses[0])
            if verbose:
                shown = (f"{row['peak_bytes'] / 2**20:9.1f} MB {row['time_s']:8.3f} s" if peaks else row["note"])
                print(f"  N={n:6d} {impl:14s} {shown}", file=sys.stderr, flush=True)
            rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    by_key = {(r["n"], r["impl"]): r for r in rows}
    for r in rows:
        for ref in ("ldmclip-dense", "openclip"):
            other = by_key.get((r["n"], ref))
            ok = r["peak_bytes"] is not None and other is not None and other["peak_bytes"] is not None
            tag = "dense" if ref == "ldmclip-dense" else "openclip"
            mem_ok, time_ok = ok and other["peak_bytes"] > 0, ok and other["time_s"] > 0
            r[f"mem_ratio_vs_{tag}"] = r["peak_bytes"] / other["peak_bytes"] if mem_ok else None
            r[f"time_ratio_vs_{tag}"] = r["time_s"] / other["time_s"] if time_ok else None


def format_table(rows: list[dict]) -> str:
    header = (f"{'N':>6} {'implementation':<15} {'peak MB':>10} {'time s':>9} "
              f"{'mem/dense':>10} {'time/dense':>11} {'mem/openclip':>13} {'time/openclip':>14}  note")
    lines = [header, "-" * len(header)]

    def ratio(x):
        return f"{x:.3f}" if x is not None else "-"

    for r in rows:
        mem = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
        tim = f"{r['time_s']:.3f}" if r["time_s"] is not None else "-"
        name = r["impl"] + (f" k={r['tile_size']}" if r["tile_size"] else "")
        lines.append(f"{r['n']:>6} {name:<15} {mem:>10} {tim:>9} {ratio(r['mem_ratio_vs_dense']):>10} "
                     f"{ratio(r['time_ratio_vs_dense']):>11} {ratio(r['mem_ratio_vs_openclip']):>13} "
                     f"{ratio(r['time_ratio_vs_openclip']):>14}  {r['note']}")
    return "\n".join(lines)


def _environment(device: str) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "loadavg_1_5_15": os.getloadavg()}  # other jobs on the machine make CPU timings noisy
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import open_clip
        env["open_clip"] = open_clip.__version__
    except Exception:  # pragma: no cover - reference missing
        env["open_clip"] = None
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N up to 8192, 1 repeat")
    p.add_argument("--json", help="also write the results here ('-': standard output)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sizes", type=int, nargs="+", help="N values (overrides --quick's)")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM)
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE)
    p.add_argument("--repeats", type=int)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads in the measuring processes (default: torch's)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        spec = json.loads(args._child)
        print(json.dumps(measure(spec["impl"], spec["n"], spec["d"], spec["dtype"], spec["tile_size"],
                                 spec["device"], iters=spec.get("iters", 1), threads=spec.get("threads"))))
        return 0

    device = args.device or _default_device()
    started = time.perf_counter()
    rows = run(args.quick, args.sizes, dim=args.dim, dtype=args.dtype, tile_size=args.tile_size,
               repeats=args.repeats, impls=args.impls, device=device, threads=args.threads, verbose=True)
    env = _environment(device)
    if args.threads:
        env["cpu_threads"] = args.threads
    where = env.get("gpu") or f"{env['cpu_threads']} CPU threads"
    print(f"CLIP loss forward+backward, D={args.dim}, {args.dtype}, {device} ({where}), torch {env['torch']}, "
          f"open_clip {env['open_clip']}; median of {args.repeats or (1 if args.quick else 3)} run(s); "
          f"total {time.perf_counter() - started:.0f} s")
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
