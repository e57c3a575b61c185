"""Images per second of the dataset pass: ``ldmclip embed`` against clip-retrieval's ``clip_inference`` on the
same webdataset shards with the same model and the same weights, on one machine, one run each.

    python benchmarks/embed_throughput.py [--images 1000] [--model ViT-B-32] [--batch-size 128] [--workers 2]
        [--clip-retrieval-python /path/to/venv/bin/python] [--json out.json|-]

The shards are the first ``--images`` Flickr8k photos with their first caption (``../shared/data/flickr8k``),
packed by ldmclip's shard writer. The model is ``--model`` at random initialisation (no pretrained weights
exist offline), saved once as an OpenCLIP ``.safetensors`` file that both sides load; weights do not change
the cost of a forward pass. Both sides compute the normalised image and caption embeddings and write them
with their metadata in clip-retrieval's layout.

clip-retrieval 2.45 pins ``numpy<2``, ``open-clip-torch<3`` and ``webdataset<0.3``, which cannot live beside
ldmclip's test environment, so it runs from its own virtual environment (``--clip-retrieval-python``; made
with ``python -m venv cr && cr/bin/pip install torch==2.14.1 torchvision==0.29.1 clip-retrieval==2.45.0
'setuptools<70'``). Without it the baseline is the loop clip-retrieval runs, written out with OpenCLIP 3.3.0 and
webdataset in this environment: decode + preprocess in DataLoader workers, ``encode_image``/``encode_text``,
normalise, write ``.npy`` + parquet. Each side's output is checked against the other's (same embeddings up to
the stored fp16 precision), so the rows compare equal work.

On CPU clip-retrieval runs the model in fp32 (all_clip autocasts only on CUDA) while ldmclip's ``--precision
auto`` uses bf16 autocast on CPUs with AVX512-bf16/AMX; the JSON records both precisions, and ``--precision
fp32`` for ldmclip gives the like-for-like row too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from benchmarks.common import environment, find_flickr8k, flickr_rows, write_json  # noqa: E402


def pack_shards(flickr: Path, n: int, out: Path, per_shard: int) -> list[Path]:
    """The first ``n`` Flickr8k images with their first caption, as img2dataset-style shards."""
    from ldmclip.data.writer import write_shards

    first: dict[str, str] = {}
    for image, caption in flickr_rows(flickr):
        first.setdefault(image, caption)
        if len(first) >= n:
            break
    # A .json member per sample, as img2dataset writes: clip_inference's --enable_metadata needs one.
    items = ((Path(name).stem.replace(".", "_"), flickr / "images" / name, caption, {"url": name, "caption": caption})
             for name, caption in first.items())
    return write_shards(items, out, prefix="flickr", max_per_shard=per_shard, reencode="never")


def save_weights(model_name: str, path: Path) -> None:
    import torch

    import ldmclip

    torch.manual_seed(0)
    ldmclip.create_model(model_name).save_pretrained(path)


def run_ldmclip(pattern: str, weights: Path, out: Path, args: argparse.Namespace, precision: str) -> dict:
    cmd = [sys.executable, "-m", "ldmclip", "embed", pattern, "--model", args.model, "--pretrained", str(weights),
           "--out", str(out), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--precision", precision, "--quiet"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return {"seconds": time.perf_counter() - started, "precision": precision, "command": " ".join(cmd)}


def run_clip_retrieval(python: str, pattern: str, weights: Path, out: Path, args: argparse.Namespace) -> dict:
    # all_clip splits "open_clip:MODEL/CHECKPOINT" at "/": an absolute path after "MODEL/" stays whole.
    cmd = [python, "-m", "clip_retrieval.cli", "inference", "--input_dataset", pattern, "--input_format", "webdataset",
           "--output_folder", str(out), "--clip_model", f"open_clip:{args.model}/{weights}", "--use_jit", "False",
           "--batch_size", str(args.batch_size), "--num_prepro_workers", str(args.workers), "--enable_metadata",
           "True", "--enable_wandb", "False"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - started, "precision": "fp32", "tool": "clip-retrieval 2.45.0",
            "command": " ".join(cmd)}


def run_openclip_loop(shards: list[Path], weights_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """What clip_inference does, with OpenCLIP 3.3.0 + webdataset here (when clip-retrieval is not installed)."""
    import numpy as np
    import open_clip
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import webdataset as wds

    started = time.perf_counter()
    # local-dir: reads the config saved beside the weights, so ldmclip-only configs (the smoke test's) load too
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{weights_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{weights_dir}")
    model.eval()
    dataset = (wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pilrgb")
               .to_tuple("jpg", "txt", "__key__").map_tuple(preprocess, tokenizer, lambda k: k))
    loader = torch.utils.data.DataLoader(dataset.batched(args.batch_size), batch_size=None,
                                         num_workers=args.workers)
    images, texts, keys = [], [], []
    with torch.inference_mode():
        for pixels, tokens, batch_keys in loader:
            images.append(torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).half().numpy())
            texts.append(torch.nn.functional.normalize(model.encode_text(tokens[:, 0] if tokens.dim() == 3 else tokens),
                                                       dim=-1).half().numpy())
            keys.extend(batch_keys)
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    np.save(out / "img_emb" / "img_emb_0.npy", np.concatenate(images))
    np.save(out / "text_emb" / "text_emb_0.npy", np.concatenate(texts))
    pq.write_table(pa.table({"key": keys}), out / "metadata" / "metadata_0.parquet")
    return {"seconds": time.perf_counter() - started, "precision": "fp32", "tool": "OpenCLIP 3.3.0 + webdataset loop"}


def read_embeddings(folder: Path) -> dict[str, "object"]:
    """key -> image embedding (float32) of a folder in clip-retrieval's layout."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = {}
    for emb_file, meta_file in zip(sorted((folder / "img_emb").glob("*.npy")),
                                   sorted((folder / "metadata").glob("*.parquet"))):
        emb = np.load(emb_file).astype("float32")
        table = pq.read_table(meta_file)
        column = "key" if "key" in table.column_names else "image_path"  # clip-retrieval names the key image_path
        keys = table.column(column).to_pylist()
        if len(keys) != len(emb):
            raise RuntimeError(f"{meta_file} has {len(keys)} rows for {len(emb)} embeddings in {emb_file}")
        rows.update(zip(keys, emb))
    return rows


