"""Compact storage in the text-embedding cache: bytes per caption and the error of each stored dtype
(fp16, bf16, int8, fp8) against the fp32 cache of the same captions and the same encoder outputs.

    python benchmarks/cache_compact.py                              # sd1 + sd2, the first 1,000 Flickr8k captions
    python benchmarks/cache_compact.py --presets sd1 sd2 flux --captions 1000 --json out.json
    python benchmarks/cache_compact.py --model ViT-Tiny-64 --captions 16 --json -    # a smoke test (seconds)

For each preset the text tower(s) (random initialisation, seed 0: no pretrained weights exist here)
encode the captions once; every cache (fp32, then each dtype) is then made by ``build_text_cache``
from those same outputs (a wrapper replays them), so the caches differ only in how they store.
Each cache is read back with ``TextEmbeddingCache`` as a training loop would (default read dtype:
float16 for int8/fp8) and compared, key by key, with the fp32 cache:

* per-token relative L2 error ``||x̂ - x|| / ||x||`` over the width of each token of each caption:
  its maximum and mean over all tokens;
* max-abs relative error ``max_i |x̂_i - x_i| / max_i |x_i|`` per token (the error relative to the
  token's largest value, what an absmax scale bounds): its maximum over all tokens;
* the same per row for the pooled embedding where the preset has one (flux);
* bytes per caption: the shard files' bytes / cached captions (the empty prompt and the manifest are
  once per cache, left out); captions that repeat within a shard share a row.

"fp8, no scale" (in memory, not a cache) is e4m3 without a per-token scale (values cast as they are,
saturated at 448): the reason the cache's fp8 has a scale. ``--json -`` writes the result to standard
output (the table then goes to standard error). Captions: the first ``--captions`` rows of
``flickr8k/captions.csv`` (synthetic captions when Flickr8k is absent, and the JSON says so).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import captions as load_captions  # noqa: E402
from benchmarks.common import environment, find_flickr8k, write_json  # noqa: E402

DTYPES = ("fp16", "bf16", "int8", "fp8")
PRESETS = ("sd1", "sd2")
READ_BATCH = 128


class _Replay:
    """A conditioner that encodes each batch once and replays the outputs for the next caches (the
    same batches come every time: ``build_text_cache`` encodes a shard's captions in a fixed order)."""

    def __init__(self, conditioner: Any) -> None:
        self._conditioner = conditioner
        self._outputs: dict[tuple[str, ...], Any] = {}

    def __call__(self, captions: list[str]) -> Any:
        key = tuple(captions)
        if key not in self._outputs:
            self._outputs[key] = self._conditioner(captions)
        return self._outputs[key]

    def __getattr__(self, name: str) -> Any:  # identity(), empty_prompt(), tokenizers, device, ...
        return getattr(self._conditioner, name)


def _errors(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per vector (last dimension): relative L2 and max-abs relative error (0 where the vector is 0)."""
    diff = approx.float() - exact.float()
    norm, peak = exact.norm(dim=-1), exact.abs().amax(dim=-1)
    l2 = torch.where(norm > 0, diff.norm(dim=-1) / norm.clamp_min(1e-30), diff.norm(dim=-1))
    maxabs = torch.where(peak > 0, diff.abs().amax(dim=-1) / peak.clamp_min(1e-30), diff.abs().amax(dim=-1))
    return {"l2": l2.reshape(-1).double(), "maxabs": maxabs.reshape(-1).double()}


class _Stats:
    """Running max / mean of the per-vector errors of one tensor."""

    def __init__(self) -> None:
        self.n, self.l2_sum, self.l2_max, self.maxabs_max = 0, 0.0, 0.0, 0.0

    def add(self, approx: torch.Tensor, exact: torch.Tensor) -> None:
        e = _errors(approx, exact)
        self.n += e["l2"].numel()
        self.l2_sum += float(e["l2"].sum())
        self.l2_max = max(self.l2_max, float(e["l2"].max()))
        self.maxabs_max = max(self.maxabs_max, float(e["maxabs"].max()))

    def result(self) -> dict[str, float]:
        return {"rel_l2_max": self.l2_max, "rel_l2_mean": self.l2_sum / max(self.n, 1),
                "max_abs_rel_max": self.maxabs_max, "vectors": self.n}


def _shard_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "shards").glob("*.safetensors"))


def _compare(reference: Any, cache: Any, unscaled_fp8: bool = False) -> dict[str, dict[str, float]]:
    """Errors of ``cache`` (or of e4m3 without a scale, from the reference) against ``reference``."""
    keys = list(reference.keys())
    stats = {name: _Stats() for name in (["hidden", "pooled"] if reference.has_pooled else ["hidden"])}
    for start in range(0, len(keys), READ_BATCH):
        batch = keys[start:start + READ_BATCH]
        exact = reference.get_batch(batch)
        approx = ({k: v.clamp(-448, 448).to(torch.float8_e4m3fn).float() for k, v in exact.items()}
                  if unscaled_fp8 else cache.get_batch(batch))
        for name, s in stats.items():
            assert approx[name].shape == exact[name].shape, (name, approx[name].shape, exact[name].shape)
            s.add(approx[name], exact[name])
    return {name: s.result() for name, s in stats.items()}


def run_preset(preset: str, captions: list[str], workdir: Path, *, model: str | None, dtypes=DTYPES,
               precision: str = "auto", batch_size: int = 64, shard_size: int = 500, verbose: bool = True) -> list[dict]:
    from ldmclip.conditioning import TextConditioner, TextEmbeddingCache, build_text_cache

    source = workdir / f"{preset}-captions.txt"
    source.write_text("".join(c.replace("\n", " ") + "\n" for c in captions), encoding="utf-8")
    torch.manual_seed(0)
    models = {} if model is None else {"model": model, **({"model_2": model} if preset in ("sdxl", "sd3") else {})}
    conditioner = _Replay(TextConditioner.from_pretrained(preset, **models))
    rows: list[dict] = []

    def build(dtype: str) -> tuple[Path, float, Any]:
        out = workdir / f"{preset}-{dtype}"
        start = time.perf_counter()
        report = build_text_cache(conditioner, source, out, dtype=dtype, precision=precision,
                                  batch_size=batch_size, shard_size=shard_size, progress=verbose and dtype == "fp32")
        return out, time.perf_counter() - start, report

    ref_dir, encode_s, report = build("fp32")  # encodes; the other caches replay its outputs
    reference = TextEmbeddingCache(ref_dir)
    keys, unique = report.counts["keys"], report.counts["unique"]
    fp16_bytes = None
    for dtype in ("fp32", *dtypes):
        out, seconds = (ref_dir, encode_s) if dtype == "fp32" else build(dtype)[:2]
        cache = TextEmbeddingCache(out)  # the default read: float16 for int8/fp8
        size = _shard_bytes(out)
        fp16_bytes = size if dtype == "fp16" else fp16_bytes
        rows.append({"preset": preset, "dtype": dtype, "read_dtype": str(cache.dtype).removeprefix("torch."),
                     "captions": keys, "unique": unique, "shard_bytes": size, "bytes_per_caption": size / keys,
                     "bytes_per_embedding": size / unique, "build_s": seconds,
                     "errors": _compare(reference, cache)})
    if "fp8" in dtypes:
        rows.append({"preset": preset, "dtype": "fp8, no scale", "read_dtype": "float32", "captions": keys,
                     "unique": unique, "shard_bytes": None, "bytes_per_caption": None, "bytes_per_embedding": None,
                     "build_s": None, "errors": _compare(reference, None, unscaled_fp8=True)})
    for row in rows:
        row["vs_fp16"] = row["shard_bytes"] / fp16_bytes if row["shard_bytes"] and fp16_bytes else None
    return rows


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.3f}%"


def format_table(rows: list[dict]) -> str:
    lines = ["| preset | dtype (read as) | bytes / caption | vs fp16 | hidden: rel. L2 max | mean | max-abs rel. max "
             "| pooled: rel. L2 max | mean | max-abs rel. max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, p = r["errors"]["hidden"], r["errors"].get("pooled")
        size = "—" if r["bytes_per_caption"] is None else f"{r['bytes_per_caption']:,.0f}"
        ratio = "—" if r["vs_fp16"] is None else f"{r['vs_fp16']:.3f}"
        pooled = ("— | — | —" if p is None else
                  f"{_pct(p['rel_l2_max'])} | {_pct(p['rel_l2_mean'])} | {_pct(p['max_abs_rel_max'])}")
        lines.append(f"| {r['preset']} | {r['dtype']} ({r['read_dtype']}) | {size} | {ratio} | "
                     f"{_pct(h['rel_l2_max'])} | {_pct(h['rel_l2_mean'])} | {_pct(h['max_abs_rel_max'])} | {pooled} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=1000, help="the first N Flickr8k captions (default 1000)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="conditioning presets (default sd1 sd2)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="dtypes against fp32")
    parser.add_argument("--model", default=None, help="one tower for every preset instead of the presets' own "
                                                        "(ViT-Tiny-64 for a smoke test)")
    parser.add_argument("--precision", default="auto", help="autocast while encoding (default auto)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500, help="captions per cache shard (default 500)")
    parser.add_argument("--json", default=None, metavar="PATH|-", help="write the result as JSON ('-': stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    flickr = find_flickr8k()
    captions = load_captions(args.captions, flickr)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cache-compact-") as tmp:
        for preset in args.presets:
            rows += run_preset(preset, captions, Path(tmp), model=args.model, dtypes=args.dtypes,
                               precision=args.precision, batch_size=args.batch_size, shard_size=args.shard_size,
                               verbose=not args.quiet)
    table = format_table(rows)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_json(args.json, {
            "benchmark": "cache_compact", "date": datetime.date.today().isoformat(), "rows": rows,
            "config": {"captions": len(captions), "data": "flickr8k captions.csv" if flickr else "synthetic",
                       "presets": args.presets, "model": args.model, "weights": "random init (seed 0)",
                       "precision": args.precision, "batch_size": args.batch_size, "shard_size": args.shard_size},
            "seconds": time.perf_counter() - started, "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
