"""Evaluation data: labelled images for zero-shot classification, captioned images for retrieval.

Zero-shot sources (``open_zero_shot``) all become a dataset that yields ``Sample(image, str(label),
key)`` or ``None`` (a bad sample, counted by reason as everywhere in ldmclip), plus the class names:

* an image folder with one sub-folder per class, indexed in sorted folder-name order exactly like
  torchvision's ``ImageFolder`` (so a folder of ImageNet WordNet-id folders lines up with the
  built-in ImageNet names); images are found recursively inside each class folder, by
  ``data.folders.list_images`` (links to folders are not followed, so each image counts once);
* a CSV / TSV / parquet table of image paths and labels (class names or integer indices);
* webdataset shards whose samples carry an integer label in a ``cls`` member (the webdataset
  convention) next to the image;
* a CLIP_benchmark webdataset (``core.formats.benchmark_shards``: the dataset folder, a split folder or
  its shards): ``cls`` shards with the dataset's ``classnames.txt`` and
  ``zeroshot_classification_templates.txt`` (``{c}`` templates, as CLIP_benchmark fills them).

Class names (``--classnames``) are the folder names / label strings by default, or:
``imagenet`` (the built-in 1,000 names); a JSON list or ``{key: name}`` object; a text file with one
name per line (matched to the classes in order) or one ``KEY<TAB|,|space>name`` per line (matched
by key, e.g. WordNet id -> name; extra keys are ignored).

Retrieval sources (``open_retrieval``): a caption table (one row per caption, the image repeated;
Flickr/COCO style), webdataset shards (one caption per sample, in ``txt``), or a CLIP_benchmark
retrieval webdataset (``dataset_type.txt`` says ``retrieval``): one ``txt`` per image holding all its
captions, one per line, each line a caption of that image.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.utils.data

from ..core.errors import UserError
from ..core.formats import IMAGE_SUFFIXES, BenchmarkShards, benchmark_shards, is_shards, is_table, name_to_text
from ..data.folders import FolderListing, list_images
from ..data.samples import REASON_MISSING_IMAGE, Sample, SampleStats, load_sample
from ..data.table import table_columns
from .templates import imagenet_classnames, read_lines

__all__ = ["ZeroShotSource", "RetrievalSource", "LabelledImages", "open_zero_shot",
           "open_retrieval", "read_classnames", "is_table"]

# torchvision's IMG_EXTENSIONS plus .gif (PIL reads it; its first frame is used).
REASON_MISSING_LABEL = "missing_label"
REASON_BAD_LABEL = "bad_label"

# Column names tried when the user does not name one (ldmclip/Flickr, OpenCLIP's CSV defaults, others).
IMAGE_COLUMNS = ("image", "filepath", "path", "filename", "file", "image_path")
CAPTION_COLUMNS = ("caption", "title", "text")
LABEL_COLUMNS = ("label", "class", "cls", "target")


@dataclass
class ZeroShotSource:
    """Labelled images: ``dataset`` yields ``Sample(image, str(label), key)`` or ``None``."""

    dataset: torch.utils.data.Dataset
    classnames: list[str]
    description: str
    size: int | None                       # number of samples, when known (progress bars)
    keys: list[str] | None = None          # folder names / label strings behind the classes
    stats: SampleStats = field(default_factory=SampleStats)  # skips found before loading (e.g. blank labels)
    shards: int = 0                        # webdataset shards (DataLoader workers are capped by it)
    templates: list[Callable[[str], str]] | None = None  # the dataset's own prompts (CLIP_benchmark), if any

    def set_transform(self, transform: Callable | None) -> None:
        """Use ``transform`` from now on (sources can be opened, and checked, before the model is loaded)."""
        self.dataset.transform = transform

    @property
    def classes_from_data(self) -> bool:
        """Whether the classes are the data's own (class folders, label strings), each with files of its own:
        then a class none of whose images can be read is left out of the classifier, not scored with no
        image (integer labels name classes that need not have images, e.g. an ImageNet subset)."""
        return self.keys is not None


@dataclass
class RetrievalSource:
    """Captioned images. A table gives ``images`` (unique images, ``Sample(image, "", path)``) with
    ``captions[i]`` the captions of image ``i``; shards give ``pairs`` (``Sample(image, caption, key)``,
    one caption per image, or with ``lines_are_captions`` one caption per line of the text)."""

    description: str
    images: torch.utils.data.Dataset | None = None
    captions: list[list[str]] | None = None
    pairs: torch.utils.data.Dataset | None = None
    size: int | None = None
    shards: int = 0
    caption_skips: dict[str, int] = field(default_factory=dict)  # table rows left out before reading, by reason
    lines_are_captions: bool = False       # CLIP_benchmark retrieval shards: each line of a txt is a caption

    def set_transform(self, transform: Callable | None) -> None:
        """Use ``transform`` from now on (see ``ZeroShotSource.set_transform``)."""
        for dataset in (self.images, self.pairs):
            if dataset is not None:
                dataset.transform = transform


class LabelledImages(torch.utils.data.Dataset):
    """Image files with integer labels: ``dataset[i]`` is ``Sample(image, str(label), path)`` or ``None``
    (reason counted in ``stats``, as for every ldmclip dataset)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable | None = None) -> None:
        if len(paths) != len(labels):
            raise ValueError("one label per image path")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform
        self.stats = SampleStats()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | None:
        path = self.paths[index]
        return load_sample(path, str(self.labels[index]), path, self.transform, self.stats)


