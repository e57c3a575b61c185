"""Peak memory and time of ``load_text_tower``: the text tower built and read alone ("after") vs the
whole CLIP built and initialised first, then its text keys copied ("before", the way it was done
before the text tower was built alone; kept here as the baseline).

    python benchmarks/text_tower_memory.py [--quick] [--model ViT-bigG-14] [--repeats 1]
                                           [--sides before after] [--json out.json|-]

A text-tower checkpoint of ``--model`` (random weights, fp32 safetensors, as SDXL's bigG text encoder
alone would be) is written once to a temporary folder. Each measurement then runs in a fresh Python
process that imports ldmclip, loads the tower from that file, reads every weight once (hashing
them: safetensors maps the file and pages tensors in on first use, so a tower never touched would
look smaller than it is) and reports its resident-set high-water mark (``VmHWM``: a new process
image starts its own, so the number is this load's peak, Python and torch included) and the RSS
after the imports, so the load's own share is the difference. The time is that of the load alone.
The "before" side reads the same text-only file, so it is a lower bound of what the old code cost
with a whole-CLIP checkpoint (which it also read whole). Both sides must give the same tower: the
sha256 of its weights is compared.

``--quick`` measures ``ViT-B-32`` (seconds); the default is ``ViT-bigG-14`` (SDXL's second text
encoder: about 0.7 B text parameters, 2.5 B with the image tower). ``--json -`` writes the result
to standard output (the table then goes to standard error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import run_child, write_json  # noqa: E402

SIDES = ("before", "after")
FULL_MODEL = "ViT-bigG-14"
QUICK_MODEL = "ViT-B-32"


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> int:
    """This process's RSS high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_before(name: str, weights: str):
    """What ``load_text_tower`` did before: the whole CLIP built with its random init, the checkpoint
    read whole and copied into it, then the text tower taken from it."""
    import torch
    from safetensors.torch import load_file

    from ldmclip.models.text import TextTransformer
    from ldmclip.registry import create_model

    clip = create_model(name)
    clip.load_state_dict(load_file(weights), strict=False)  # a text-only file: its keys, copied
    cfg = clip.config
    with torch.device("meta"):
        tower = TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.activation)
    tower.load_state_dict(clip.text_state_dict(), assign=True)
    return tower


def _load_after(name: str, weights: str):
    from ldmclip.registry import load_text_tower

    return load_text_tower(name, weights)


def measure(side: str, name: str, weights: str) -> dict:
    """Load the tower once in this process: peak RSS, RSS after the imports, time, and its weights' hash."""
    import torch  # noqa: F401  (imported before the baseline, as both sides need it)

    import ldmclip.conditioning.conditioner  # noqa: F401
    import ldmclip.registry  # noqa: F401
    from ldmclip.core.files import tensors_sha256

    baseline = _status_bytes("VmRSS") or 0
    start = time.perf_counter()
    tower = (_load_before if side == "before" else _load_after)(name, weights)
    seconds = time.perf_counter() - start
    # safetensors maps the file and pages a tensor in when it is first read: hashing reads every
    # weight (without copies), so the peak below is that of a tower whose weights are all resident
    sha256 = tensors_sha256(tower.state_dict())
    return {"peak_rss_bytes": _peak_rss(), "baseline_rss_bytes": baseline, "time_s": seconds,
            "parameters": sum(p.numel() for p in tower.parameters()), "sha256": sha256}


def write_checkpoint(name: str, path: Path) -> int:
    """A random fp32 text tower of ``name`` as safetensors at ``path``; its parameter count."""
    from ldmclip.core.files import write_safetensors
    from ldmclip.models.text import TextTransformer
    from ldmclip.registry import get_model_config

    cfg = get_model_config(name)
    tower = TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.activation)
    write_safetensors(path, tower.text_state_dict(), {"format": "pt"})
    return sum(p.numel() for p in tower.parameters())


def _child(spec: dict) -> dict:
    return run_child(__file__, spec)


