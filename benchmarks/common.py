"""Shared pieces of the benchmark suite: size profiles, interleaved A/B timing, medians and ratios,
the result record of one row, data lookup and the description of the machine."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))


def write_json(target: str | os.PathLike, data: Any) -> None:
    """The one meaning of ``--json`` in every benchmark: ``-`` is standard output, anything else a file
    (written whole under a temporary name, then renamed, so a killed run leaves no half file)."""
    import json

    text = json.dumps(data, indent=2, default=str) + "\n"
    if os.fspath(target) == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
    print(f"wrote {path}", file=sys.stderr)


def run_child(script: str | os.PathLike, spec: dict) -> dict:
    """Run ``script --_child SPEC_JSON`` in a fresh Python process (its own peak RSS, its own import cost)
    and return the JSON object on the last line of its standard output. A failure raises with the end of
    the child's output; a child killed by the kernel is said to be probably out of memory."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(script).resolve()), "--_child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = f"exit code {proc.returncode}" + (f": {' | '.join(tail)}" if tail else "")
        if proc.returncode in (-9, 137):
            reason += " (killed, probably out of memory)"
        raise RuntimeError(reason)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# size profiles
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """Sizes of every row. ``full`` is what BENCHMARKS.md reports; ``quick`` checks the suite in a few
    minutes; ``tiny`` is the smoke test (tiny model configs, a few captions, no time asserted)."""

    name: str
    repeats: int                  # interleaved A/B repeats per row (median reported)
    warmup: int = 1               # untimed calls of each side before the repeats
    # training step rows
    train_model: str = "ViT-B-16"
    train_batch: int = 16
    train_steps: int = 1          # optimizer steps per timed repeat
    small_model: str = "ViT-T-8-64"
    small_batch: int = 64
    small_steps: int = 3
    resnet_model: str = "RN50"
    resnet_batch: int = 4
    resnet_steps: int = 1
    resnet_image_size: int | None = None  # None: the config's (224 for RN50)
    # text rows (ViT-L/14's text tower)
    text_model: str = "ViT-L-14-quickgelu"   # SD 1.x's text encoder (conditioning)
    pooled_model: str = "ViT-L-14"
    cond_batch: int = 64
    cond_prompts: int = 256       # prompts per timed repeat
    pooled_batch: int = 256
    pooled_captions: int = 2048   # captions per timed repeat
    tokenizer_captions: int = 40_455
    tokenizer_batch: int = 256
    # image rows
    decode_images: int = 32
    decode_side: int = 1600       # longer side of the generated large JPEGs
    loader_samples: int = 1024
    loader_batch: int = 64
    loader_image_size: int = 224
    # loss row
    loss_sizes: tuple[int, ...] = (32_768,)
    loss_dim: int = 512
    loss_isolate: bool = True     # fresh process per measurement (needed for CPU peak memory)
    matmul_size: int = 2048


PROFILES = {
    "full": Profile("full", repeats=5, train_steps=2, small_steps=5, cond_prompts=512, pooled_captions=2048,
                    decode_images=48, loader_samples=2048, loss_sizes=(8192, 16_384, 32_768)),
    "quick": Profile("quick", repeats=3, train_steps=1, small_steps=2, cond_prompts=64, pooled_captions=512,
                     tokenizer_captions=10_000, decode_images=12, loader_samples=512, loss_sizes=(8192,)),
    "tiny": Profile("tiny", repeats=2, train_model="ViT-Tiny-64", train_batch=4, small_model="ViT-Tiny-64",
                    small_batch=8, small_steps=1, resnet_batch=2, resnet_image_size=64, text_model="ViT-Tiny-64",
                    pooled_model="ViT-Tiny-64",
                    cond_batch=4, cond_prompts=8, pooled_batch=4, pooled_captions=16, tokenizer_captions=64,
                    tokenizer_batch=16, decode_images=2, decode_side=1000, loader_samples=16, loader_batch=8,
                    loader_image_size=64, loss_sizes=(256,), loss_dim=32, loss_isolate=False, matmul_size=256),
}


