"""Image–caption tables: CSV / TSV / parquet files with an image-path column and a caption column.

``CaptionTable`` is a map-style dataset with one sample per row (Flickr8k's five captions per image
are five samples). Image paths are relative to ``image_root`` (absolute paths are used as they are).
Rows whose caption is missing, empty or not valid UTF-8 are kept in the table and yield ``None``
(with the reason counted) like rows whose image is missing or broken.

File formats are chosen by suffix: ``.csv`` (comma), ``.tsv``/``.tab`` (tab), ``.parquet``/``.pq``
(read with pyarrow). Pass ``sep`` to read any other suffix as delimited text. Delimited text follows
the usual CSV rules (first row is the header, double quotes quote fields), as ``pandas.read_csv`` and
OpenCLIP's ``CsvDataset`` do; the file is read as UTF-8 (a BOM is ignored).
"""

from __future__ import annotations

import csv
import os
import posixpath
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.utils.data

from ..core.errors import UserError
from ..core.formats import PARQUET_SUFFIXES, TABLE_DELIMITERS
from .samples import BadSample, Sample, SampleStats, decode_caption, load_sample, record_bad

__all__ = ["CaptionTable", "ImageList", "read_table", "read_split_file", "table_columns", "table_chunk_names"]


def table_chunk_names(stem: str, count: int) -> list[str]:
    """Names of the ``count`` chunks of a table or text file whose file stem is ``stem``: ``{stem}-{00000}``,
    ... (the text cache's and ``ldmclip embed``'s chunks of one input file)."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._+=-]", "_", stem).lstrip("._-") or "input"
    return [f"{stem}-{i:05d}" for i in range(count)]


def _raise_csv_field_limit() -> None:
    """Let the csv module read fields as long as memory allows: its default limit (131,072
    characters) made one long caption fail the whole table. Over-long captions are counted instead
    (``caption_too_long``, ``samples.MAX_CAPTION_CHARS``). The limit is a C long: clamp for platforms
    where that is 32 bits."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")


def _read_delimited(path: Path, sep: str, columns: Sequence[str]) -> dict[str, list[Any]]:
    _raise_csv_field_limit()
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path} is empty (no header row)")
            header = [h.strip() for h in header]
            _check_columns(path, header, columns)
            index = [header.index(c) for c in columns]
            out: dict[str, list[Any]] = {c: [] for c in columns}
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                for c, i in zip(columns, index):
                    out[c].append(row[i] if i < len(row) else None)
        except csv.Error as e:
            raise UserError(f"{path}, line {reader.line_num}: cannot parse ({e})") from None
    return out


def _read_parquet(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency of the data extra
        raise ImportError("reading parquet files needs pyarrow (pip install pyarrow)") from e
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid etc.
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    _check_columns(path, list(schema.names), columns)
    table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    return {c: table.column(c).to_pylist() for c in columns}


def _check_columns(path: Path, found: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(wanted) if c not in found]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise UserError(f"{path}: column{'s' if len(missing) > 1 else ''} {names} not found; "
                        f"the columns are: {', '.join(repr(c) for c in found) or '(none)'}")


def read_table(path: str | os.PathLike, columns: Sequence[str], sep: str | None = None) -> dict[str, list[Any]]:
    """Read ``columns`` of a CSV / TSV / parquet file into lists (by suffix; ``sep`` forces delimited
    text). Raises ``FileNotFoundError`` / ``ValueError`` with the file name for a missing file, an
    unknown suffix, missing columns (listing the columns found) and unparsable text."""
    path = Path(path)
    _check_file(path, "table")
    suffix = path.suffix.lower()
    if sep is None and suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, columns)
    if sep is None:
        sep = TABLE_DELIMITERS.get(suffix)
        if sep is None:
            raise UserError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet, "
                            "or pass sep= for delimited text")
    return _read_delimited(path, sep, columns)


def table_columns(path: str | os.PathLike, sep: str | None = None) -> list[str]:
    """Column names of a CSV / TSV / parquet file (its header), read without reading the rows."""
    path = Path(path)
    _check_file(path, "table")
    suffix = path.suffix.lower()
    if sep is None and suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid etc.
            raise UserError(f"{path} is not a readable parquet file ({e})") from None
    sep = sep or TABLE_DELIMITERS.get(suffix)
    if sep is None:
        raise UserError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet")
    _raise_csv_field_limit()
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        try:
            header = next(csv.reader(f, delimiter=sep), None)
        except csv.Error as e:
            raise UserError(f"{path}, line 1: cannot parse ({e})") from None
    if header is None:
        raise UserError(f"{path} is empty (no header row)")
    return [h.strip() for h in header]