def agreement(a: Path, b: Path) -> dict:
    import numpy as np

    ea, eb = read_embeddings(a), read_embeddings(b)
    common = sorted(set(ea) & set(eb))
    if not common:
        raise RuntimeError("the two outputs share no key")
    cos = np.array([float(np.dot(ea[k], eb[k]) / (np.linalg.norm(ea[k]) * np.linalg.norm(eb[k]))) for k in common])
    return {"keys_a": len(ea), "keys_b": len(eb), "keys_common": len(common), "min_cosine": float(cos.min())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clip-retrieval-python", default=None,
                        help="python of a virtual environment with clip-retrieval installed (see the module docs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    flickr = find_flickr8k()
    if flickr is None:
        print("Flickr8k not found (../shared/data/flickr8k or $LDMCLIP_DATA): nothing to measure", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        shards = pack_shards(flickr, args.images, work / "shards", args.per_shard)
        pattern = str(work / "shards" / f"flickr-{{00000..{len(shards) - 1:05d}}}.tar")
        weights = work / "weights"
        save_weights(args.model, weights)
        weights_file = weights / "open_clip_model.safetensors"
        rows = {}
        rows["ldmclip"] = run_ldmclip(pattern, weights, work / "ldmclip", args, "auto")
        rows["ldmclip_fp32"] = run_ldmclip(pattern, weights, work / "ldmclip_fp32", args, "fp32")
        if args.clip_retrieval_python:
            rows["baseline"] = run_clip_retrieval(args.clip_retrieval_python, pattern, weights_file,
                                                  work / "baseline", args)
        else:
            rows["baseline"] = run_openclip_loop(shards, weights, work / "baseline", args)
        for row in rows.values():
            row["images_per_s"] = args.images / row["seconds"]
        check = agreement(work / "ldmclip_fp32", work / "baseline")
        result = {"images": args.images, "shards": len(shards), "model": args.model, "batch_size": args.batch_size,
                  "workers": args.workers, "rows": rows, "agreement_fp32_vs_baseline": check,
                  "speedup": rows["ldmclip"]["images_per_s"] / rows["baseline"]["images_per_s"],
                  "speedup_fp32": rows["ldmclip_fp32"]["images_per_s"] / rows["baseline"]["images_per_s"],
                  "machine": environment()}
        print(f"{'':24s} {'images/s':>9s}  precision", file=sys.stderr)
        for name, row in rows.items():
            print(f"{row.get('tool', name):24s} {row['images_per_s']:9.1f}  {row['precision']}", file=sys.stderr)
        print(f"agreement (ldmclip fp32 vs baseline): {json.dumps(check)}", file=sys.stderr)
        if args.json:
            write_json(args.json, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
