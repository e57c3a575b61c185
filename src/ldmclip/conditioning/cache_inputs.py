"""Where ``ldmclip cache-text`` reads captions from, cut into the chunks that become cache shards.

Each input chunk becomes exactly one output shard, named after the chunk, so a run can be resumed
(and split over ranks) by finished output shard:

* **webdataset shards** (``.tar``, brace patterns such as ``'data/{00000..00099}.tar'``, ``pipe:``
  and URLs): one input shard is one chunk; keys are the samples' ``__key__``; the caption is the
  ``.txt`` member. ``data/00042.tar`` becomes ``00042.safetensors``.
* **tables** (``.csv``, ``.tsv``, ``.tab``, ``.parquet``, ``.pq``; read with
  :func:`ldmclip.data.table.read_table`): ``shard_size`` consecutive data rows are one chunk, named
  ``{file stem}-{00000}``. Keys are the values of ``key_column`` or, by default, ``"{image}#{row}"``
  — exactly the keys :class:`ldmclip.data.CaptionTable` gives its samples, so the cache joins with
  that dataset as it is (``row`` is the 0-based data-row number). A table without the image column is keyed by row
  number (``"0"``, ``"1"``, ...).
* **text files** (any other suffix, e.g. ``.txt``): one caption per line, keys are the 1-based line
  numbers as strings (``"1"`` is the first line, as editors and ``sed -n 1p`` count); chunks of
  ``shard_size`` lines named ``{file stem}-{00000}``.

Each chunk yields ``(key, raw caption)`` with the caption as it was stored (``bytes`` for shards and
text files, ``str``/``None`` for tables); decoding and the bad-caption rules are the cache writer's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..core.errors import UserError
from ..core.formats import input_kind
from ..data.shards import shard_sizes as _shard_sizes
from ..data.table import table_chunk_names

__all__ = ["InputChunk", "open_inputs", "INPUT_FORMATS"]

INPUT_FORMATS = ("auto", "webdataset", "table", "text")
DEFAULT_SHARD_SIZE = 10_000


@dataclass
class InputChunk:
    """One unit of work: the captions that become one output shard.

    ``read(problems)`` yields ``(key, raw_caption)`` pairs; shard-level problems (an unreadable or
    truncated tar file) are added to the ``problems`` counter under the ``ldmclip.data`` reason
    names. ``source`` is a small JSON-able description stored in the output shard, used on resume
    to check that an existing shard was made from the same input.
    """

    name: str
    source: dict[str, Any]
    size: int | None
    read: Callable[[Any], Iterator[tuple[str, Any]]] = field(repr=False)


def _detect_format(path: str) -> str:
    kind = input_kind(path)
    if kind == "folder":  # else read as a text file: "caption file not found" would be a riddle
        raise UserError(f"{path} is a folder: give its webdataset shards ('{path}/{{00000..00099}}.tar'), a "
                        "table or a text file of captions")
    return {"shards": "webdataset", "table": "table"}.get(kind, "text")


def open_inputs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    input_format: str = "auto",
    *,
    caption_column: str = "caption",
    key_column: str | None = None,
    image_column: str = "image",
    shard_size: int = DEFAULT_SHARD_SIZE,
    sep: str | None = None,
) -> list[InputChunk]:
    """Cut ``source`` into chunks (see the module docs); a list is a list of webdataset shards.
    ``input_format`` is ``auto`` (by the name: ``.tar``/brace pattern/``pipe:`` is webdataset,
    a table suffix of ``core.formats`` (``.csv``, ``.tsv``, ``.tab``, ``.parquet``, ``.pq``) a table,
    anything else a text file), ``webdataset``, ``table`` or
    ``text``."""
    if input_format not in INPUT_FORMATS:
        raise UserError(f"unknown input format {input_format!r}; use one of {', '.join(INPUT_FORMATS)}")
    if int(shard_size) < 1:
        raise UserError(f"shard_size must be at least 1, got {shard_size}")
    if not isinstance(source, (str, os.PathLike)):  # a list of shard URLs / paths
        if input_format not in ("auto", "webdataset"):
            raise UserError("a list of inputs is read as webdataset shards; give a table or text file on its own")
        return _webdataset_chunks([os.fspath(s) for s in source])
    text = os.fspath(source)
    kind = _detect_format(text) if input_format == "auto" else input_format
    if kind == "webdataset":
        return _webdataset_chunks(text)
    if kind == "table":
        return _table_chunks(Path(text), caption_column, key_column, image_column, int(shard_size), sep)
    return _text_chunks(Path(text), int(shard_size))


# ----------------------------------------------------------------------------------------------------
# webdataset shards
# ----------------------------------------------------------------------------------------------------

def _webdataset_chunks(pattern: str | list[str]) -> list[InputChunk]:
    from ..data.shards import named_shards

    shards = named_shards(pattern, "cache")
    sizes = _shard_sizes([url for _, url in shards])
    return [InputChunk(name, {"shard": name}, size, _shard_reader(url)) for (name, url), size in zip(shards, sizes)]


def _shard_reader(url: str) -> Callable[[Any], Iterator[tuple[str, Any]]]:
    def read(problems: Any) -> Iterator[tuple[str, Any]]:
        for raw in read_shard_members(url, ("txt",), problems):
            yield raw["__key__"], raw.get("txt")

    return read


def read_shard_members(url: str, members: Sequence[str], problems: Any) -> Iterator[dict[str, Any]]:
    """The samples of one webdataset shard as ``{"__key__": key, member: bytes, ...}`` with only the
    ``members`` (extensions such as ``txt``, ``json``) read; shard-level problems go to ``problems``."""
    from ..data.samples import drain_pending
    from ..data.shards import ShardDataset

    # ShardDataset's streaming tar reader (only the wanted members are read; a truncated tar keeps
    # the complete samples before the cut). Images are not read at all: the members after the first
    # take the place of the image extensions (only which members are read depends on them).
    reader = ShardDataset(url, image_extensions=tuple(members[1:]), caption_extension=members[0], shuffle_buffer=0)
    try:
        yield from reader._read_shard(url)
    finally:
        problems.update(reader.stats.counts)
        drain_pending()  # those reasons are reported by the cache writer, not by a collator


# ----------------------------------------------------------------------------------------------------
# tables and text files
# ----------------------------------------------------------------------------------------------------

def _table_chunks(path: Path, caption_column: str, key_column: str | None, image_column: str,
                  shard_size: int, sep: str | None) -> list[InputChunk]:
    from ..data.table import read_table

    if key_column is not None:
        data = read_table(path, [caption_column, key_column], sep=sep)
    else:
        try:
            data = read_table(path, [caption_column, image_column], sep=sep)
        except ValueError:
            # No image column: keys are row numbers. (Any other problem raises from this second read.)
            data = read_table(path, [caption_column], sep=sep)
    captions = data[caption_column]
    if key_column is not None:
        keys = [_key_text(v) for v in data[key_column]]
        key_rule = {"key_column": key_column}
    elif image_column in data:
        # CaptionTable.key(): the image name as written (stripped) + "#" + the data-row number.
        keys = [f"{_key_text(v)}#{row}" for row, v in enumerate(data[image_column])]
        key_rule = {"key": f"{image_column}#row"}
    else:
        keys = [str(row) for row in range(len(captions))]
        key_rule = {"key": "row"}
    if not captions:
        raise UserError(f"{path} has no rows")
    return _slices(path, keys, captions, shard_size, {"table": path.name, **key_rule})


def _key_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="surrogateescape")
    return str(value).strip()


def _text_chunks(path: Path, shard_size: int) -> list[InputChunk]:
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if not lines:
        raise UserError(f"{path} is empty")
    keys = [str(i + 1) for i in range(len(lines))]
    return _slices(path, keys, lines, shard_size, {"text": path.name})


def _slices(path: Path, keys: Sequence[str], captions: Sequence[Any], shard_size: int,
            source: dict[str, Any]) -> list[InputChunk]:
    count = (len(keys) + shard_size - 1) // shard_size
    chunks = []
    for name, start in zip(table_chunk_names(path.stem, count), range(0, len(keys), shard_size)):
        stop = min(start + shard_size, len(keys))

        def read(problems: Any, start: int = start, stop: int = stop) -> Iterator[tuple[str, Any]]:
            del problems  # the whole file was read up front
            yield from zip(keys[start:stop], captions[start:stop])

        chunks.append(InputChunk(name, {**source, "rows": [start, stop]}, stop - start, read))
    return chunks