def run(name: str, sides=SIDES, repeats: int = 1, verbose: bool = False) -> dict:
    """Write the checkpoint once, then measure each side ``repeats`` times, one fresh process each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldmclip-text-tower-") as folder:
        weights = Path(folder) / "text_tower.safetensors"
        start = time.perf_counter()
        parameters = _child({"write": name, "path": str(weights)})["parameters"]
        if verbose:
            print(f"  wrote {weights.stat().st_size / 2**30:.2f} GB ({parameters / 1e6:.0f} M parameters) "
                  f"in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for side in sides:
            row = {"side": side, "model": name, "status": "ok", "note": ""}
            try:
                runs = [_child({"side": side, "model": name, "weights": str(weights)}) for _ in range(repeats)]
            except Exception as exc:  # keep going: the other side is still worth measuring
                row.update(status="failed", note=f"failed: {exc}")
                runs = []
            if runs:
                row.update({key: statistics.median(r[key] for r in runs)
                            for key in ("peak_rss_bytes", "baseline_rss_bytes", "time_s")},
                           load_rss_bytes=statistics.median(r["peak_rss_bytes"] - r["baseline_rss_bytes"]
                                                            for r in runs),
                           parameters=runs[0]["parameters"], sha256=runs[0]["sha256"], repeats=len(runs),
                           peak_rss_bytes_all=[r["peak_rss_bytes"] for r in runs])
            if verbose:
                shown = (f"peak {row['peak_rss_bytes'] / 2**30:6.2f} GB, {row['time_s']:6.1f} s" if runs
                         else row["note"])
                print(f"  {side:6s} {shown}", file=sys.stderr, flush=True)
            rows.append(row)
    done = [r for r in rows if r["status"] == "ok"]
    same = len(done) == 2 and done[0]["sha256"] == done[1]["sha256"]
    return {"model": name, "checkpoint_parameters": parameters, "same_weights": same if len(done) == 2 else None,
            "rows": rows}


def format_table(result: dict) -> str:
    header = f"{'side':<7} {'peak RSS GB':>12} {'load GB':>9} {'time s':>8} {'parameters':>12}  note"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['side']:<7} {'-':>12} {'-':>9} {'-':>8} {'-':>12}  {r['note']}")
            continue
        lines.append(f"{r['side']:<7} {r['peak_rss_bytes'] / 2**30:>12.2f} {r['load_rss_bytes'] / 2**30:>9.2f} "
                     f"{r['time_s']:>8.1f} {r['parameters'] / 1e6:>11.1f}M")
    if result["same_weights"] is not None:
        lines.append(f"same weights on both sides: {result['same_weights']}")
    return "\n".join(lines)


def _environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "loadavg_1_5_15": os.getloadavg(),
            "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"measure {QUICK_MODEL} (seconds)")
    p.add_argument("--model", help=f"model config whose text tower is loaded (default: {FULL_MODEL}, "
                                   f"{QUICK_MODEL} with --quick)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per side (median reported)")
    p.add_argument("--json", help="also write the results here ('-': standard output)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        spec = json.loads(args._child)
        if "write" in spec:
            print(json.dumps({"parameters": write_checkpoint(spec["write"], Path(spec["path"]))}))
        else:
            print(json.dumps(measure(spec["side"], spec["model"], spec["weights"])))
        return 0

    name = args.model or (QUICK_MODEL if args.quick else FULL_MODEL)
    started = time.perf_counter()
    result = run(name, args.sides, args.repeats, verbose=True)
    env = _environment()
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"load_text_tower({name!r}, <fp32 text-tower safetensors>) on CPU, {env['cpu_count']} cores, "
          f"torch {env['torch']}; median of {args.repeats} fresh process(es) per side; "
          f"total {time.perf_counter() - started:.0f} s", file=out)
    print(format_table(result), file=out)
    if args.json:
        write_json(args.json, {"environment": env, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