def _norm(name: str) -> str:
    return posixpath.normpath(name.strip().replace("\\", "/"))


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Image names of a split file: one per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    _check_file(path, "split file")
    names = []
    with open(path, "r", encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
    return names


class CaptionTable(torch.utils.data.Dataset):
    """Map-style dataset over an image–caption table; ``dataset[i]`` is a :class:`Sample` or ``None``.

    Args:
        path: ``.csv`` / ``.tsv`` / ``.parquet`` file.
        image_root: folder the image paths are relative to; ``None``: the table's folder.
        transform: applied to the decoded PIL image (e.g. ``ldmclip.transforms.image_transform(cfg,
            is_train=True)``); ``None`` yields RGB PIL images.
        image_column, caption_column: column names.
        split_file: text file of image names (one per line, as written in ``image_column``); only the
            rows whose image is listed are kept.
        sep: delimiter for text tables whose suffix does not tell it.
        fast_decode: decode big JPEGs at a reduced scale (``load_image(fast=True)``); changes pixels.

    Attributes:
        images: full image path of each row (``str``).
        captions: caption of each row (stripped; ``""`` where it is missing or invalid).
        rows: 0-based data-row number of each kept row in the file.
        stats: ``SampleStats`` of this process's ``__getitem__`` calls.

    Keys are ``"{image}#{row}"`` (image as written in the table, data-row number in the file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        split_file: str | os.PathLike | None = None,
        sep: str | None = None,
        *,
        fast_decode: bool = False,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.transform = transform
        self.image_column = image_column
        self.caption_column = caption_column
        self.fast_decode = fast_decode
        self.stats = SampleStats()
        if image_root is not None and not self.image_root.is_dir():
            raise FileNotFoundError(f"image root folder not found: {self.image_root}")

        columns = read_table(self.path, [image_column, caption_column], sep=sep)
        names, raw_captions = columns[image_column], columns[caption_column]
        if not names:
            raise UserError(f"{self.path} has no rows")
        rows = range(len(names))
        if split_file is not None:
            listed = read_split_file(split_file)
            if not listed:
                raise UserError(f"split file {split_file} lists no images")
            wanted = {_norm(n) for n in listed}
            rows = [r for r in rows if names[r] is not None and _norm(str(names[r])) in wanted]
            if not rows:
                example_table = next((str(n) for n in names if n), "")
                raise UserError(
                    f"none of the {len(listed)} images listed in split file {split_file} matches the "
                    f"{image_column!r} column of {self.path} (split file: {listed[0]!r}, "
                    f"table: {example_table!r})")

        root = os.fspath(self.image_root)
        self.rows: list[int] = list(rows)
        self.names: list[str | None] = []
        self.images: list[str] = []
        self.captions: list[str] = []
        self._caption_errors: dict[int, str] = {}
        for i, r in enumerate(self.rows):
            name = names[r]
            if isinstance(name, bytes):
                name = name.decode("utf-8", errors="surrogateescape")
            name = name.strip() if isinstance(name, str) else None
            self.names.append(name or None)
            self.images.append(os.path.join(root, name) if name else "")
            try:
                self.captions.append(decode_caption(raw_captions[r]))
            except BadSample as bad:
                self.captions.append("")
                self._caption_errors[i] = bad.reason

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        return f"{self.names[index] or ''}#{self.rows[index]}"

    def caption_error(self, index: int) -> str | None:
        """Reason why row ``index``'s caption is unusable, or ``None``."""
        return self._caption_errors.get(index)

    def __getitem__(self, index: int) -> Sample | None:
        if index < 0:
            index += len(self)
        key = self.key(index)
        error = self._caption_errors.get(index)
        if error is not None:
            record_bad(error, self.stats, key)
            return None
        return load_sample(self.images[index] or None, self.captions[index], key, self.transform, self.stats,
                           fast=self.fast_decode)

    def grouped(self) -> list[tuple[str, list[int]]]:
        """``[(image_path, [row indices]), ...]``: each unique image (in order of first appearance) with
        the indices of its rows that have a usable caption, for image↔text retrieval. Every list is
        non-empty: rows without an image, and images none of whose captions is usable, are left out.
        (``paths, groups = zip(*table.grouped())`` gives the two lists.)"""
        order: dict[str, list[int]] = {}
        for i, path in enumerate(self.images):
            if path and i not in self._caption_errors:
                order.setdefault(path, []).append(i)
        return list(order.items())

    def image_dataset(self, transform: Callable | None = None) -> "ImageList":
        """Dataset over the unique images of :meth:`grouped` (same order), for encoding each image once;
        ``transform`` defaults to this table's."""
        return ImageList([path for path, _ in self.grouped()], transform if transform is not None else self.transform,
                         fast_decode=self.fast_decode)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, rows={len(self)}, "
                f"image_root={str(self.image_root)!r})")


class ImageList(torch.utils.data.Dataset):
    """Images only: ``dataset[i]`` is ``Sample(image, "", key=path)`` or ``None`` (reason counted).
    Works with ``ImageTextCollator`` (use ``tokenizer=None``)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable | None = None, *,
                 fast_decode: bool = False) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform
        self.fast_decode = fast_decode
        self.stats = SampleStats()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | None:
        path = self.paths[index]
        sample = load_sample(path or None, "-", path, self.transform, self.stats, fast=self.fast_decode)
        return None if sample is None else Sample(sample.image, "", sample.key)
