"""The GPU check: every CUDA path of ldmclip that matters, against OpenCLIP 3.3.0 and ``transformers``, in
under 10 minutes on one GPU, written as JSON and as the "GPU" table of BENCHMARKS.md.

    python benchmarks/gpu.py --json benchmarks/recorded/gpu.json --markdown -      # on a lent GPU
    python benchmarks/gpu.py --device cpu --profile tiny --json out.json           # the smoke test's run
    python benchmarks/gpu.py --list                                                # the checks and their rows
    python benchmarks/gpu.py --only train_b16_compile --json more.json             # rows the budget skipped

The rows, in the order they run (cheap and important first; ``--only`` picks checks by name):

* ``parity_b16_fp32``, ``parity_b16_bf16``, ``parity_l14_fp32``, ``parity_l14_bf16``: ViT-B-16 and ViT-L-14,
  ldmclip and OpenCLIP on the same random weights and batch: image features, text features and the loss
  (``suite_train.parity_checks``); fp32 must agree to 1e-4 of the largest value, bf16 autocast (both sides)
  to 5e-2 with every feature's cosine similarity >= 0.99. The value is the largest relative difference.
* ``train_b16`` (+ ``train_mfu``), ``train_l14``, ``train_b16_ckpt`` (activation checkpointing on both sides),
  ``train_b16_tiled`` (ldmclip's exact tiled loss against OpenCLIP's dense one, at a large batch, with
  activation checkpointing), ``train_b16_compile`` (ldmclip's per-block ``--compile`` against
  ``torch.compile`` of the whole OpenCLIP model, as ``open_clip_train --torchcompile``): samples/s of one
  bf16 training step, ``suite_train._train_row`` (fp32 parity checked first, interleaved repeats).
* ``loss_memory_N``, ``loss_time_N``: the suite's loss rows (``suite_loss.bench_loss``) at GPU sizes.
* ``conditioning``: the suite's conditioning row (``suite_text.bench_conditioning``, SD 1.x's text tower,
  against ``transformers.CLIPTextModel``).
* ``cache_text``: ``build_text_cache`` (what ``ldmclip cache-text`` runs) against a plain ``transformers``
  script (tokenize, encode each unique caption once, keep fp16 hidden states, ``numpy.save``).
* ``torchrun_ddp``, ``torchrun_fsdp``: ``torchrun -m ldmclip train`` on synthetic data for a few steps
  (nccl on CUDA, one process per GPU up to 2; gloo and 2 processes on CPU), with and without ``--fsdp``.
  Note: with ONE process ldmclip neither wraps in DDP nor shards (world size 1); the row says which it did.

Every row records its peak memory: ``torch.cuda.max_memory_allocated`` over the row on CUDA (the training
rows also per side, in ``extra.peak_memory_mb``), the process's peak RSS so far on CPU (``ru_maxrss``, which
never goes down). Each check is isolated: one that raises or overruns records ``failed`` with the error
and the next one runs. ``--budget-s`` (default 540) is the time for all of them: a check that would start
after it, or whose rough GPU estimate no longer fits, is recorded as ``skipped`` with the reason; a check
that overruns the time left is stopped (SIGALRM; a torchrun's process group is killed). The JSON and the
markdown are rewritten after every check, so a run killed from outside keeps what it had done.

``--device cpu --profile tiny`` runs every row at tiny sizes on CPU, as their CPU equivalents: bf16 parity
under CPU bf16 autocast, torchrun with gloo and 2 processes, peak RSS instead of CUDA memory. One row is
recorded as skipped with the reason "needs CUDA": ``train_b16_compile`` (torch.compile on a CPU builds C++
kernels for both libraries: minutes on a small CPU).

On a device machine of this workplace (``device`` tool): its image has torch and transformers but not
``open_clip`` (nor webdataset, ftfy): carry them as wheels (see BENCHMARKS.md, "GPU check"), put ``src/`` on
``PYTHONPATH`` (done here for this process and its children) and pass ``--commit`` (the copy there has no
``.git``). Flickr8k does not travel either: the rows then use random images and synthetic captions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # ``python benchmarks/gpu.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROFILES, REPO, Profile, Row, check, write_json  # noqa: E402

BF16_RTOL = 5e-2        # bf16 autocast: the two libraries' kernels round differently
BF16_MIN_COSINE = 0.99  # as the suite's pooled row
DEFAULT_BUDGET_S = 540.0  # a device command may run 10 minutes: leave a minute for start-up and writing


# ----------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """The sizes of every row; ``gpu`` is what BENCHMARKS.md reports, ``tiny`` the CPU smoke test."""

    name: str
    base_model: str = "ViT-B-16"
    large_model: str = "ViT-L-14"
    parity_batch: int = 16
    base_batch: int = 256
    large_batch: int = 128
    steps: int = 2                 # optimizer steps per timed repeat
    ckpt_batch: int = 512
    tiled_batch: int = 4096
    tile_size: int = 512
    loss_sizes: tuple[int, ...] = (65_536,)
    loss_dim: int = 768
    text_model: str = "ViT-L-14-quickgelu"
    cond_batch: int = 256
    cond_prompts: int = 4096
    cache_captions: int = 20_000
    cache_batch: int = 512
    torchrun_model: str = "ViT-B-16"
    torchrun_batch: int = 64
    torchrun_steps: int = 10
    repeats: int = 3
    matmul_size: int = 8192

    def suite_profile(self) -> Profile:
        """The suite's ``Profile`` carrying these sizes, for the suite's row functions."""
        base = PROFILES["tiny" if self.name == "tiny" else "full"]
        return replace(base, repeats=self.repeats, warmup=1, text_model=self.text_model, cond_batch=self.cond_batch,
                       cond_prompts=self.cond_prompts, loss_sizes=self.loss_sizes, loss_dim=self.loss_dim,
                       loss_isolate=False, matmul_size=self.matmul_size)


SIZES = {
    "gpu": Sizes("gpu"),
    "tiny": Sizes("tiny", base_model="ViT-Tiny-64", large_model="ViT-Tiny-64", parity_batch=4, base_batch=4,
                  large_batch=4, steps=1, ckpt_batch=4, tiled_batch=16, tile_size=4, loss_sizes=(256,), loss_dim=32,
                  text_model="ViT-Tiny-64", cond_batch=4, cond_prompts=8, cache_captions=32, cache_batch=8,
                  torchrun_model="ViT-Tiny-64", torchrun_batch=8, torchrun_steps=2, repeats=1, matmul_size=256),
}


def _device():
    from benchmarks.suite_train import _device as suite_device

    return suite_device()


# ----------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------

def _relative(result: dict) -> float | None:
    """max|a-b| / max|b| of a ``close_check`` result (None for a shape mismatch)."""
    if "max_abs_diff" not in result:
        return None
    return result["max_abs_diff"] / result["max_abs"] if result["max_abs"] else result["max_abs_diff"]


def _min_cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def bench_parity(which: str) -> Callable[[Sizes], list[Row]]:
    """fp32 and bf16 rows of one model: ldmclip and OpenCLIP forward on the same weights and batch."""

    def run(sizes: Sizes) -> list[Row]:
        import torch

        import ldmclip
        from benchmarks.suite_train import build_pair, parity_checks, training_batch

        name = sizes.base_model if which == "b16" else sizes.large_model
        device = _device()
        images, texts, source = training_batch(name, sizes.parity_batch)
        images, tokens = images.to(device), ldmclip.get_tokenizer(name)(texts).to(device)
        _, _, ours, theirs = build_pair(name, device, "fp32")
        ours.eval()
        theirs.eval()
        config = {"model": name, "batch": sizes.parity_batch, "device": str(device), "captions": source,
                  "weights": "random, the same on both sides"}
        rows = []
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" \
                else contextlib.nullcontext()
            with autocast:
                checks = parity_checks(ours, theirs, images, tokens, rtol=1e-4 if precision == "fp32" else BF16_RTOL)
            checks = {key.replace("_fp32", f"_{precision}"): value for key, value in checks.items()}
            if precision == "bf16":
                with torch.no_grad(), autocast:
                    a, b = ours(images, tokens), theirs(images, tokens)
                for tower, key in ((0, "image_features"), (1, "text_features")):
                    cosine = _min_cosine(a[tower], b[key])
                    checks[f"{key}_cosine_bf16"] = check(cosine >= BF16_MIN_COSINE, min_cosine=cosine)
            diffs = [d for d in (_relative(v) for k, v in checks.items() if "cosine" not in k) if d is not None]
            row = Row(f"parity_{which}_{precision}", f"{name} forward parity, {precision}"
                      f"{' autocast' if precision == 'bf16' else ''}, batch {sizes.parity_batch}",
                      "max rel. diff", "OpenCLIP 3.3.0 model (same weights)", better="lower",
                      ours=max(diffs) if diffs else None, checks=checks, config={**config, "precision": precision},
                      note="value: largest max|ldmclip - OpenCLIP| / max|OpenCLIP| over image features, text "
                           "features and loss")
            rows.append(row.finish())
        return rows

    return run


# ----------------------------------------------------------------------------------------------------
# training steps
# ----------------------------------------------------------------------------------------------------

def _checkpointing(ours, theirs) -> None:
    from ldmclip.train.parallelize import apply_activation_checkpointing

    apply_activation_checkpointing(ours)
    theirs.set_grad_checkpointing(True)


def _compiled(ours, theirs) -> None:
    from ldmclip.train.parallelize import apply_compile

    apply_compile(ours)   # what ``ldmclip train --compile`` does
    theirs.compile()      # open_clip_train --torchcompile: torch.compile of the whole model


def bench_train(kind: str) -> Callable[[Sizes], list[Row]]:
    def run(sizes: Sizes) -> list[Row]:
        from benchmarks.suite_train import _train_row

        profile = replace(sizes.suite_profile(), train_steps=sizes.steps)
        base, steps = sizes.base_model, sizes.steps
        if kind == "b16":
            return _train_row("train_b16", f"training step {base}, batch {sizes.base_batch}, bf16", base,
                              sizes.base_batch, steps, 1.2, profile, with_mfu=True)
        if kind == "l14":
            large = sizes.large_model
            return _train_row("train_l14", f"training step {large}, batch {sizes.large_batch}, bf16", large,
                              sizes.large_batch, steps, None, profile, with_mfu=False)
        if kind == "ckpt":
            return _train_row("train_b16_ckpt", f"training step {base}, batch {sizes.ckpt_batch}, bf16, activation "
                              "checkpointing (both)", base, sizes.ckpt_batch, steps, None, profile, with_mfu=False,
                              prepare=_checkpointing)
        if kind == "tiled":
            return _train_row("train_b16_tiled", f"training step {base}, batch {sizes.tiled_batch}, bf16, tiled loss "
                              f"(tile {sizes.tile_size}) vs dense, activation checkpointing (both)", base,
                              sizes.tiled_batch, 1, None, profile, with_mfu=False, tile_size=sizes.tile_size,
                              prepare=_checkpointing)
        if kind == "compile":
            return _train_row("train_b16_compile", f"training step {base}, batch {sizes.base_batch}, bf16, compiled",
                              base, sizes.base_batch, steps, None, profile, with_mfu=False, prepare=_compiled)
        raise ValueError(kind)

    return run


def bench_loss(sizes: Sizes) -> list[Row]:
    from benchmarks.suite_loss import bench_loss as suite_bench_loss

    return suite_bench_loss(sizes.suite_profile())


def bench_conditioning(sizes: Sizes) -> list[Row]:
    from benchmarks.suite_text import bench_conditioning as suite_bench_conditioning

    return suite_bench_conditioning(sizes.suite_profile())


# ----------------------------------------------------------------------------------------------------
# cache-text
# ----------------------------------------------------------------------------------------------------

def bench_cache_text(sizes: Sizes) -> list[Row]:
    """``build_text_cache`` against a plain ``transformers`` script doing the same work (each unique caption
    encoded once, fp16 hidden states kept, written to disk); both bf16 autocast, same weights."""
    import csv

    import numpy as np
    import torch
    import transformers

    import ldmclip
    from benchmarks.common import captions, find_flickr8k, interleaved
    from benchmarks.suite_text import SD1_PAD, _batches
    from benchmarks.suite_train import _sync
    from ldmclip.conditioning import TextConditioner, TextEmbeddingCache, build_text_cache
    from ldmclip.conditioning.export import export_transformers
    from ldmclip.registry import load_text_tower

    device, name, size = _device(), sizes.text_model, sizes.cache_batch
    flickr = find_flickr8k()
    texts = captions(sizes.cache_captions, flickr)
    torch.manual_seed(0)
    tower = load_text_tower(name, device=device).eval().requires_grad_(False)
    tokenizer = ldmclip.get_tokenizer(name)
    cond = TextConditioner.from_preset("sd1", tower, tokenizer).eval()
    context = tower.context_length
    shard_size = max(16, len(texts) // 4)
    row = Row("cache_text", f"cache-text {len(texts):,} captions, {name} text tower (sd1), bf16", "captions/s",
              "transformers CLIPTextModel script (unique captions, fp16, numpy.save)",
              config={"model": name, "captions": len(texts), "unique": len(set(texts)), "batch": size,
                      "shard_size": shard_size,
                      "source": "Flickr8k" if flickr else "synthetic", "device": str(device),
                      "repeats": sizes.repeats, "stored": "fp16 hidden states"})
    with tempfile.TemporaryDirectory(prefix="gpu-cache-text-") as tmp:
        work = Path(tmp)
        table = work / "captions.csv"
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "caption"])
            writer.writerows((f"k{i}", text) for i, text in enumerate(texts))
        export_transformers(tower, work / "hf", tokenizer=tokenizer, pad_id=SD1_PAD)
        hf_tok = transformers.CLIPTokenizer.from_pretrained(work / "hf")
        hf_model = transformers.CLIPTextModel.from_pretrained(work / "hf").to(device).eval()
        runs = iter(range(10**6))
        kept: dict[str, Any] = {}

        def ours() -> int:
            out = work / f"cache-{next(runs)}"
            build_text_cache(cond, table, out, key_column="key", batch_size=size, precision="amp_bf16",
                             shard_size=shard_size)
            _sync(device)
            kept["cache"] = out
            return len(texts)

        def theirs() -> int:
            # the same work as the cache: identical captions encoded once per shard-sized chunk (the cache's
            # deduplication does not cross shards, so that shards stay independent)
            unique = [t for chunk in _batches(texts, shard_size) for t in dict.fromkeys(chunk)]
            hidden = []
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                for batch in _batches(unique, size):
                    ids = hf_tok(batch, padding="max_length", max_length=context, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
                    hidden.append(hf_model(input_ids=ids).last_hidden_state.half().cpu())
            out = work / f"numpy-{next(runs)}"
            out.mkdir()
            array = torch.cat(hidden).numpy()
            row_of = {text: i for i, text in reversed(list(enumerate(unique)))}  # a caption's first row
            np.save(out / "hidden.npy", array)
            np.save(out / "rows.npy", np.array([row_of[t] for t in texts]))
            kept["hidden"], kept["row_of"] = array, row_of
            return len(texts)

        rates = interleaved({"ours": ours, "theirs": theirs}, sizes.repeats, 1)
        cache = TextEmbeddingCache(kept["cache"])
        row.checks["every_caption_cached"] = check(len(cache) == len(texts), cached=len(cache), captions=len(texts))
        probe = list(range(0, len(texts), max(1, len(texts) // 16)))
        a = torch.stack([cache[f"k{i}"]["hidden"].float() for i in probe])
        b = torch.stack([torch.from_numpy(kept["hidden"][kept["row_of"][texts[i]]]).float() for i in probe])
        cosine = _min_cosine(a.flatten(1), b.flatten(1))
        row.checks["hidden_close_to_transformers"] = check(cosine >= BF16_MIN_COSINE, min_cosine=cosine,
                                                           probed=len(probe))
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    return [row.finish()]


# ----------------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(cpu: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cpu:
        env["OMP_NUM_THREADS"] = "1"  # two processes on a small CPU
    return env


def _run_group(command: list[str], env: dict[str, str], timeout: float | None) -> tuple[int, str]:
    """Run ``command`` in its own process group; on a timeout (or any interruption) the whole group is
    killed, so no torchrun worker outlives its row."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def bench_torchrun(fsdp: bool) -> Callable[[Sizes], list[Row]]:
    def run(sizes: Sizes, time_left: float | None = None) -> list[Row]:
        import torch

        device = _device()
        cuda = device.type == "cuda"
        nproc = min(2, torch.cuda.device_count()) if cuda else 2
        wrapper = "FSDP2" if fsdp else "DDP"
        row = Row("torchrun_fsdp" if fsdp else "torchrun_ddp", f"torchrun {nproc} process(es) {'nccl' if cuda else 'gloo'}, "
                  f"ldmclip train {sizes.torchrun_model}, {wrapper}, {sizes.torchrun_steps} steps", "samples/s",
                  "(none: smoke run)",
                  config={"model": sizes.torchrun_model, "processes": nproc, "backend": "nccl" if cuda else "gloo",
                          "batch": sizes.torchrun_batch, "steps": sizes.torchrun_steps, "data": "synthetic",
                          "measured": "median samples/s of the logged steps after the first (metrics.jsonl)"})
        with tempfile.TemporaryDirectory(prefix="gpu-torchrun-") as tmp:
            output = Path(tmp) / "run"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                       "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ldmclip", "train",
                       "--model", sizes.torchrun_model, "--data", "synthetic", "--steps", str(sizes.torchrun_steps),
                       "--batch-size", str(sizes.torchrun_batch), "--workers", "0", "--val-size", "16",
                       "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--warmup", "1",
                       "--progress", "no", "--device", "auto" if cuda else "cpu",  # auto: cuda:LOCAL_RANK
                       "--precision", "amp_bf16" if cuda else "fp32", "--output", str(output),
                       "--dist-timeout", "120", *(["--fsdp"] if fsdp else [])]
            row.config["command"] = " ".join(command[1:]).replace(str(output), "RUN")
            start = time.perf_counter()
            code, log = _run_group(command, _child_env(not cuda), None if time_left is None else max(1.0, time_left - 5))
            row.extra["wall_s"] = time.perf_counter() - start
            row.extra["log_tail"] = log.strip().splitlines()[-8:]
            row.checks["exit_code_0"] = check(code == 0, exit_code=code)
            records = []
            if (output / "metrics.jsonl").is_file():
                records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
            train = [r for r in records if r.get("kind") == "train"]
            losses = [r["loss"] for r in train]
            row.checks["every_step_logged_finite"] = check(
                len(train) == sizes.torchrun_steps and all(x == x and abs(x) != float("inf") for x in losses),
                steps_logged=len(train), last_loss=losses[-1] if losses else None)
            row.checks["final_weights_written"] = check((output / "final" / "open_clip_model.safetensors").is_file())
            wrapped = f"({wrapper})" in log
            row.extra["wrapped"] = wrapper if wrapped else "none (one process: ldmclip trains unwrapped)"
            if nproc > 1:
                row.checks[f"wrapped_in_{wrapper}"] = check(wrapped)
            else:
                row.note = f"1 process: ldmclip skips {wrapper} at world size 1, so this checks the launch, the " \
                           f"{'nccl' if cuda else 'gloo'} process group and the CUDA step only"
            memory = {k: v for r in train[-1:] for k, v in r.items() if "mem" in k}
            if memory:
                row.extra["metrics_memory"] = memory
            rates = [r["samples_per_s"] for r in train[1:] if "samples_per_s" in r]
            row.ours = statistics.median(rates) if rates else None
        return [row.finish()]

    run.wants_time_left = True  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------------------------------