# ----------------------------------------------------------------------------------------------------
# result of one row
# ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: ldmclip (``ours``) against a peer, both as medians of interleaved repeats.

    ``ratio`` is ours / peer for the metric. ``better`` says which way is good ("higher" for
    throughputs, "lower" for memory and time); ``target`` is the ratio to reach (None: report only).
    ``checks`` are the numerical checks of the row (token ids identical, outputs equal within a
    tolerance): ``{name: {"ok": bool, ...}}``.
    """

    id: str
    title: str
    unit: str
    peer: str
    ours: float | None = None
    theirs: float | None = None
    ours_all: list[float] = field(default_factory=list)
    theirs_all: list[float] = field(default_factory=list)
    ratio: float | None = None
    paired_ratio: float | None = None     # median over repeats of (ours / peer) in the same repeat
    target: float | None = None
    better: str = "higher"
    status: str = "ok"                     # met | missed | report | skipped | failed
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0

    def finish(self) -> "Row":
        if self.ours_all:
            self.ours = statistics.median(self.ours_all)
        if self.theirs_all:
            self.theirs = statistics.median(self.theirs_all)
        if self.ours is not None and self.theirs:
            self.ratio = self.ours / self.theirs
        pairs = [a / b for a, b in zip(self.ours_all, self.theirs_all) if b]
        if pairs:
            self.paired_ratio = statistics.median(pairs)
        if self.status in ("skipped", "failed"):
            return self
        if self.target is None or self.ratio is None:
            self.status = "report"
        else:
            ok = self.ratio >= self.target if self.better == "higher" else self.ratio <= self.target
            self.status = "met" if ok else "missed"
        if not self.checks_ok:
            self.status = "failed"
            self.note = (self.note + "; " if self.note else "") + "numerical check failed: " + ", ".join(
                k for k, v in self.checks.items() if not v.get("ok"))
        return self

    @property
    def checks_ok(self) -> bool:
        return all(v.get("ok", False) for v in self.checks.values())

    def target_text(self) -> str:
        if self.target is None:
            return "report"
        sign = "≥" if self.better == "higher" else "≤"
        return f"{sign} {self.target:g}×"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_text"] = self.target_text()
        d["checks_ok"] = self.checks_ok
        return d


def check(ok: bool, **info: Any) -> dict[str, Any]:
    return {"ok": bool(ok), **info}


def close_check(a, b, rtol: float, atol: float = 0.0) -> dict[str, Any]:
    """Compare two tensors: ok when max|a-b| <= atol + rtol * max|b|."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return check(False, shapes=[list(a.shape), list(b.shape)])
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return check(diff <= atol + rtol * scale, max_abs_diff=diff, max_abs=scale, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

def interleaved(sides: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each side ``warmup`` times untimed, then ``repeats`` rounds of one timed call per side.

    Each callable does a unit of work and returns the amount done (samples, prompts, ...); the
    result is the rate (amount / seconds) of every call. The order of the sides alternates from
    round to round (A B, B A, A B, ...), so a slow drift of the machine's load hits both alike.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            amount = sides[name]()
            rates[name].append(amount / (time.perf_counter() - start))
    return rates


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

def data_root() -> Path | None:
    """``$LDMCLIP_DATA``, else ``../shared/data`` next to the checkout, if present."""
    for root in (os.environ.get("LDMCLIP_DATA"), REPO.parent / "shared" / "data"):
        if root and Path(root).is_dir():
            return Path(root)
    return None


def find_flickr8k() -> Path | None:
    """``flickr8k/`` (with its captions.csv) under :func:`data_root`, if present."""
    root = data_root()
    return root / "flickr8k" if root and (root / "flickr8k" / "captions.csv").is_file() else None


def flickr_rows(flickr: Path, n: int | None = None) -> list[tuple[str, str]]:
    """``(image file name, caption)`` pairs of captions.csv in file order (the first ``n``)."""
    rows = []
    with open(flickr / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append((row["image"], row["caption"]))
            if n is not None and len(rows) >= n:
                break
    return rows


def captions(n: int, flickr: Path | None) -> list[str]:
    """``n`` Flickr8k captions (repeated when ``n`` is larger than the table), or synthetic ones."""
    if flickr is not None:
        pool = [c for _, c in flickr_rows(flickr)]
    else:
        import random

        rng = random.Random(0)
        words = ("a the dog cat man woman child red blue green runs sits on in near park street beach ball "
                 "two young people playing water grass snow black white jumps over").split()
        pool = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(5000)]
    return (pool * (n // len(pool) + 1))[:n]


# ----------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return []
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    return [f for f in wanted if f in flags.split()]


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for module in ("open_clip", "transformers", "tokenizers", "webdataset", "PIL"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            env[module] = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            env["mem_total_gb"] = round(int(next(line for line in f if line.startswith("MemTotal")).split()[1])
                                        / 2**20, 1)
    except (OSError, StopIteration):
        env["mem_total_gb"] = None
    return env