# ---------------------------------------------------------------------------------------------------
# Class names


def read_classnames(spec: str | os.PathLike, keys: Sequence[str] | None = None) -> list[str] | dict[str, str]:
    """A class-name list or a ``{key: name}`` mapping from ``spec`` (see the module docs).

    A text file is a mapping when every line is ``KEY<sep>name`` with ``KEY`` one of ``keys`` (or when
    every line has a tab); otherwise it is a list of names, one per line."""
    if str(spec) == "imagenet":
        return imagenet_classnames()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"class names: {spec!r} is neither 'imagenet' nor a file")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8-sig") as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise UserError(f"class names file {path}: not valid JSON ({e})") from None
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            return data
        if isinstance(data, dict) and all(isinstance(n, str) for n in data.values()):
            return {str(k): v for k, v in data.items()}
        raise UserError(f"class names file {path}: expected a JSON list of names or an object of key -> name")
    lines = read_lines(path, "class names file")
    if not lines:
        raise UserError(f"class names file {path} is empty")
    split = [re.split(r"\t|,|\s+", line, maxsplit=1) for line in lines]
    key_set = set(keys or ())
    if all(len(parts) == 2 and parts[1].strip() for parts in split) and (
            all("\t" in line for line in lines) or (key_set and all(parts[0] in key_set for parts in split))):
        mapping: dict[str, str] = {}
        for parts in split:
            mapping.setdefault(parts[0], parts[1].strip())
        return mapping
    return lines


def _names_for_keys(keys: Sequence[str], spec: str | None, what: str) -> list[str]:
    """Class names for classes known by keys (folder names or label strings), in key order."""
    if spec is None:
        return list(keys)
    names = read_classnames(spec, keys)
    if isinstance(names, dict):
        missing = [k for k in keys if k not in names]
        if missing:
            raise UserError(f"class names {spec}: no name for {len(missing)} of the {len(keys)} {what} "
                            f"(e.g. {', '.join(repr(m) for m in missing[:5])})")
        return [names[k] for k in keys]
    if len(names) != len(keys):
        raise UserError(f"class names {spec}: {len(names)} names for {len(keys)} {what}; a list of names is "
                        f"matched to the {what} in sorted order, so the counts must agree (or use a "
                        "'KEY name' mapping file)")
    return list(names)


def _names_for_indices(spec: str | None, what: str) -> list[str]:
    """Class names for integer labels: a list (label i -> names[i]) or a mapping with keys 0..n-1."""
    if spec is None:
        raise UserError(f"{what} has integer labels: pass --classnames (a file of names, one per line, "
                        "in label order, or 'imagenet')")
    names = read_classnames(spec)
    if isinstance(names, dict):
        try:
            order = sorted(int(k) for k in names)
        except ValueError:
            raise UserError(f"class names {spec}: integer labels need integer keys, got "
                            f"{next(iter(names))!r}") from None
        if order != list(range(len(order))):
            raise UserError(f"class names {spec}: mapping keys must be 0..{len(order) - 1}")
        return [names[str(i)] for i in range(len(order))]
    return list(names)


