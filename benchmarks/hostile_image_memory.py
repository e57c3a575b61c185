"""Peak memory and time of loading + transforming one hostile image file, each in a fresh process.

    python benchmarks/hostile_image_memory.py [--size 224] [--src PATH] [--timeout 120] [--json out.json|-]

The files (written once to a temporary folder): a 157-byte 1x20000 PNG, a 2 GiB sparse file named
``.jpg`` (no disk used), a FIFO named ``.jpg``, and a normal 640x480 JPEG for scale. Each runs through
``load_sample`` with the eval transform at ``--size`` px, in a new Python process that reports its
resident-set high-water mark (``VmHWM``, Python and torch included), its RSS after the imports (the
load's own share is the difference), the time of the load alone, and the reason counted. A child
that does not finish within ``--timeout`` seconds is reported as hung (a FIFO blocks ``open()``).
``--src`` runs another checkout's ``src`` (e.g. the code before issue 13, for the "before" numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import REPO, write_json  # noqa: E402

_CHILD = r"""
import json, sys, time

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

from ldmclip.data.samples import SampleStats, load_sample
from ldmclip.transforms import PreprocessConfig, image_transform

transform = image_transform(PreprocessConfig(image_size=int(sys.argv[2])))
stats = SampleStats()
after_imports = status_kb("VmRSS")
start = time.perf_counter()
sample = load_sample(sys.argv[1], "a caption", "k", transform, stats)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": status_kb("VmHWM") / 1024,
                  "load_mb": (status_kb("VmHWM") - after_imports) / 1024,
                  "outcome": "used" if sample is not None else next(iter(stats.counts))}))
"""


def _files(folder: Path) -> dict[str, Path]:
    from PIL import Image

    files = {"1x20000 PNG": folder / "strip.png", "2 GiB sparse .jpg": folder / "sparse.jpg",
             "FIFO named .jpg": folder / "fifo.jpg", "640x480 JPEG": folder / "photo.jpg"}
    Image.new("RGB", (1, 20000)).save(files["1x20000 PNG"])
    with open(files["2 GiB sparse .jpg"], "wb") as f:
        f.truncate(2 * 2**30)
    os.mkfifo(files["FIFO named .jpg"])
    Image.effect_mandelbrot((640, 480), (-2, -1.2, 1, 1.2), 100).convert("RGB").save(files["640x480 JPEG"])
    return files


def _measure(path: Path, size: int, src: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(size)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"hung (killed after {timeout:.0f} s)"}
    if done.returncode != 0:
        return {"outcome": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the ldmclip source folder to measure")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", default=None, help="write the results here ('-' = standard output)")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in _files(Path(folder)).items():
            rows[name] = _measure(path, args.size, args.src, args.timeout)
            row = rows[name]
            numbers = (f"peak {row['peak_mb']:7.0f} MB (load {row['load_mb']:6.0f} MB), {row['seconds']:7.3f} s"
                       if "peak_mb" in row else "")
            print(f"{name:20s} {row['outcome']:22s} {numbers}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"size": args.size, "src": str(args.src), "rows": rows})


if __name__ == "__main__":
    main()
