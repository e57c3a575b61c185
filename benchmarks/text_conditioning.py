"""Text-conditioning throughput, and building a text-embedding cache of the Flickr8k captions.

1. Prompts per second, end to end (tokenize + encode, what a training loop pays per batch), on the
   CLIP ViT-L/14 text tower (SD 1.x's encoder; random weights, 77 tokens, the same batches) with:
   ldmclip's ``TextConditioner`` (preset ``sd1``), ``transformers.CLIPTextModel`` with its
   ``CLIPTokenizer`` (``last_hidden_state``), and OpenCLIP's ``encode_text`` with its tokenizer.
   All under ``torch.inference_mode`` and bf16 autocast (``--precision``). Each timed pass uses
   prompts not seen before. The tokenizers alone are timed too (on the same prompts), so the split
   between tokenizing and the transformer is visible; ldmclip's tokenizer memoises the BPE of each
   word it has seen, which is what happens on a stream of captions, whose words repeat.
2. ``ldmclip cache-text``'s work (``build_text_cache``) on ``flickr8k/captions.csv`` with the same
   conditioner: captions/s, unique captions, bytes, then a resumed run (everything already done) and
   random access reads from the finished cache. Skipped when Flickr8k is absent.

    python benchmarks/text_conditioning.py --quick      # a smoke test: small batches, 256 captions
    python benchmarks/text_conditioning.py              # all 40,455 captions (minutes on a GPU, long on a CPU)
    python benchmarks/text_conditioning.py --device cuda --batch-size 256

Needs open-clip-torch and transformers for the comparison rows (a missing one is reported and left
out). Nothing is downloaded: weights are random and the tokenizer files come with ldmclip.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import ldmclip  # noqa: E402
from benchmarks.common import find_flickr8k  # noqa: E402
from ldmclip.conditioning import TextConditioner, TextEmbeddingCache, build_text_cache  # noqa: E402

CONTEXT = 77
# CLIP ViT-L/14's text tower (SD 1.x): width 768, 12 layers, 12 heads, QuickGELU.
OPENCLIP_MODEL = "ViT-L-14-quickgelu"


def load_prompts(n: int, flickr: Path | None) -> list[str]:
    if flickr is not None:
        with open(flickr / "captions.csv", newline="", encoding="utf-8") as f:
            captions = [row["caption"] for row in csv.DictReader(f)]
    else:
        rng = random.Random(0)
        words = "a the dog cat man woman child red blue green runs sits on in near park street beach ball".split()
        captions = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(5000)]
    return (captions * (n // len(captions) + 1))[:n]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rate(fn: Callable[[list[str]], object], warmup: list[str], passes: list[list[list[str]]],
              device: torch.device) -> float:
    """Prompts/s: the median over the timed passes (each a list of batches of prompts not seen before,
    so that no tokenizer cache is warm from an earlier pass), after one warm-up batch."""
    fn(warmup)
    _sync(device)
    rates = []
    for batches in passes:
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        _sync(device)
        rates.append(sum(len(b) for b in batches) / (time.perf_counter() - start))
    return statistics.median(rates)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------------
# the three implementations
# ----------------------------------------------------------------------------------------------------

def make_ldmclip(device: torch.device):
    torch.manual_seed(0)
    cond = TextConditioner.from_pretrained("sd1", OPENCLIP_MODEL, device=device)  # random weights
    return cond, (lambda prompts: cond(prompts).hidden), cond.tokenizers[0]


def make_transformers(device: torch.device, workdir: Path):
    import transformers

    ldmclip.get_tokenizer(OPENCLIP_MODEL).save_pretrained_files(workdir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(workdir))
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                         hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).to(device).eval()

    def run(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=CONTEXT, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return model(input_ids=ids).last_hidden_state

    def tokenize(prompts: list[str]):
        return tokenizer(prompts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")

    return model, run, tokenize


def make_openclip(device: torch.device):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(OPENCLIP_MODEL, pretrained=None)
    model.visual = torch.nn.Identity()  # only the text tower is timed; free the image tower's memory
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(OPENCLIP_MODEL)

    def run(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    return model, run, tokenizer


def conditioning_table(args, device: torch.device, prompts: list[str], workdir: Path) -> tuple[list[tuple], float]:
    size = args.batch_size
    warmup, rest = prompts[:size], prompts[size:]
    passes = [[rest[p * args.prompts:][i:i + size] for i in range(0, args.prompts, size)]
              for p in range(args.repeats)]
    rows, ldmclip_rate = [], 0.0
    makers = [("ldmclip TextConditioner (sd1)", lambda: make_ldmclip(device)),
              ("transformers CLIPTextModel", lambda: make_transformers(device, workdir)),
              ("OpenCLIP encode_text", lambda: make_openclip(device))]
    for name, make in makers:
        try:
            model, run, tokenize = make()
        except ImportError as e:
            rows.append((name, None, None, f"not installed ({e.name})"))
            continue

        def encode(batch: list[str], run: Callable = run) -> None:
            with torch.inference_mode(), autocast(args.precision, device):
                run(batch)

        rate = time_rate(encode, warmup, passes, device)
        tok_rate = time_rate(tokenize, warmup, passes, torch.device("cpu"))
        rows.append((name, rate, tok_rate, ""))
        if name.startswith("ldmclip"):
            ldmclip_rate = rate
        del model, run, tokenize, encode  # free the weights before the next library's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, ldmclip_rate


# ----------------------------------------------------------------------------------------------------
# cache building
# ----------------------------------------------------------------------------------------------------

def cache_benchmark(args, device: torch.device, flickr: Path, workdir: Path) -> dict:
    source = flickr / "captions.csv"
    if args.cache_captions:
        # The first N rows as their own table (same keys as in the full table).
        subset = workdir / "captions.csv"
        with open(source, newline="", encoding="utf-8") as f, open(subset, "w", newline="", encoding="utf-8") as g:
            reader, writer = csv.reader(f), csv.writer(g)
            for i, row in enumerate(reader):
                if i > args.cache_captions:
                    break
                writer.writerow(row)
        source = subset
    torch.manual_seed(0)
    cond = TextConditioner.from_pretrained("sd1", OPENCLIP_MODEL, device=device)
    out = workdir / "cache"
    precision = {"bf16": "amp_bf16", "fp16": "amp_fp16", "fp32": "fp32"}[args.precision]
    report = build_text_cache(cond, source, out, batch_size=args.batch_size, precision=precision,
                              shard_size=args.shard_size, progress=not args.quick)
    resumed = build_text_cache(cond, source, out, batch_size=args.batch_size, precision=precision,
                               shard_size=args.shard_size)
    start = time.perf_counter()
    cache = TextEmbeddingCache(out)
    open_s = time.perf_counter() - start
    keys = list(cache.keys())
    rng = random.Random(0)
    sample = [rng.choice(keys) for _ in range(2000)]
    start = time.perf_counter()
    for key in sample:
        cache[key]
    read_rate = len(sample) / (time.perf_counter() - start)
    return {"report": report, "resumed_s": resumed.seconds, "open_s": open_s, "read_rate": read_rate,
            "keys": len(cache)}


# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few small batches, 256 captions cached")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 64; quick 16)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per timed pass (default 1024; quick 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes, median reported (default 3; quick 1)")
    parser.add_argument("--cache-captions", type=int, default=None,
                        help="cache only the first N Flickr8k captions (default all; quick 256)")
    parser.add_argument("--shard-size", type=int, default=2000, help="captions per cache shard (default 2000)")
    parser.add_argument("--no-cache", action="store_true", help="skip the cache benchmark")
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_size = args.batch_size or (16 if quick else 64)
    args.prompts = args.prompts or (64 if quick else 1024)
    args.repeats = args.repeats or (1 if quick else 3)
    if args.cache_captions is None and quick:
        args.cache_captions = 256
    device = torch.device(args.device)
    flickr = find_flickr8k()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"text conditioning, CLIP ViT-L/14 text tower (random weights), {CONTEXT} tokens, {args.precision} "
          f"autocast, batch {args.batch_size}, {args.prompts} prompts x {args.repeats} pass(es), {where}; "
          f"prompts: {'Flickr8k captions' if flickr else 'synthetic'}")
    prompts = load_prompts(args.batch_size + args.prompts * args.repeats, flickr)
    with tempfile.TemporaryDirectory() as tmp:
        rows, ldmclip_rate = conditioning_table(args, device, prompts, Path(tmp))
        print()
        print(f"| {'implementation':<32} | {'prompts/s (tokenize + encode)':>30} "
              f"| {'tokenizer alone, prompts/s':>27} |")
        print(f"|{'-' * 34}|{'-' * 32}|{'-' * 29}|")
        for name, rate, tok_rate, note in rows:
            if rate is None:
                print(f"| {name:<32} | {note:>30} | {'':>27} |")
            else:
                print(f"| {name:<32} | {rate:>30,.1f} | {tok_rate:>27,.0f} |")

        if args.no_cache:
            return 0
        if flickr is None:
            print("\ncache benchmark skipped: Flickr8k not found (set LDMCLIP_DATA to the folder holding flickr8k/)")
            return 0
        result = cache_benchmark(args, device, flickr, Path(tmp))
    report = result["report"]
    counts = report.counts
    rate = counts["records"] / report.seconds
    print(f"\ncache building on Flickr8k captions ({counts['records']:,} rows, preset sd1, fp16 stored, "
          f"batch {args.batch_size}, {args.shard_size} captions per shard):")
    print(f"| {'measure':<44} | {'value':>22} |")
    print(f"|{'-' * 46}|{'-' * 24}|")
    table = [
        ("captions/s (read, dedupe, encode, write)", f"{rate:,.1f}"),
        ("  vs. conditioning alone (table above)", f"{rate / ldmclip_rate:.2f}x" if ldmclip_rate else "-"),
        ("wall time", f"{report.seconds:,.1f} s"),
        ("captions cached / unique (encoded)", f"{counts['keys']:,} / {counts['unique']:,}"),
        ("skipped", f"{sum(counts.get('skipped', {}).values()):,}"),
        ("shards / bytes", f"{len(report.written)} / {report.bytes_written / 1e6:,.1f} MB"),
        ("resumed run, everything done", f"{result['resumed_s']:.2f} s"),
        ("open the cache (index of all keys)", f"{result['open_s']:.3f} s"),
        ("random reads cache[key]", f"{result['read_rate']:,.0f} keys/s"),
    ]
    for name, value in table:
        print(f"| {name:<44} | {value:>22} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
