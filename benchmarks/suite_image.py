"""Image rows: decode + train preprocessing of large JPEGs (ldmclip vs OpenCLIP's preprocess), and the
webdataset loader from shards to model-ready batches (ldmclip ``ShardDataset`` + ``ImageTextCollator``
vs OpenCLIP's webdataset pipeline), both per worker (in this process)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .common import Profile, Row, captions, check, close_check, find_flickr8k, flickr_rows, interleaved


# ----------------------------------------------------------------------------------------------------
# large JPEGs
# ----------------------------------------------------------------------------------------------------

def large_jpegs(count: int, side: int, flickr: Path | None, quality: int = 90) -> list[bytes]:
    """``count`` JPEGs whose longer side is ``side`` px (4:3): Flickr8k photos upscaled (bicubic), or
    drawn scenes when Flickr8k is absent."""
    width, height = side, side * 3 // 4
    out = []
    if flickr is not None:
        names = list(dict.fromkeys(image for image, _ in flickr_rows(flickr, n=count * 5 + 5)))[:count]
        for name in names:
            with Image.open(flickr / "images" / name) as img:
                big = img.convert("RGB").resize((width, height), Image.BICUBIC)
            buf = io.BytesIO()
            big.save(buf, format="JPEG", quality=quality)
            out.append(buf.getvalue())
    gen = torch.Generator().manual_seed(0)
    while len(out) < count:
        img = Image.new("RGB", (width, height), tuple(int(v) for v in torch.randint(0, 255, (3,), generator=gen)))
        draw = ImageDraw.Draw(img)
        for _ in range(40):
            x0, y0 = (int(torch.randint(0, width, (1,), generator=gen)), int(torch.randint(0, height, (1,),
                                                                                           generator=gen)))
            r = int(torch.randint(20, side // 4, (1,), generator=gen))
            color = tuple(int(v) for v in torch.randint(0, 255, (3,), generator=gen))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _pilrgb(data: bytes) -> Image.Image:
    """What webdataset's ``decode("pilrgb")`` (OpenCLIP's data pipeline) does with image bytes."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def bench_decode(profile: Profile) -> list[Row]:
    import open_clip

    from ldmclip.transforms import PreprocessConfig, image_transform, load_image

    size = 224
    flickr = find_flickr8k()
    jpegs = large_jpegs(profile.decode_images, profile.decode_side, flickr)
    ours_train = image_transform(PreprocessConfig(image_size=size), is_train=True, seed=0)
    ours_eval = image_transform(PreprocessConfig(image_size=size), is_train=False)
    theirs_train = open_clip.image_transform(size, is_train=True)
    theirs_eval = open_clip.image_transform(size, is_train=False)
    row = Row("decode", f"JPEG decode + train preprocessing, {profile.decode_side} px → {size} px", "images/s",
              "PIL decode (webdataset pilrgb) + OpenCLIP preprocess_train", target=2.0,
              config={"images": len(jpegs), "size": f"{profile.decode_side}x{profile.decode_side * 3 // 4}",
                      "source": "Flickr8k upscaled" if flickr else "drawn", "output": size,
                      "ldmclip": "load_image(fast=True) (JPEG draft decode; opt-in fast_decode=True on the "
                                 "datasets) + TrainTransform", "repeats": profile.repeats})

    def ours() -> int:
        for data in jpegs:
            ours_train(load_image(data, size, fast=True))
        return len(jpegs)

    def ours_exact() -> int:
        for data in jpegs:
            ours_train(load_image(data, size))
        return len(jpegs)

    def theirs() -> int:
        for data in jpegs:
            theirs_train(_pilrgb(data))
        return len(jpegs)

    rates = interleaved({"ours": ours, "theirs": theirs, "exact": ours_exact}, profile.repeats, profile.warmup)
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    exact = sorted(rates["exact"])[len(rates["exact"]) // 2]
    row.extra["ldmclip_exact_decode_images_per_s"] = exact

    # checks: exact decode + eval transform equals OpenCLIP's; train outputs have the same shape;
    # fast decode stays close to the exact pixels
    a = ours_eval(load_image(jpegs[0]))
    b = theirs_eval(_pilrgb(jpegs[0]))
    row.checks["eval_preprocess_equal"] = close_check(a, b, rtol=0, atol=1e-5)
    t_ours, t_theirs = ours_train(load_image(jpegs[0], size, fast=True)), theirs_train(_pilrgb(jpegs[0]))
    row.checks["train_output_shape_equal"] = check(t_ours.shape == t_theirs.shape and t_ours.dtype == t_theirs.dtype,
                                                   shape=list(t_ours.shape))
    fast = ours_eval(load_image(jpegs[0], size, fast=True))
    diff = float((fast - a).abs().mean())
    row.checks["fast_decode_close"] = check(diff < 0.1, mean_abs_diff_normalised=diff)
    row.note = f"ldmclip exact decode (default): {exact:,.1f} images/s"
    return [row.finish()]


# ----------------------------------------------------------------------------------------------------
# webdataset loader
# ----------------------------------------------------------------------------------------------------

def write_test_shards(out: Path, count: int, per_shard: int, flickr: Path | None) -> list[str]:
    from ldmclip.data.writer import write_shards

    if flickr is not None:
        items = [(i, flickr / "images" / image, caption)
                 for i, (image, caption) in enumerate(flickr_rows(flickr, n=count))]
    else:
        texts = captions(count, None)
        jpegs = large_jpegs(min(count, 8), 256, None)
        items = [(i, jpegs[i % len(jpegs)], texts[i]) for i in range(count)]
    return [str(p) for p in write_shards(items, out, max_per_shard=per_shard)]


def openclip_tarfile_to_samples(src, handler=None):
    """OpenCLIP's ``tarfile_to_samples_nothrow`` with one change: webdataset 1.0.2's
    ``tar_file_expander`` yields an empty dict as an end-of-shard marker, on which OpenCLIP 3.3.0's
    ``group_by_keys_nothrow`` fails (``KeyError: 'fname'``); ``eof_value=None`` switches the marker
    off, which is what the webdataset versions OpenCLIP was written for did. The grouping is
    OpenCLIP's own function."""
    from open_clip_train.data import group_by_keys_nothrow, log_and_continue
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return group_by_keys_nothrow(files, handler=handler)


def openclip_loader(urls: list[str], preprocess, tokenizer, batch: int):
    """OpenCLIP's ``get_wds_dataset`` stages (open_clip_train/data.py) without the shard and sample
    shuffles (ldmclip's side does not shuffle either), with ``openclip_tarfile_to_samples``."""
    import webdataset as wds
    from open_clip_train.data import filter_no_caption_or_no_image, log_and_continue

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        openclip_tarfile_to_samples,
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=0)


