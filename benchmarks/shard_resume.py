"""Resume cost on webdataset shards: the time to fast-forward a reader past N samples (tar headers only,
no image decoded), against reading and decoding those N samples, as a resume without fast-forward
would have to (``--read-too``; off by default for large N, measured on the first ``--read-sample`` samples
and scaled).

    python benchmarks/shard_resume.py                       # N = 100,000 samples (a few minutes, ~0.4 GB temp)
    python benchmarks/shard_resume.py --samples 2000 --json -   # a smoke test (seconds)

The shards are synthetic (``data/writer.py`` ``write_shards``, one small PNG + caption per sample, 1,000
samples a shard) in a temporary folder removed at the end. The reader is ``ShardDataset`` as the trainer
builds it (shuffle buffer 2,000); the time is from ``iter()`` to the first sample after the N skipped ones
(which includes filling in the bytes of the samples left in the shuffle buffer).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import environment, write_json  # noqa: E402


def _png(size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root: Path, count: int, per_shard: int) -> str:
    from ldmclip.data.writer import write_shards

    image = _png()
    items = ((i, image, f"a synthetic caption number {i}") for i in range(count))
    paths = write_shards(items, root, max_per_shard=per_shard, reencode="never", verify=False)
    return str(root / ("shard-{00000..%05d}.tar" % (len(paths) - 1)))


def _reader(pattern: str, buffer: int):
    from ldmclip.data.shards import ShardDataset
    from ldmclip.transforms import image_transform

    return ShardDataset(pattern, image_transform(32, is_train=True, seed=0), shuffle_buffer=buffer, seed=0,
                        shuffle_shards=True, split_by_node=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="N: samples to fast-forward past")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--read-sample", type=int, default=5000,
                        help="samples read and decoded the ordinary way, for the comparison")
    parser.add_argument("--json", default=None, help="write the result here ('-': standard output)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ldmclip-shard-resume-") as tmp:
        total = args.samples + args.shuffle_buffer + 10
        started = time.perf_counter()
        pattern = _write(Path(tmp), total, args.per_shard)
        write_s = time.perf_counter() - started
        shard_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.tar"))

        reader = _reader(pattern, args.shuffle_buffer)
        reader.resume_at({0: args.samples})
        started = time.perf_counter()
        first = next(iter(reader))
        fast_forward_s = time.perf_counter() - started

        reader = _reader(pattern, args.shuffle_buffer)
        read_n = min(args.read_sample, args.samples)
        started = time.perf_counter()
        for _, _ in zip(reader, range(read_n)):
            pass
        read_s = time.perf_counter() - started
    result = {
        "benchmark": "shard_resume",
        "samples_skipped": args.samples,
        "shards": -(-total // args.per_shard),
        "shard_bytes": shard_bytes,
        "shuffle_buffer": args.shuffle_buffer,
        "first_sample_after_resume": first.key if first is not None else None,
        "fast_forward_s": round(fast_forward_s, 3),
        "fast_forward_samples_per_s": round(args.samples / fast_forward_s),
        "read_and_decode_samples_per_s": round(read_n / read_s),
        "read_and_decode_estimate_s": round(read_s * args.samples / read_n, 3),
        "speedup": round(read_s * args.samples / read_n / fast_forward_s, 1),
        "write_shards_s": round(write_s, 1),
        "environment": environment(),
    }
    if args.json:
        write_json(args.json, result)
    if args.json != "-":
        print(f"fast-forward past {args.samples:,} samples: {fast_forward_s:.2f} s "
              f"({result['fast_forward_samples_per_s']:,} samples/s); reading and decoding them: "
              f"~{result['read_and_decode_estimate_s']:.1f} s ({result['speedup']}x slower)")
    return result


if __name__ == "__main__":
    main()