# the checks, and running them
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One isolated unit of the run: a function giving one or more rows."""

    name: str
    title: str
    ids: Callable[[Sizes], tuple[str, ...]]
    run: Callable[..., list[Row]]
    est_gpu_s: float            # a rough guess of its time on an H200 (skipped when it no longer fits)
    needs_cuda: str = ""        # why it is skipped on CPU; empty: it runs its CPU equivalent there


def _fixed(*ids: str) -> Callable[[Sizes], tuple[str, ...]]:
    return lambda sizes: ids


def _loss_ids(sizes: Sizes) -> tuple[str, ...]:
    return tuple(f"loss_{what}_{n}" for n in sizes.loss_sizes for what in ("memory", "time"))


CHECKS: tuple[Check, ...] = (
    Check("parity_b16", "ViT-B-16 forward parity fp32 and bf16", _fixed("parity_b16_fp32", "parity_b16_bf16"),
          bench_parity("b16"), 20),
    Check("parity_l14", "ViT-L-14 forward parity fp32 and bf16", _fixed("parity_l14_fp32", "parity_l14_bf16"),
          bench_parity("l14"), 30),
    Check("train_b16", "training step ViT-B-16 and its MFU", _fixed("train_b16", "train_mfu"), bench_train("b16"), 35),
    Check("train_l14", "training step ViT-L-14", _fixed("train_l14"), bench_train("l14"), 45),
    Check("train_b16_ckpt", "training step ViT-B-16, activation checkpointing", _fixed("train_b16_ckpt"),
          bench_train("ckpt"), 35),
    Check("train_b16_tiled", "training step ViT-B-16, tiled loss, large batch", _fixed("train_b16_tiled"),
          bench_train("tiled"), 45),
    Check("loss", "loss memory and time, tiled vs dense", _loss_ids, bench_loss, 30),
    Check("conditioning", "LDM conditioning vs transformers", _fixed("conditioning"), bench_conditioning, 35),
    Check("cache_text", "cache-text vs a transformers script", _fixed("cache_text"), bench_cache_text, 35),
    Check("torchrun_ddp", "torchrun ldmclip train, DDP", _fixed("torchrun_ddp"), bench_torchrun(False), 50),
    Check("torchrun_fsdp", "torchrun ldmclip train, FSDP2", _fixed("torchrun_fsdp"), bench_torchrun(True), 50),
    Check("train_b16_compile", "training step ViT-B-16, compiled", _fixed("train_b16_compile"), bench_train("compile"),
          150, needs_cuda="needs CUDA: torch.compile on a CPU builds C++ kernels for both libraries (minutes)"),
)


class RowTimeout(BaseException):
    """Raised by the alarm in a check that overran the time left (a BaseException, so that no
    ``except Exception`` inside the libraries swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`RowTimeout` in this (main) thread after ``seconds``."""
    usable = seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise RowTimeout(f"stopped after {seconds:.0f} s: the time left in --budget-s / --row-limit-s ran out")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _memory_reset(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _memory_peak(cuda: bool) -> tuple[float, str]:
    import resource

    import torch

    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated over the row"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the process so far (ru_maxrss, CPU)"


def _placeholder(check_: Check, row_id: str, status: str, note: str) -> Row:
    return Row(row_id, check_.title, "-", "-", status=status, note=note)


def _run_one(check_: Check, sizes: Sizes, cuda: bool, limit: float | None) -> list[Row]:
    """The rows of one check; an exception (or overrun) gives ``failed`` rows carrying it."""
    import torch

    expected = check_.ids(sizes)
    torch.manual_seed(0)
    _memory_reset(cuda)
    try:
        with time_limit(limit):
            if getattr(check_.run, "wants_time_left", False):
                rows = check_.run(sizes, limit)
            else:
                rows = check_.run(sizes)
    except (Exception, RowTimeout) as exc:  # noqa: BLE001 - record the error, go on with the next check
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        if cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
            note = f"out of GPU memory: {str(exc).splitlines()[0]}"
        else:
            note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows = [_placeholder(check_, i, "failed", note) for i in expected]
        for row in rows:
            row.extra["traceback_tail"] = text.strip().splitlines()[-6:]
    produced = {r.id for r in rows}
    rows += [_placeholder(check_, i, "failed", "the check did not produce this row") for i in expected
             if i not in produced]
    peak, how = _memory_peak(cuda)
    for row in rows:
        row.extra["row_peak_memory_mb"] = peak
        row.extra["row_peak_memory"] = how
    return rows


def commit_of_checkout() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_checks(sizes: Sizes, *, budget_s: float, row_limit_s: float | None = None, only: list[str] | None = None,
               commit: str = "unknown", on_update: Callable[[dict], None] | None = None,
               verbose: bool = True) -> dict:
    """Run the checks in order; returns the result (also passed to ``on_update`` after every check)."""
    import torch

    from benchmarks.common import environment

    chosen = [c for c in CHECKS if not only or c.name in only]
    cuda = _device().type == "cuda"
    started = time.perf_counter()
    result: dict[str, Any] = {"kind": "gpu-check", "profile": sizes.name, "device": "cuda" if cuda else "cpu",
                              "commit": commit, "command": " ".join(sys.argv), "budget_s": budget_s,
                              "environment": environment(), "rows": [], "seconds": 0.0, "finished": False}
    for check_ in chosen:
        elapsed = time.perf_counter() - started
        left = budget_s - elapsed
        if check_.needs_cuda and not cuda:
            rows = [_placeholder(check_, i, "skipped", check_.needs_cuda) for i in check_.ids(sizes)]
        elif left <= 0:
            rows = [_placeholder(check_, i, "skipped", f"time budget spent ({budget_s:.0f} s, --budget-s)")
                    for i in check_.ids(sizes)]
        elif cuda and sizes.name == "gpu" and check_.est_gpu_s > left:
            rows = [_placeholder(check_, i, "skipped", f"needs about {check_.est_gpu_s:.0f} s, {left:.0f} s of "
                                 f"--budget-s left (rerun it with --only {check_.name})") for i in check_.ids(sizes)]
        else:
            if verbose:
                print(f"[{elapsed:6.0f} s] {check_.name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rows = _run_one(check_, sizes, cuda, left if row_limit_s is None else min(left, row_limit_s))
            for row in rows:
                row.seconds = time.perf_counter() - t0
        for row in rows:
            row.extra.setdefault("check", check_.name)
        result["rows"] += [r.as_dict() for r in rows]
        result["seconds"] = time.perf_counter() - started
        if verbose:
            for row in rows:
                print(f"    {row.id}: {row.status} {row.note}"[:200], file=sys.stderr, flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if on_update is not None:
            on_update(result)
    result["finished"] = True
    result["seconds"] = time.perf_counter() - started
    if on_update is not None:
        on_update(result)
    return result


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------

COLUMNS = ("row", "benchmark", "unit", "ldmclip", "peer", "peer value", "ratio", "target", "result", "checks",
           "peak memory MB (ldmclip / peer)", "note")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")  # an escaped bar stays inside its cell


def _value(value: float | None, unit: str) -> str:
    from benchmarks.run import _fmt

    if value is not None and unit == "max rel. diff":
        return f"{value:.1e}"
    return _fmt(value, unit)


def _memory_cell(row: dict) -> str:
    sides = row["extra"].get("peak_memory_mb")
    if isinstance(sides, dict) and sides:
        return " / ".join(f"{sides[k]:,.0f}" for k in ("ours", "theirs") if k in sides)
    peak = row["extra"].get("row_peak_memory_mb")
    return "-" if peak is None else f"{peak:,.0f}"


def markdown(result: dict) -> str:
    """The GPU table of BENCHMARKS.md: a line saying where and at which commit, then one line per row."""
    env = result["environment"]
    where = env.get("cuda") or f"CPU {env['cpu']}"
    state = "" if result.get("finished") else " (interrupted: rows after the last one did not run)"
    head = (f"Commit `{result['commit']}`, {where}, profile `{result['profile']}`; torch {env['torch']}, "
            f"open_clip {env.get('open_clip')}, transformers {env.get('transformers')}; {result['seconds']:.0f} s "
            f"of a {result['budget_s']:.0f} s budget{state}.")
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in ("ldmclip", "peer value", "ratio") else "---" for c in COLUMNS) + "|"]
    for r in result["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        checks = "-" if not r["checks"] else ("ok" if r["checks_ok"] else "FAIL")
        status = {"missed": "**missed**", "failed": "**FAILED**"}.get(r["status"], r["status"])
        cells = (r["id"], r["title"], r["unit"], _value(r["ours"], r["unit"]), r["peer"],
                 _value(r["theirs"], r["unit"]), ratio, r["target_text"], status, checks, _memory_cell(r),
                 r["note"][:200])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write_text(target: str, text: str) -> None:
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when a GPU is visible) or cpu (CUDA is hidden from this process)")
    parser.add_argument("--profile", choices=sorted(SIZES), default=None,
                        help="gpu (the BENCHMARKS.md sizes; default on cuda) or tiny (the smoke test's; default on cpu)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (see --list)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for all the checks; later ones are skipped with a reason (default "
                             f"{DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--row-limit-s", type=float, default=None, help="stop any one check after this many seconds")
    parser.add_argument("--json", default=None, help="write the results here, after every check ('-': standard output)")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write the GPU table of BENCHMARKS.md here, after every check ('-': standard output)")
    parser.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse HEAD, or "
                        "'unknown' where the checkout has no .git, as on a device machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on standard error")
    parser.add_argument("--list", action="store_true", help="list the checks and their rows, and exit")
    args = parser.parse_args(argv)
    if args.json == "-" and args.markdown == "-":
        parser.error("--json - and --markdown - would both write to standard output: give one of them a file")
    if args.list:
        for check_ in CHECKS:
            print(f"{check_.name:18s} {', '.join(check_.ids(SIZES['gpu']))}"
                  + (f"   ({check_.needs_cuda.split(':')[0]})" if check_.needs_cuda else ""))
        return 0
    unknown = sorted(set(args.only or ()) - {c.name for c in CHECKS})
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; --list shows them")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: the suite's rows pick cuda when visible
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible here; for the CPU smoke run use --device cpu --profile tiny")
    cuda = torch.cuda.is_available()
    sizes = SIZES[args.profile or ("gpu" if cuda else "tiny")]
    commit = args.commit or commit_of_checkout()

    def on_update(result: dict) -> None:
        if args.json and args.json != "-":
            write_json(args.json, result)
        if args.markdown and args.markdown != "-":
            _write_text(args.markdown, markdown(result))

    result = run_checks(sizes, budget_s=args.budget_s, row_limit_s=args.row_limit_s, only=args.only, commit=commit,
                        on_update=on_update, verbose=not args.quiet)
    if args.json == "-":
        write_json("-", result)
    if args.markdown == "-":
        sys.stdout.write(markdown(result))
    elif not args.quiet and args.json != "-":
        print(markdown(result), file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