def ldmclip_loader(urls: list[str], transform, tokenizer, batch: int):
    from ldmclip.data.samples import make_dataloader
    from ldmclip.data.shards import ShardDataset

    dataset = ShardDataset(urls, transform, shuffle_buffer=0)
    return make_dataloader(dataset, tokenizer, batch, num_workers=0)


def bench_loader(profile: Profile) -> list[Row]:
    import open_clip

    import ldmclip
    from ldmclip.transforms import PreprocessConfig, image_transform

    size, batch = profile.loader_image_size, profile.loader_batch
    flickr = find_flickr8k()
    tokenizer = ldmclip.get_tokenizer("ViT-B-16")
    oc_tokenizer = open_clip.get_tokenizer("ViT-B-16")
    row = Row("loader", f"webdataset shards → batches ({size} px, train transform), per worker", "samples/s",
              "OpenCLIP webdataset pipeline (open_clip_train get_wds_dataset stages)", target=1.5,
              config={"samples": profile.loader_samples, "batch": batch, "image_size": size, "workers": 0,
                      "shuffle": "none on either side", "source": "Flickr8k" if flickr else "drawn",
                      "repeats": profile.repeats,
                      "openclip_workaround": "tarfile_to_samples_nothrow with tar_file_expander(eof_value=None)"})
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = max(1, profile.loader_samples // 4)
        urls = write_test_shards(Path(tmp), profile.loader_samples, per_shard, flickr)
        # as the trainer builds it: RGB PIL images out of the dataset, normalised into the batch by the collator
        ours_train = image_transform(PreprocessConfig(image_size=size), is_train=True, seed=0, defer_normalize=True)
        theirs_train = open_clip.image_transform(size, is_train=True)
        seen: dict[str, list] = {}

        def side(key, make):
            def go() -> int:
                n, toks = 0, []
                for item in make():
                    images, tokens = (item.images, item.tokens) if hasattr(item, "images") else item
                    n += images.shape[0]
                    toks.append(tokens)
                seen[key] = toks
                return n
            return go

        rates = interleaved({"ours": side("ours", lambda: ldmclip_loader(urls, ours_train, tokenizer, batch)),
                             "theirs": side("theirs", lambda: openclip_loader(urls, theirs_train, oc_tokenizer,
                                                                               batch))},
                            profile.repeats, profile.warmup)
        ours_tokens, theirs_tokens = torch.cat(seen["ours"]), torch.cat(seen["theirs"])
        row.checks["same_samples_same_token_ids"] = check(torch.equal(ours_tokens, theirs_tokens),
                                                          samples=[len(ours_tokens), len(theirs_tokens)])
        # exact decode + eval transform on both sides: the first batch's images are equal
        a = next(iter(ldmclip_loader(urls, image_transform(PreprocessConfig(image_size=size), defer_normalize=True),
                                     tokenizer, batch)))
        b = next(iter(openclip_loader(urls, open_clip.image_transform(size, is_train=False), oc_tokenizer, batch)))
        row.checks["eval_batch_images_equal"] = close_check(a.images, b[0], rtol=0, atol=1e-5)
    row.ours_all, row.theirs_all = rates["ours"], rates["theirs"]
    return [row.finish()]
