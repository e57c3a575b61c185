"""ldmclip against OpenCLIP and transformers, side by side, on this machine: every row of BENCHMARKS.md.

    python -m benchmarks                    # the full suite (what BENCHMARKS.md reports)
    python -m benchmarks --quick            # a few minutes: smaller sizes, 3 repeats
    python benchmarks/run.py --only tokenizer decode --json out.json
    python -m benchmarks --list

Each row runs ldmclip and its peer in the same process on the same inputs, precision and shapes,
interleaved (A B, B A, ...) over the repeats; the table gives the medians, their ratio
(ldmclip / peer), the target and whether it is met. Each row also runs numerical checks (token ids
identical, outputs equal within a tolerance, on the same weights); a row whose check fails is marked
``FAILED`` and the exit status is 1. Results go to ``--json`` (default
``benchmarks/results/latest.json``; ``--json -`` writes them to standard output). Peers are OpenCLIP 3.3.0 and
``transformers``; weights are random and nothing is downloaded. Flickr8k (``$LDMCLIP_DATA/flickr8k`` or
``../shared/data/flickr8k``) gives the captions and images; without it synthetic ones are used and the
table says so.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROFILES, Profile, Row, environment, write_json  # noqa: E402


def _registry() -> dict[str, tuple[Callable[[Profile], list[Row]], tuple[str, ...]]]:
    """name -> (function, ids of the rows it produces); imported lazily (torch, peers)."""
    from benchmarks import suite_image, suite_loss, suite_text, suite_train

    return {
        "train_vitb16": (suite_train.bench_train_vitb16, ("train_vitb16", "train_mfu")),
        "train_small": (suite_train.bench_train_small, ("train_small",)),
        "train_resnet": (suite_train.bench_train_resnet, ("train_resnet",)),
        "conditioning": (suite_text.bench_conditioning, ("conditioning",)),
        "pooled": (suite_text.bench_pooled, ("pooled",)),
        "tokenizer": (suite_text.bench_tokenizer, ("tokenizer_openclip", "tokenizer_hf")),
        "decode": (suite_image.bench_decode, ("decode",)),
        "loss": (suite_loss.bench_loss, ("loss_memory_*", "loss_time_*")),
        "loader": (suite_image.bench_loader, ("loader",)),
    }


BENCHMARKS = ("train_vitb16", "train_small", "train_resnet", "conditioning", "pooled", "tokenizer", "decode", "loss", "loader")


def run_suite(profile: Profile, only: list[str] | None = None, verbose: bool = True) -> dict:
    """Run the benchmarks (all, or ``only``); returns ``{"profile", "environment", "rows", "seconds"}``.
    A benchmark that raises gives one ``failed`` row with the error; the others still run."""
    import torch

    registry = _registry()
    names = list(only or BENCHMARKS)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    rows: list[Row] = []
    started = time.perf_counter()
    for name in names:
        fn, _ids = registry[name]
        if verbose:
            print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        try:
            produced = fn(profile)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next row
            traceback.print_exc()
            produced = [Row(name, name, "-", "-", status="failed", note=f"{type(exc).__name__}: {exc}")]
        for row in produced:
            row.seconds = time.perf_counter() - t0
            if verbose:
                print("    " + format_rows([row]).splitlines()[-1], file=sys.stderr, flush=True)
        rows += produced
    return {"profile": profile.name, "environment": environment(), "rows": [r.as_dict() for r in rows],
            "seconds": time.perf_counter() - started}


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit in ("s",):
        return f"{value:.3f}"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def format_rows(rows: list) -> str:
    """A Markdown table of the rows (``Row`` or their dicts)."""
    header = "| benchmark | unit | ldmclip | peer | peer value | ratio | target | result | checks |"
    lines = [header, "|---|---|---:|---|---:|---:|---|---|---|"]
    for r in rows:
        r = r.as_dict() if isinstance(r, Row) else r
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        status = {"met": "met", "missed": "**missed**", "report": "report", "skipped": "skipped",
                  "failed": "**FAILED**"}.get(r["status"], r["status"])
        if r["id"] == "train_mfu":
            status += " (aim ≥ 50%)"
        checks = "ok" if r.get("checks_ok", True) and r["checks"] else ("-" if not r["checks"] else "FAIL")
        lines.append(f"| {r['title']} | {r['unit']} | {_fmt(r['ours'], r['unit'])} | {r['peer']} | "
                     f"{_fmt(r['theirs'], r['unit'])} | {ratio} | {r['target_text']} | {status} | {checks} |")
    return "\n".join(lines)


def describe(result: dict) -> str:
    env = result["environment"]
    where = env.get("cuda") or f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no AMX/AVX512 flags'})"
    return (f"profile {result['profile']}; {where}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
            f"{env.get('mem_total_gb')} GB; torch {env['torch']}, open_clip {env.get('open_clip')}, transformers "
            f"{env.get('transformers')}; load average {env.get('loadavg_1_5_15')}; total "
            f"{result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and 3 repeats (a few minutes)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="full | quick | tiny (the smoke test's)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, help="override the profile's number of interleaved repeats")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for this process")
    parser.add_argument("--json", default=None, help="write the results here (default "
                        "benchmarks/results/latest[-quick].json; '-' for standard output)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_fn, ids) in _registry().items():
            print(f"{name:14s} rows: {', '.join(ids)}")
        return 0
    import dataclasses

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    if args.repeats:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    result = run_suite(profile, args.only)
    human = sys.stderr if args.json == "-" else sys.stdout  # standard output is then the JSON alone
    print(describe(result), file=human)
    print(format_rows(result["rows"]), file=human)
    suffix = "" if profile.name == "full" else f"-{profile.name}"
    write_json(args.json or Path(__file__).resolve().parent / "results" / f"latest{suffix}.json", result)
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
