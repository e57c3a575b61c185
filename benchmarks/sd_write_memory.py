"""Peak memory of writing a text tower back into a single-file SD checkpoint
(``checkpoints.sd_write.write_text_encoders``, what ``ldmclip export --format sd-single-file`` runs).

    python benchmarks/sd_write_memory.py [--size-gb 2] [--json out.json|-]

A ``.safetensors`` file of about ``--size-gb`` GB is generated in a temporary folder: an SD 1.x
layout with a CLIP-L-sized text encoder (``cond_stage_model.transformer.*``, transformers keys, fp16,
random values) and fp16 filler tensors under ``model.diffusion_model.*`` for the rest. The generator
writes the header itself and then each tensor in chunks, so it stays small too. A fresh child
process then does what the command line does: ``load_text_tower`` reads the text encoder alone (fp32),
and ``write_text_encoders`` writes the file again with that tower. Its peak RSS (``ru_maxrss``, the
child's own high-water mark) is reported beside the file size and the RSS after the imports; it must
stay far below the file size (the untouched tensors are copied through an 8 MB buffer). The output
is checked to be the input's size with the same header. Everything generated is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import run_child, write_json  # noqa: E402

TEXT_MODEL = "ViT-L-14-quickgelu"  # SD 1.x's CLIP-L
PREFIX = "cond_stage_model.transformer."
FILLER_TENSOR = (8192, 8192)  # fp16: 128 MiB each
CHUNK = 8 << 20


def _clip_l_keys() -> dict[str, tuple[int, ...]]:
    """The transformers keys and shapes of CLIP-L's text encoder (built on the meta device: no memory)."""
    import torch

    from ldmclip.checkpoints.hf import openclip_to_hf_state_dict
    from ldmclip.models.text import TextTransformer
    from ldmclip.registry import get_model_config

    cfg = get_model_config(TEXT_MODEL)
    with torch.device("meta"):
        tower = TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.activation)
    state = {k: v for k, v in tower.text_state_dict().items() if k != "text_projection"}  # a CLIPTextModel
    return {PREFIX + k: tuple(v.shape) for k, v in openclip_to_hf_state_dict(state).items()}


def generate(path: Path, size_bytes: int) -> dict:
    """The test file, streamed: header first, then each tensor's bytes (text: random fp16; filler: zeros)."""
    import torch

    text = _clip_l_keys()
    shapes = dict(text)
    filler_bytes = 2 * FILLER_TENSOR[0] * FILLER_TENSOR[1]
    text_bytes = sum(2 * torch.Size(s).numel() for s in text.values())
    for i in range(max(1, (size_bytes - text_bytes) // filler_bytes)):
        shapes[f"model.diffusion_model.filler.{i}.weight"] = FILLER_TENSOR
    header: dict = {"__metadata__": {"format": "pt", "modelspec.title": "sd_write_memory benchmark"}}
    offset = 0
    for key, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for key, shape in shapes.items():
            if key in text:
                f.write((0.02 * torch.randn(shape)).half().reshape(-1).view(torch.uint8).numpy().data)
                continue
            left = 2 * torch.Size(shape).numel()
            while left:
                f.write(zeros[:min(left, CHUNK)])
                left -= min(left, CHUNK)
    return {"file_bytes": path.stat().st_size, "text_bytes": text_bytes, "tensors": len(shapes)}


def measure(into: str, out: str) -> dict:
    """In this (fresh) process: load the text tower as the CLI does, write it back; the peak RSS."""
    import torch  # noqa: F401

    from ldmclip.checkpoints.sd_write import write_text_encoders
    from ldmclip.registry import load_text_tower

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    tower = load_text_tower(TEXT_MODEL, into)
    loaded = time.perf_counter()
    peak_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = write_text_encoders(into, out, {"text_encoder": tower})
    done = time.perf_counter()
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_imports_bytes": baseline, "peak_after_load_bytes": peak_loaded,
            "load_s": loaded - start, "write_s": done - loaded,
            "replaced": result.replaced, "copied": result.copied,
            "tower_fp32_bytes": sum(p.numel() * 4 for p in tower.parameters())}


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return f.read(length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="size of the generated file (GB, 1e9 bytes)")
    p.add_argument("--json", help="also write the results here ('-': standard output)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        if spec["what"] == "generate":
            print(json.dumps(generate(Path(spec["path"]), spec["size"])))
        else:
            print(json.dumps(measure(spec["into"], spec["out"])))
        return 0

    with tempfile.TemporaryDirectory(prefix="ldmclip-sd-write-") as folder:
        into, out = Path(folder) / "model.safetensors", Path(folder) / "new.safetensors"
        start = time.perf_counter()
        made = run_child(__file__, {"what": "generate", "path": str(into), "size": int(args.size_gb * 1e9)})
        generated = time.perf_counter() - start
        row = run_child(__file__, {"what": "write", "into": str(into), "out": str(out)})
        same = out.stat().st_size == into.stat().st_size and _header(out) == _header(into)
    result = {**made, **row, "generate_s": generated, "same_size_and_header": same,
              "peak_over_file": row["peak_rss_bytes"] / made["file_bytes"]}
    out_stream = sys.stderr if args.json == "-" else sys.stdout
    gb = 1e9
    print(f"file {made['file_bytes'] / gb:.2f} GB ({made['tensors']} tensors, CLIP-L text encoder "
          f"{made['text_bytes'] / gb:.2f} GB fp16), generated in {generated:.0f} s", file=out_stream)
    print(f"rewrite in a child: peak RSS {row['peak_rss_bytes'] / gb:.2f} GB "
          f"({result['peak_over_file']:.0%} of the file; after imports {row['rss_after_imports_bytes'] / gb:.2f} GB, "
          f"after loading the tower {row['peak_after_load_bytes'] / gb:.2f} GB, fp32 tower "
          f"{row['tower_fp32_bytes'] / gb:.2f} GB); load {row['load_s']:.1f} s, write {row['write_s']:.1f} s; "
          f"same size and header: {same}", file=out_stream)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