# ---------------------------------------------------------------------------------------------------
# Zero-shot sources


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    # Hidden folders (.ipynb_checkpoints, .git) are not classes.
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _images_under(folder: Path) -> FolderListing:
    """Image files under ``folder`` (``data.folders``: recursive, links to folders not followed), full
    paths in torchvision ImageFolder's order (folder by folder, sorted)."""
    listing = list_images(folder)
    listing.images = [os.path.join(folder, rel) for rel in
                      sorted(listing.images, key=lambda rel: (posixpath.dirname(rel), posixpath.basename(rel)))]
    return listing


def class_folder(root: str | os.PathLike, transform: Callable | None, classnames: str | None = None
                 ) -> ZeroShotSource:
    """An image folder with one sub-folder per class."""
    root = Path(root)
    folders = _class_folders(root)
    if not folders:
        raise UserError(f"{root}: no class sub-folders (expected one folder of images per class)")
    paths, labels, empty, ignored, links = [], [], [], 0, 0
    for label, name in enumerate(folders):
        listing = _images_under(root / name)
        files = listing.images
        ignored += listing.ignored
        links += listing.folder_links
        if not files:
            empty.append(name_to_text(name))
        paths += files
        labels += [label] * len(files)
    if empty:
        # An empty class would still compete in the classifier and change the numbers: refuse, like
        # torchvision's ImageFolder does, rather than guess.
        raise UserError(f"{root}: {len(empty)} class folder(s) have no images ({', '.join(empty[:10])}"
                        f"{', ...' if len(empty) > 10 else ''}); image files end in {', '.join(IMAGE_SUFFIXES)}")
    # A folder's name as text: the default class name goes into prompts, the JSON and the printed table.
    keys = [name_to_text(name) for name in folders]
    names = _names_for_keys(keys, classnames, "class folders")
    notes = [f"{len(folders)} class folders"]
    notes += [f"{ignored} non-image files ignored"] if ignored else []
    notes += [f"{links} links to folders not followed"] if links else []
    description = f"{root} ({', '.join(notes)})"
    return ZeroShotSource(LabelledImages(paths, labels, transform), names, description, len(paths), keys=keys)


def pick_column(path: str | os.PathLike, wanted: str | None, candidates: Sequence[str], what: str) -> str:
    """``wanted`` if given, else the first of ``candidates`` that the table has (clear error otherwise)."""
    columns = table_columns(path)
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{path}: {what} column {wanted!r} not found; the columns are: "
                            f"{', '.join(repr(c) for c in columns) or '(none)'}")
        return wanted
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise UserError(f"{path}: no {what} column (looked for {', '.join(repr(c) for c in candidates)}); the "
                    f"columns are: {', '.join(repr(c) for c in columns) or '(none)'}. Name it with "
                    f"--{what}-column")


def label_table(path: str | os.PathLike, transform: Callable | None, classnames: str | None = None,
                image_root: str | os.PathLike | None = None, image_column: str | None = None,
                label_column: str | None = None) -> ZeroShotSource:
    """A table of image paths and labels (class names, or integer indices with ``classnames``)."""
    from ..data.table import read_table

    path = Path(path)
    image_column = pick_column(path, image_column, IMAGE_COLUMNS, "image")
    label_column = pick_column(path, label_column, LABEL_COLUMNS, "label")
    columns = read_table(path, [image_column, label_column])
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root folder not found: {root}")
    stats = SampleStats()
    rows: list[tuple[str, str]] = []
    for image, label in zip(columns[image_column], columns[label_column]):
        image = str(image).strip() if image is not None else ""
        label = str(label).strip() if label is not None else ""
        if not image:
            stats.record(REASON_MISSING_IMAGE)
        elif not label:
            stats.record(REASON_MISSING_LABEL)
        else:
            rows.append((os.path.join(root, image), label))
    if not rows:
        raise UserError(f"{path}: no rows with both an image and a label")
    values = sorted({label for _, label in rows})
    if all(re.fullmatch(r"\d+", v) for v in values):
        names = _names_for_indices(classnames, str(path))
        too_big = [v for v in values if int(v) >= len(names)]
        if too_big:
            raise UserError(f"{path}: label {too_big[-1]} but only {len(names)} class names")
        index = {v: int(v) for v in values}
        keys = None
    else:
        names = _names_for_keys(values, classnames, "labels")
        index = {v: i for i, v in enumerate(values)}
        keys = values
    dataset = LabelledImages([p for p, _ in rows], [index[label] for _, label in rows], transform)
    return ZeroShotSource(dataset, names, f"{path} ({len(rows)} images)", len(rows), keys=keys, stats=stats)


