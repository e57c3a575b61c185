"""Write image–text pairs to webdataset shards in the img2dataset layout (what ``ldmclip pack`` writes).

A shard ``{prefix}-{00000}.tar`` holds, per sample, ``{key}.jpg`` (or ``.png``/``.webp`` with
``reencode="never"``), ``{key}.txt`` (UTF-8 caption) and, when there is metadata, ``{key}.json``.
Keys are zero-padded numbers (9 digits) unless the caller gives its own. Each shard is written
atomically (``core.files.atomic_write``: a hidden temporary ``.{prefix}-00000.tar.tmp``, fsync,
rename), so an interrupted or killed run never leaves a shard that looks finished. ``sizes.json`` in
the output folder maps each shard name to its number of samples (the file OpenCLIP and
``ldmclip.data.dataset_size`` read).

Images (``reencode``):

* ``"auto"`` (default): JPEG sources are stored byte for byte; other formats are decoded and stored as
  JPEG (converted to RGB the way the ldmclip transforms and OpenCLIP convert them);
* ``"always"``: every image is re-encoded as JPEG;
* ``"never"``: the source bytes are stored as they are, whatever their format.

``max_size=N`` (not with ``"never"``) re-encodes the images whose shorter side is larger than N,
downscaled so that the shorter side is N (enough for an N x N crop; img2dataset's ``keep_ratio``).

With ``verify=True`` (default) every image is fully decoded first and every caption checked; bad
samples (missing/empty/corrupt/non-image files, decompression bombs, missing/empty/non-UTF-8
captions) are skipped and counted by reason. ``verify=False`` writes what it is given (bytes
captions included), except what cannot be read or re-encoded.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from ..core.files import atomic_write, write_json_atomic
from ..core.formats import IMAGE_SUFFIXES, name_to_text
from ..core.reading import read_regular_file
from .folders import list_images
from .samples import (REASON_EMPTY_FILE, REASON_MISSING_IMAGE, BadSample,
                      SampleStats, decode_caption, decode_image, read_image_file)

__all__ = ["write_shards", "write_shard_file", "iter_image_folder", "iter_table", "REENCODE_MODES"]

REENCODE_MODES = ("auto", "always", "never")
_KEY_DIGITS = 9
_KEY_RE = re.compile(r"^[^./\\\s][^./\\]*$")


@dataclass(frozen=True)
class _Options:
    reencode: str
    max_size: int | None
    quality: int
    verify: bool


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _pil_format(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception:  # noqa: BLE001
        return None
    return {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower()) if fmt else None


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001
        return None


def _read_source(image: Any) -> tuple[bytes, str | None]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), None
    path = Path(image)
    data = read_image_file(path)  # regular files only, size-capped: never blocks on a FIFO
    suffix = path.suffix.lower().lstrip(".")
    return data, (suffix or None)


def _to_jpeg(img: Image.Image, opts: _Options) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PIL's note on palette images with transparency
        if img.mode != "RGB":
            img = img.convert("RGB")
        if opts.max_size is not None and min(img.size) > opts.max_size:
            w, h = img.size
            scale = opts.max_size / min(w, h)
            size = (opts.max_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), opts.max_size)
            img = img.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=opts.quality)
    return out.getvalue()


def _encode_image(data: bytes, source_ext: str | None, opts: _Options) -> tuple[str, bytes]:
    fmt = _sniff(data)
    if opts.reencode == "never":
        if opts.verify:
            decode_image(data).close()
        ext = fmt or _pil_format(data) or source_ext or "jpg"
        return ("jpg" if ext == "jpeg" else ext), data
    reencode = opts.reencode == "always" or fmt != "jpg"
    if not reencode and opts.max_size is not None:
        size = _header_size(data)
        reencode = size is None or min(size) > opts.max_size
    if not reencode:
        if opts.verify:
            decode_image(data).close()
        return "jpg", data
    img = decode_image(data)
    try:
        return "jpg", _to_jpeg(img, opts)
    finally:
        img.close()


def _caption_bytes(caption: Any, verify: bool) -> bytes | None:
    if verify:
        return decode_caption(caption).encode("utf-8")
    if caption is None:
        return None
    if isinstance(caption, str):
        return caption.encode("utf-8", errors="surrogateescape")
    return bytes(caption)


def _prepare(item: Sequence[Any], opts: _Options) -> tuple[Any, ...]:
    """One input item -> ``("ok", key, ext, image, caption, meta)`` or ``("bad", key, reason, detail)``."""
    key, image, caption = item[0], item[1], item[2]
    meta = item[3] if len(item) > 3 else None
    try:
        cap = _caption_bytes(caption, opts.verify)
        if image is None:
            raise BadSample(REASON_MISSING_IMAGE)
        data, source_ext = _read_source(image)
        if not data and opts.verify:
            raise BadSample(REASON_EMPTY_FILE)
        ext, data = _encode_image(data, source_ext, opts)
    except BadSample as bad:
        return ("bad", key, bad.reason, bad.detail)
    meta_bytes = None
    if meta is not None:
        meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
    return ("ok", key, ext, data, cap, meta_bytes)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _format_key(key: Any, counter: int) -> str:
    if key is None:
        return f"{counter:0{_KEY_DIGITS}d}"
    if isinstance(key, int) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"sample keys must be non-negative, got {key}")
        return f"{key:0{_KEY_DIGITS}d}"
    key = str(key)
    if not _KEY_RE.match(key) or key.startswith("__"):
        raise ValueError(f"invalid sample key {key!r}: keys may not be empty, contain '.', '/' or '\\', "
                         "start with whitespace or '__'")
    return key


def write_shard_file(temp: Path, *, first: tuple[str, Any], rest: Iterator[tuple[str, Any]],
                 limit: int, name: str, counts: dict[str, int], mtime: int | None = None) -> None:
    """Write ``first`` and up to ``limit - 1`` more samples of ``rest`` as the tar file ``temp`` of the
    shard ``name``; ``counts[name]`` is then its number of samples.

    A sample's members are a dict ``{suffix: bytes}`` (written in webdataset's order: sorted) or a list
    ``[(suffix, bytes), ...]`` (written in that order: a copy of another shard's sample). ``mtime`` (the
    members' time stamp; default now) set to a constant makes the bytes depend only on the samples."""
    from webdataset import TarWriter

    keys: set[str] = set()
    with open(temp, "wb") as f:
        # An integer mtime keeps the headers plain USTAR: a fractional one makes tarfile add a PAX
        # header to every member, which costs readers a second header parse per member.
        tar = TarWriter(f, encoder=False, mtime=int(time.time()) if mtime is None else int(mtime))
        try:
            for key, members in itertools.chain([first], itertools.islice(rest, limit - 1)):
                if key in keys:
                    raise ValueError(f"duplicate sample key {key!r} in shard {name}")
                keys.add(key)
                if isinstance(members, dict):
                    tar.write({"__key__": key, **members})
                else:
                    _write_in_order(tar, key, members)
        finally:
            tar.close()  # also on an error: the doomed temporary is then removed by atomic_write
    counts[name] = len(keys)


def _write_in_order(tar: Any, key: str, members: Sequence[tuple[str, bytes]]) -> None:
    """One sample's members in the given order, with the headers ``TarWriter.write`` gives them (which
    sorts the members)."""
    import tarfile

    for suffix, data in members:
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(data), tar.mtime, tar.mode
        info.uname, info.gname = tar.user, tar.group
        tar.tarstream.addfile(info, io.BytesIO(data))


def _update_sizes(out_dir: Path, sizes: dict[str, int]) -> None:
    path = out_dir / "sizes.json"
    try:
        merged: dict[str, int] = json.loads(path.read_text())
    except (OSError, ValueError):
        merged = {}
    merged.update(sizes)
    write_json_atomic(path, dict(sorted(merged.items())))


def write_shards(
    samples: Iterable[Sequence[Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_per_shard: int = 1000,
    *,
    reencode: str = "auto",
    max_size: int | None = None,
    quality: int = 95,
    verify: bool = True,
    workers: int = 0,
    start_shard: int = 0,
    overwrite: bool = False,
    stats: SampleStats | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[Path]:
    """Write ``(key, image, caption, meta)`` items to tar shards; returns the shard paths.

    Args:
        samples: items ``(key, image, caption, meta)`` (``meta`` optional): ``key`` an ``int`` (written
            zero-padded to 9 digits), a ``str`` (no ``.``/``/``), or ``None`` (a running number);
            ``image`` encoded bytes or a path; ``caption`` ``str`` (or ``bytes``/``None`` with
            ``verify=False``); ``meta`` a JSON-serialisable dict or ``None``.
        out_dir: output folder (created).
        prefix, max_per_shard: shard names ``{prefix}-{00000}.tar``, at most ``max_per_shard`` samples each.
        reencode, max_size, quality, verify: see the module docs.
        workers: processes preparing samples (decode/verify/re-encode) in parallel; 0 = in this process.
        start_shard: number of the first shard.
        overwrite: replace existing ``{prefix}-*.tar`` shards; otherwise their presence is an error.
        stats: filled with the number of samples seen and the skipped ones by reason.
        progress: show a tqdm progress bar (``total`` items if known).
    """
    if reencode not in REENCODE_MODES:
        raise ValueError(f"reencode must be one of {REENCODE_MODES}, got {reencode!r}")
    if max_size is not None and (int(max_size) < 1):
        raise ValueError(f"max_size must be a positive number of pixels, got {max_size}")
    if max_size is not None and reencode == "never":
        raise ValueError("max_size needs re-encoding; it cannot be combined with reencode='never'")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if int(max_per_shard) < 1:
        raise ValueError(f"max_per_shard must be at least 1, got {max_per_shard}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(f"invalid shard prefix {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{_glob_escape(prefix)}-*.tar"))
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {len(existing)} shard(s) named {prefix}-*.tar "
                         f"(e.g. {existing[0].name}); pass overwrite=True (--overwrite) or use another "
                         "prefix or folder")
    for pattern in (".{}-*.tar.tmp", ".{}-*.tar.partial"):  # left by a killed run (.partial: the old name)
        for stale in out.glob(pattern.format(_glob_escape(prefix))):
            stale.unlink(missing_ok=True)

    opts = _Options(reencode, None if max_size is None else int(max_size), int(quality), bool(verify))
    stats = stats if stats is not None else SampleStats()
    prepare = functools.partial(_prepare, opts=opts)
    written: list[Path] = []
    sizes: dict[str, int] = {}
    pool = None
    bar = None

    def good_samples(results: Iterable[tuple[Any, ...]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        counter = 0
        for result in results:
            if result[0] == "bad":
                stats.record(result[2])
            else:
                _, key, ext, data, cap, meta = result
                members = {ext: data}
                if cap is not None:
                    members["txt"] = cap
                if meta is not None:
                    members["json"] = meta
                yield _format_key(key, counter), members
                counter += 1
                stats.seen += 1
            if bar is not None:
                bar.update(1)
                if stats.skipped:
                    bar.set_postfix(skipped=stats.skipped, refresh=False)

    try:
        if workers and workers > 0:
            import multiprocessing

            pool = multiprocessing.Pool(workers)
            results: Iterator[tuple[Any, ...]] = pool.imap(prepare, samples, chunksize=8)
        else:
            results = map(prepare, samples)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", dynamic_ncols=True, desc="pack")
        items = good_samples(results)
        number = int(start_shard)
        pending: dict[str, int] = {}
        for first in items:
            final = out / f"{prefix}-{number:05d}.tar"
            # A hidden temporary, fsync, rename (core.files): a killed pack never leaves a partial shard
            # under a final name, and the next run removes the temporary.
            atomic_write(final, functools.partial(write_shard_file, first=first, rest=items, limit=int(max_per_shard),
                                                  name=final.name, counts=pending))
            written.append(final)
            sizes[final.name] = pending.pop(final.name)  # only once the shard is in place
            number += 1
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if sizes:
            _update_sizes(out, sizes)
    return written


# ----------------------------------------------------------------------------------------------------
# Sources for `ldmclip pack`
# ----------------------------------------------------------------------------------------------------

def iter_image_folder(root: str | os.PathLike) -> tuple[int, Iterator[tuple[None, Path, bytes | None, dict]]]:
    """Images under ``root`` (``data.folders.list_images``: recursive, hidden files and links to folders
    left out; sorted) with their sidecar captions (``a/b.jpg`` + ``a/b.txt``): returns ``(count, items)``;
    a missing sidecar gives a ``None`` caption. The sample JSON's ``"image"`` is the relative path as
    text (``core.formats.name_to_text``: a name that is not UTF-8 is written with ``\\xNN`` escapes)."""
    root = Path(root)
    # Path order (part by part), as this listing always had.
    relative = sorted(list_images(root).images, key=lambda rel: rel.split("/"))
    if not relative:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")

    def items() -> Iterator[tuple[None, Path, bytes | None, dict]]:
        for rel in relative:
            path = root / rel
            sidecar = path.with_suffix(".txt")
            try:
                caption: bytes | None = read_regular_file(sidecar, None)  # a FIFO x.txt: no caption, no hang
            except OSError:
                caption = None
            yield None, path, caption, {"image": name_to_text(rel)}

    return len(relative), items()


def iter_table(table: Any, stats: SampleStats) -> Iterator[tuple[None, str, str, dict]]:
    """Rows of a ``CaptionTable`` as writer items; rows with an unusable caption are counted in
    ``stats`` and left out."""
    for i in range(len(table)):
        error = table.caption_error(i)
        if error is not None:
            stats.record(error)
            continue
        image = table.images[i] or None
        yield None, image, table.captions[i], {"image": table.names[i], "row": table.rows[i]}
