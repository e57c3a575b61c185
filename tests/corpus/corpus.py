"""The bad-input corpus of issue 13: good samples next to every kind of bad input the probe met,
laid out as each command reads it. ``build_corpus(root)`` writes it and returns a ``Corpus`` that says
which samples are good and how many of each skip reason every input holds, so the tests assert on
these facts instead of repeating them."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

SIZE = 24  # tiny images: the corpus is about bad input, not pixels

# A file name that is not UTF-8 (b'caf\xe9'), as the str os.listdir gives for it (surrogate escapes).
NON_UTF8_NAME = os.fsdecode(b"caf\xe9.png")
NEWLINE_NAME = "new\nline.png"
NON_UTF8_CLASS = os.fsdecode(b"m\xfcll")  # a class folder whose name is not UTF-8


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(seed: int) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256))


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (SIZE, SIZE // 2), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    return _encode(img, "JPEG", exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_header_png() -> bytes:
    """A valid PNG signature and header claiming 100,000 x 100,000 pixels, with one tiny data chunk."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def good_images() -> dict[str, bytes]:
    """Images that must be USED: odd modes and formats, and odd (but valid) file names."""
    return {
        "rgb.jpg": _encode(_rgb(1), "JPEG"),
        "cmyk.jpg": _encode(_rgb(2).convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _encode(Image.new("I;16", (SIZE, SIZE), 40_000), "PNG"),
        "palette.png": _encode(_rgb(3).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "anim.gif": _encode(_rgb(4), "GIF"),
        "photo.webp": _encode(_rgb(5), "WEBP"),
        "exif_rotated.jpg": _exif_rotated(),
        NON_UTF8_NAME: _encode(_rgb(6), "PNG"),
        NEWLINE_NAME: _encode(_rgb(7), "PNG"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Regular files that must be skipped: name -> (bytes, the reason they are counted under)."""
    jpeg = _encode(_rgb(8), "JPEG")
    return {
        "zero.jpg": (b"", "empty_file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated_image"),
        "random.jpg": (bytes(range(256)) * 4, "not_an_image"),
        "bomb_1x20000.png": (_encode(Image.new("L", (1, 20_000)), "PNG"), "decompression_bomb"),
        "bomb_header.png": (_huge_header_png(), "decompression_bomb"),
        "svg.jpg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "not_an_image"),
    }


# Made in place: a dangling link and a FIFO named like images (the loop link is not a sample), and a
# sparse file over the 64 MiB image limit (no disk used; refused before it is read).
SPECIAL_REASONS = {"dangling.jpg": "missing_file", "x.jpg": "not_a_file", "sparse.jpg": "too_large"}


def sidecar(name: str) -> str:
    return name.rsplit(".", 1)[0] + ".txt"


def caption_of(name: str) -> str:
    """The sidecar caption of an image in the folder (valid text even for a non-UTF-8 name)."""
    return "a picture called " + name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


def _write_image_dir(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, data in good_images().items():
        (folder / name).write_bytes(data)
    for name, (data, _) in bad_images().items():
        (folder / name).write_bytes(data)
    for name in [*good_images(), *bad_images(), *SPECIAL_REASONS]:  # sidecar captions: pack's folder input
        (folder / sidecar(name)).write_text(caption_of(name), encoding="utf-8", errors="surrogateescape")
    os.symlink(folder / "no-such-target.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "x.jpg")
    with open(folder / "sparse.jpg", "wb") as f:
        f.truncate(100 * 2**20)
    os.symlink("..", folder / "uplink")  # a directory symlink loop: must not be followed


def _reasons(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in names:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _tar_bytes(members: list[tuple[str, bytes | tuple[bytes, str]]]) -> bytes:
    """A tar of (name, data) members; data ``(type, link)`` makes a directory, symlink or hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Corpus:
    root: Path
    images: Path                       # one flat image folder (index, serve, pack folder input)
    classes: Path                      # class folders (eval --zeroshot)
    table: Path                        # caption table over `images` (train, eval retrieval, pack)
    shards: Path                       # folder of webdataset shards (train, cache-text, eval)
    shard_pattern: str                 # the brace pattern over all of them
    captions_txt: Path                 # a caption text file (cache-text)
    good_image_names: list[str] = field(default_factory=list)
    image_reasons: dict[str, int] = field(default_factory=dict)          # of the image folder
    class_images: dict[str, list[str]] = field(default_factory=dict)     # class -> its good images
    class_reasons: dict[str, int] = field(default_factory=dict)
    table_good: dict[str, str] = field(default_factory=dict)             # image -> caption
    table_reasons: dict[str, int] = field(default_factory=dict)
    shard_good: dict[str, str] = field(default_factory=dict)             # key -> caption (first copy)
    shard_reasons: dict[str, int] = field(default_factory=dict)          # sample-level reasons
    shard_captions: dict[str, str] = field(default_factory=dict)         # key -> usable caption
    bad_shards: list[str] = field(default_factory=list)                  # shards that give nothing
    text_good: list[str] = field(default_factory=list)                   # usable caption lines
    text_reasons: dict[str, int] = field(default_factory=dict)


def build_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)
    c = Corpus(root=root, images=root / "images", classes=root / "classes", table=root / "table.csv",
               shards=root / "shards", shard_pattern=str(root / "shards" / "{00000..00003}.tar"),
               captions_txt=root / "captions.txt")
    _write_image_dir(c.images)
    c.good_image_names = sorted(good_images())
    c.image_reasons = _reasons([r for _, r in bad_images().values()] + list(SPECIAL_REASONS.values()))
    _build_classes(c)
    _build_table(c)
    _build_shards(c)
    _build_text(c)
    return c


def _build_classes(c: Corpus) -> None:
    """cat/, dog/ and a non-UTF-8 class hold good images, cat/ also bad ones, dog/ a FIFO and a link loop
    up to classes/; broken/ holds only bad ones (so it is left out of the classifier)."""
    good, bad = good_images(), bad_images()
    names = list(good)
    for cls, picks in (("cat", names[:4]), ("dog", names[4:8]), (NON_UTF8_CLASS, names[8:])):
        folder = c.classes / cls
        folder.mkdir(parents=True)
        for name in picks:
            (folder / name).write_bytes(good[name])
        c.class_images[cls] = sorted(picks)
    for name, (data, _) in bad.items():
        (c.classes / "cat" / name).write_bytes(data)
    os.symlink("..", c.classes / "dog" / "uplink")
    os.mkfifo(c.classes / "dog" / "x.jpg")
    (c.classes / "broken").mkdir()
    (c.classes / "broken" / "zero.jpg").write_bytes(b"")
    (c.classes / "broken" / "random.jpg").write_bytes(bad["random.jpg"][0])
    c.class_reasons = _reasons([r for _, r in bad.values()] + ["not_a_file", "empty_file", "not_an_image"])


def _build_table(c: Corpus) -> None:
    """Rows over the image folder: every good image with a caption, every bad file, a missing file,
    an empty and an over-long caption (their images are good: the caption decides)."""
    import csv
    rows: list[tuple[str, str]] = []
    for i, name in enumerate(good_images()):
        if name == NON_UTF8_NAME:  # a CSV is text: a non-UTF-8 name cannot be written in one
            continue
        caption = f"a photo number {i}"
        rows.append((name, caption))
        c.table_good[name] = caption
    reasons = []
    for name, (_, reason) in bad_images().items():
        rows.append((name, f"caption of {name}"))
        reasons.append(reason)
    for name, reason in SPECIAL_REASONS.items():
        rows.append((name, f"caption of {name}"))
        reasons.append(reason)
    rows.append(("never-there.jpg", "a missing image"))
    reasons.append("missing_file")
    rows.append(("rgb.jpg", "   "))
    reasons.append("empty_caption")
    rows.append(("rgb.jpg", "x" * 140_000))
    reasons.append("caption_too_long")
    with open(c.table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    c.table_reasons = _reasons(reasons)


def _build_shards(c: Corpus) -> None:
    """00000.tar: good samples, bad members and a duplicate key; 00001 zero bytes; 00002 random
    bytes; 00003 a good tar cut in the middle of its first member."""
    c.shards.mkdir()
    good = good_images()
    members: list[tuple[str, bytes]] = []
    for i, name in enumerate(("rgb.jpg", "cmyk.jpg", "palette.png", "photo.webp", "exif_rotated.jpg",
                              "sixteen_bit.png")):
        key, ext = f"good{i:02d}", name.rsplit(".", 1)[1]
        caption = f"shard caption {i}"
        members += [(f"{key}.{ext}", good[name]), (f"{key}.txt", caption.encode())]
        c.shard_good[key] = caption
    members += [("badzero.jpg", b""), ("badzero.txt", b"zero bytes")]
    members += [("badrandom.jpg", bytes(range(256)) * 4), ("badrandom.txt", b"random bytes")]
    members += [("nocaption.jpg", good["rgb.jpg"])]
    members += [("gifonly.gif", good["anim.gif"]), ("gifonly.txt", b"a GIF: not a shard image type")]
    members += [("emptycap.jpg", good["rgb.jpg"]), ("emptycap.txt", b"  ")]
    members += [("good00.jpg", good["cmyk.jpg"]), ("good00.txt", b"a second copy of good00")]
    # members that are not regular files: the image of such a key is missing (nothing is followed)
    members += [("adir", (tarfile.DIRTYPE, "")), ("evil.jpg", (tarfile.SYMTYPE, "/etc/passwd")),
                ("evil.txt", b"a symlink member"), ("hard.jpg", (tarfile.LNKTYPE, "good01.jpg")),
                ("hard.txt", b"a hard-link member")]
    # a member named ../ is only a key here (shards are streamed, never extracted): a good sample
    members += [("../up.png", good["palette.png"]), ("../up.txt", b"a dot-dot member")]
    c.shard_good["../up"] = "a dot-dot member"
    (c.shards / "00000.tar").write_bytes(_tar_bytes(members))
    c.shard_reasons = {"empty_file": 1, "not_an_image": 1, "missing_caption": 1, "missing_image": 3,
                       "empty_caption": 1, "duplicate_key": 1}
    # The text cache reads captions only: a bad image member does not matter to it.
    c.shard_captions = {**c.shard_good, "badzero": "zero bytes", "badrandom": "random bytes",
                        "gifonly": "a GIF: not a shard image type", "evil": "a symlink member",
                        "hard": "a hard-link member"}
    (c.shards / "00001.tar").write_bytes(b"")
    (c.shards / "00002.tar").write_bytes(bytes(range(256)) * 40)
    whole = _tar_bytes([("cut.jpg", good["rgb.jpg"] * 4), ("cut.txt", b"never read")])
    (c.shards / "00003.tar").write_bytes(whole[:700])
    c.bad_shards = ["00001.tar", "00002.tar", "00003.tar"]


def _build_text(c: Corpus) -> None:
    lines = ["a red cube", "", "   ", "a blue sphere on grass", "x" * 140_000, "two cats"]
    c.captions_txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    c.text_good = ["a red cube", "a blue sphere on grass", "two cats"]
    c.text_reasons = {"empty_caption": 2, "caption_too_long": 1}