def label_shards(pattern: str, transform: Callable | None, classnames: str | None,
                 names: list[str] | None = None) -> ZeroShotSource:
    """webdataset shards with an image and an integer ``cls`` member per sample; the class names from
    the ``classnames`` spec, or ``names`` as they are."""
    from ..data.shards import ShardDataset, dataset_size

    names = names if names is not None else _names_for_indices(classnames, f"shards {pattern}")
    # The label travels in the caption slot: the same decoding, collation and bad-sample counting as
    # image–text shards. Evaluation reads every shard once, in order, on this node only.
    dataset = ShardDataset(pattern, transform, shuffle_buffer=0, caption_extension="cls", split_by_node=False)
    return ZeroShotSource(dataset, names, f"{pattern} ({len(dataset.urls)} shards)", dataset_size(pattern),
                          shards=len(dataset.urls))


def _fill_c(template: str, classname: str) -> str:
    return template.format(c=classname)


def _benchmark_lines(path: Path, what: str) -> list[str]:
    """The lines of a CLIP_benchmark metadata file, stripped, as its reader takes them (trailing blank
    lines dropped: they are no entries)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 text ({e})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"{what} {path} is empty")
    return lines


def benchmark_templates(path: Path) -> list[Callable[[str], str]]:
    """A CLIP_benchmark templates file: one ``str.format`` template per line with ``{c}`` for the class."""
    templates = [line for line in _benchmark_lines(path, "templates file") if line]
    for number, template in enumerate(templates, 1):
        try:
            filled = template.format(c="\0")
        except (IndexError, KeyError, ValueError):
            filled = ""
        if filled.count("\0") != 1:
            raise UserError(f"templates file {path}: template {number} ({template!r}) must contain '{{c}}' once, "
                            "where CLIP_benchmark puts the class name, and no other braces")
    return [partial(_fill_c, template) for template in templates]


def benchmark_zero_shot(layout: BenchmarkShards, transform: Callable | None, classnames: str | None
                        ) -> ZeroShotSource:
    """A CLIP_benchmark classification webdataset: ``cls`` shards, its class names (``classnames``
    overrides them, as CLIP_benchmark's custom class-name file does) and its templates."""
    if layout.kind != "classification":
        raise UserError(f"{layout.root}: a CLIP_benchmark {layout.kind} dataset (its dataset_type.txt); "
                        + ("pass it to --retrieval" if layout.kind == "retrieval"
                           else "multi-label classification is not supported by ldmclip eval"))
    if classnames is None:
        if not layout.classnames_file.is_file():
            raise UserError(f"{layout.root}: no {layout.classnames_file.name} beside the shards; pass "
                            "--classnames (one name per line, in label order)")
        names = _benchmark_lines(layout.classnames_file, "class names file")
        if "" in names:
            raise UserError(f"class names file {layout.classnames_file}: line {names.index('') + 1} is blank "
                            "(line N names the class of label N-1, so no line may be left out)")
        source = label_shards(layout.shards, transform, None, names)
    else:
        source = label_shards(layout.shards, transform, classnames)
    if layout.templates_file.is_file():
        source.templates = benchmark_templates(layout.templates_file)
    source.description = f"{layout.shards} (CLIP_benchmark {layout.split} split, {source.shards} shards)"
    return source


def open_zero_shot(spec: str | os.PathLike, transform: Callable | None, classnames: str | None = None,
                   image_root: str | os.PathLike | None = None, image_column: str | None = None,
                   label_column: str | None = None) -> ZeroShotSource:
    """A zero-shot source from a CLIP_benchmark webdataset, a folder, a table (by suffix) or a webdataset
    shard pattern."""
    text = os.fspath(spec)
    layout = benchmark_shards(text)
    if layout is not None:
        return benchmark_zero_shot(layout, transform, classnames)
    if Path(text).is_dir():
        return class_folder(text, transform, classnames)
    if is_table(text):
        return label_table(text, transform, classnames, image_root, image_column, label_column)
    if is_shards(text):
        return label_shards(text, transform, classnames)
    if not Path(text).exists():
        raise FileNotFoundError(f"zero-shot data not found: {text}")
    raise UserError(f"zero-shot data {text}: expected a folder of class folders, a .csv/.tsv/.parquet table "
                    "or webdataset shards (.tar)")


# ---------------------------------------------------------------------------------------------------
# Retrieval sources


def caption_table(path: str | os.PathLike, transform: Callable | None, image_root: str | os.PathLike | None = None,
                  split_file: str | os.PathLike | None = None, image_column: str | None = None,
                  caption_column: str | None = None) -> RetrievalSource:
    """Captioned images from a table with one row per caption."""
    from ..data.table import CaptionTable

    image_column = pick_column(path, image_column, IMAGE_COLUMNS, "image")
    caption_column = pick_column(path, caption_column, CAPTION_COLUMNS, "caption")
    table = CaptionTable(path, image_root, transform, image_column=image_column, caption_column=caption_column,
                         split_file=split_file)
    groups = table.grouped()
    if not groups:
        raise UserError(f"{path}: no image has a usable caption")
    captions = [[table.captions[i] for i in rows] for _, rows in groups]
    bad_captions = len(table) - sum(len(c) for c in captions)
    description = f"{path} ({len(groups)} images, {sum(map(len, captions))} captions"
    description += f", {bad_captions} rows without a usable caption or image)" if bad_captions else ")"
    return RetrievalSource(description, images=table.image_dataset(), captions=captions, size=len(groups),
                           caption_skips=_rows_left_out(table))


def _rows_left_out(table: Any) -> dict[str, int]:
    """The rows ``grouped()`` leaves out, by reason: an unusable caption, or no image named."""
    reasons = Counter(table.caption_error(i) or REASON_MISSING_IMAGE for i in range(len(table))
                      if table.caption_error(i) or not table.images[i])
    return dict(reasons)


def caption_shards(pattern: str, transform: Callable | None, lines_are_captions: bool = False,
                   description: str | None = None) -> RetrievalSource:
    from ..data.shards import ShardDataset, dataset_size

    dataset = ShardDataset(pattern, transform, shuffle_buffer=0, split_by_node=False)
    return RetrievalSource(description or f"{pattern} ({len(dataset.urls)} shards)", pairs=dataset,
                           size=dataset_size(pattern), shards=len(dataset.urls),
                           lines_are_captions=lines_are_captions)


def open_retrieval(spec: str | os.PathLike, transform: Callable | None, image_root: str | os.PathLike | None = None,
                   split_file: str | os.PathLike | None = None, image_column: str | None = None,
                   caption_column: str | None = None) -> RetrievalSource:
    """A retrieval source from a caption table (by suffix), a CLIP_benchmark retrieval webdataset or a
    webdataset shard pattern."""
    text = os.fspath(spec)
    if is_table(text):
        return caption_table(text, transform, image_root, split_file, image_column, caption_column)
    if split_file is not None:
        raise UserError("--split applies to caption tables, not to webdataset shards")
    layout = benchmark_shards(text)
    if layout is not None:
        if layout.kind != "retrieval":
            raise UserError(f"{layout.root}: a CLIP_benchmark {layout.kind} dataset (no dataset_type.txt saying "
                            "'retrieval'); pass it to --zeroshot")
        return caption_shards(layout.shards, transform, lines_are_captions=True,
                              description=f"{layout.shards} (CLIP_benchmark {layout.split} split, one caption "
                                          "per line)")
    if Path(text).is_dir():
        raise UserError(f"retrieval data {text} is a folder: pass a caption table (.csv/.tsv/.parquet with "
                        "image and caption columns) or webdataset shards")
    return caption_shards(text, transform)
