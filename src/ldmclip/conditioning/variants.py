"""Caption variants in the text-embedding cache: several captions per key (the shard's alt-text and a
synthetic caption from its ``.json``, or several table columns), each encoded once.

``ldmclip cache-text --caption-variant NAME=SOURCE`` (repeatable; the first is the default):

* webdataset shards: ``SOURCE`` is a member extension (``txt``, or e.g. ``synthetic.txt``) or
  ``json:FIELD``, a string field of the sample's ``.json`` member; ``json:a.b`` is the field ``b``
  inside the object ``a``;
* tables: ``SOURCE`` is a column name;
* text files have one caption per line and no variants.

What is stored (see ``cache.py`` for the rest of the layout), only when variants are asked for:

* the manifest's ``"variants"``: ``[{"name": ..., "source": ...}, ...]`` in the order given; resuming a
  cache with other variants is refused (it is one of the checked manifest fields);
* each shard's metadata ``"variants"``: for each name, the row of every key (aligned with ``"keys"``),
  ``null`` where the key has no usable caption of that variant. ``"rows"`` stays what it always was,
  the row ``cache[key]`` reads: the key's default variant, or its first usable one in the listed order
  when the default is missing. Readers that know nothing of variants therefore read such a cache as a
  plain cache of those captions, so the format version stays 1.
* each shard's ``counts["variants"]``: per name, the keys that have it and the skipped ones by reason
  (``missing_caption``, ``empty_caption``, ``bad_caption_encoding``, ``caption_too_long``, and for
  ``json:`` variants ``bad_json`` (the member is not a JSON object) and ``caption_not_text`` (the field
  is a number, a list, ...)).

A key is stored when at least one of its variants is usable; a key with none is skipped and counted
under the reason of its default variant. Identical captions of a shard share one row, also across
variants (a synthetic caption equal to the alt-text is encoded once).
"""

from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..core.errors import UserError
from ..data.samples import REASON_DUPLICATE_KEY, BadSample, decode_caption

__all__ = ["CaptionVariant", "parse_variants", "open_variant_inputs", "plan_variant_records", "DEFAULT_VARIANT",
           "REASON_BAD_JSON", "REASON_NOT_TEXT"]

DEFAULT_VARIANT = "default"  # the name of the one caption of a cache made without variants
JSON_PREFIX = "json:"
REASON_BAD_JSON = "bad_json"
REASON_NOT_TEXT = "caption_not_text"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CaptionVariant:
    """One caption of a key: its ``name`` and where it comes from (``source``: a shard member extension,
    ``json:FIELD`` or a table column)."""

    name: str
    source: str

    @property
    def json_path(self) -> tuple[str, ...] | None:
        """The field path of a ``json:a.b`` source (``("a", "b")``); None for other sources."""
        return tuple(self.source[len(JSON_PREFIX):].split(".")) if self.source.startswith(JSON_PREFIX) else None

    def as_manifest(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source}


def parse_variants(specs: Sequence[str | CaptionVariant]) -> list[CaptionVariant]:
    """``NAME=SOURCE`` strings (or ``CaptionVariant``) -> variants, checked: names well formed and distinct."""
    variants = []
    for spec in specs:
        if isinstance(spec, CaptionVariant):
            variants.append(spec)
            continue
        name, sep, source = str(spec).partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise UserError(f"caption variant {spec!r}: write NAME=SOURCE, e.g. txt=txt, synthetic=json:caption "
                            "(shards) or alt=alt_text (a table column)")
        if not _NAME_RE.match(name):
            raise UserError(f"caption variant name {name!r}: use letters, digits and _ . + - only")
        variants.append(CaptionVariant(name, source))
    if not variants:
        raise UserError("no caption variants given")
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"caption variant name(s) {', '.join(twice)} given more than once; each needs its own name")
    return variants


# ----------------------------------------------------------------------------------------------------
# Inputs: chunks whose records are (key, {variant name: raw caption or BadSample})
# ----------------------------------------------------------------------------------------------------

def open_variant_inputs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    variants: Sequence[CaptionVariant],
    input_format: str = "auto",
    *,
    key_column: str | None = None,
    image_column: str = "image",
    shard_size: int = 10_000,
    sep: str | None = None,
) -> list[Any]:
    """The input chunks of ``source`` (named, split and keyed exactly as ``cache_inputs.open_inputs`` does)
    whose ``read(problems)`` yields ``(key, {name: raw})``: the raw caption of each variant (bytes, str
    or None), or the :class:`~ldmclip.data.samples.BadSample` that says why a ``json:`` field gave none."""
    from . import cache_inputs

    if input_format not in cache_inputs.INPUT_FORMATS:
        raise UserError(f"unknown input format {input_format!r}; use one of {', '.join(cache_inputs.INPUT_FORMATS)}")
    if isinstance(source, (str, os.PathLike)):
        kind = cache_inputs._detect_format(os.fspath(source)) if input_format == "auto" else input_format
    else:
        kind = "webdataset" if input_format in ("auto", "webdataset") else input_format
    if kind == "webdataset":
        return _webdataset_variant_chunks(source, variants)
    if kind == "table":
        if not isinstance(source, (str, os.PathLike)):
            raise UserError("a list of inputs is read as webdataset shards; give a table on its own")
        return _table_variant_chunks(Path(source), variants, key_column, image_column, int(shard_size), sep)
    raise UserError(f"{source} is a text file of captions, one per line: it has no caption variants; give "
                    "webdataset shards (txt=txt, synthetic=json:FIELD) or a table (NAME=COLUMN)")


def _webdataset_variant_chunks(source: Any, variants: Sequence[CaptionVariant]) -> list[Any]:
    from ..data.shards import expand_urls
    from . import cache_inputs

    for v in variants:
        member = "json" if v.json_path is not None else v.source
        if not _MEMBER_RE.match(member) or (v.json_path is not None and not all(v.json_path)):
            raise UserError(f"caption variant {v.name}={v.source}: for shards give a member extension (txt) "
                            "or json:FIELD (json:a.b for a nested field)")
    pattern = os.fspath(source) if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    chunks = cache_inputs._webdataset_chunks(pattern)
    urls = expand_urls(pattern)
    # _webdataset_chunks keeps the order of expand_urls: chunk i reads url i
    return [replace(chunk, read=_variant_shard_reader(url, variants)) for chunk, url in zip(chunks, urls)]


def _variant_shard_reader(url: str, variants: Sequence[CaptionVariant]) -> Any:
    from .cache_inputs import read_shard_members

    members = sorted({"json" if v.json_path is not None else v.source for v in variants})

    def read(problems: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for raw in read_shard_members(url, members, problems):
            parsed: list[Any] = []  # the .json member, parsed once per sample when a variant needs it
            yield raw["__key__"], {v.name: _member_caption(v, raw, parsed) for v in variants}

    return read


def _member_caption(variant: CaptionVariant, raw: dict[str, Any], parsed: list[Any]) -> Any:
    path = variant.json_path
    if path is None:
        return raw.get(variant.source)
    if not parsed:
        parsed.append(_parse_json(raw.get("json")))
    value = parsed[0]
    if isinstance(value, BadSample):
        return value
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None  # missing_caption: no such field in this sample
        value = value[name]
    if value is None or isinstance(value, str):
        return value
    return BadSample(REASON_NOT_TEXT, f"{variant.source} is a {type(value).__name__}")


def _parse_json(data: bytes | None) -> Any:
    if data is None:
        return {}  # no .json member: every json: variant is missing
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return BadSample(REASON_BAD_JSON, str(e))
    return value if isinstance(value, dict) else BadSample(REASON_BAD_JSON, "not a JSON object")


def _table_variant_chunks(path: Path, variants: Sequence[CaptionVariant], key_column: str | None,
                          image_column: str, shard_size: int, sep: str | None) -> list[Any]:
    from ..data.table import read_table
    from .cache_inputs import _table_chunks

    columns = list(dict.fromkeys(v.source for v in variants))
    # The chunks (names, keys, sources) of the default variant's column, as a run without variants makes them.
    chunks = _table_chunks(path, columns[0], key_column, image_column, shard_size, sep)
    data = read_table(path, columns, sep=sep)
    out = []
    for chunk in chunks:
        start, stop = chunk.source["rows"]
        keys = [key for key, _ in chunk.read(None)]
        records = [{v.name: data[v.source][row] for v in variants} for row in range(start, stop)]

        def read(problems: Any, keys: list[str] = keys, records: list[dict[str, Any]] = records) -> Iterator[Any]:
            del problems  # the whole table was read up front
            yield from zip(keys, records)

        out.append(replace(chunk, read=read))
    return out


# ----------------------------------------------------------------------------------------------------
# Planning a chunk: which captions to encode, which row each (key, variant) points to
# ----------------------------------------------------------------------------------------------------

@dataclass
class VariantPlan:
    """A chunk with variants once read and cleaned (the fields of ``cache._Plan`` + ``variant_rows``)."""

    keys: list[str]
    rows: list[int]
    captions: list[str]
    counts: dict[str, Any]
    variant_rows: dict[str, list[int | None]]


def _clean(raw: Any, max_chars: int) -> str:
    if isinstance(raw, BadSample):
        raise raw
    caption = decode_caption(raw)
    return caption[:max_chars]


def plan_variant_records(records: Iterable[tuple[str, dict[str, Any]]], names: Sequence[str],
                         max_chars: int) -> VariantPlan:
    """Keys, default rows, unique captions (in order of first appearance, key by key, variant by variant)
    and counts of one chunk's ``(key, {name: raw})`` records (the rules are in the module docs)."""
    keys: list[str] = []
    rows: list[int] = []
    variant_rows: dict[str, list[int | None]] = {name: [] for name in names}
    unique: dict[str, int] = {}
    stored: set[str] = set()
    skipped: collections.Counter = collections.Counter()
    per_variant = {name: {"keys": 0, "skipped": collections.Counter()} for name in names}
    n = 0
    for key, raws in records:
        n += 1
        key = str(key)
        if key in stored:
            skipped[REASON_DUPLICATE_KEY] += 1
            continue
        captions: dict[str, str] = {}
        reasons: dict[str, str] = {}
        for name in names:
            try:
                captions[name] = _clean(raws.get(name), max_chars)
            except BadSample as bad:
                reasons[name] = bad.reason
        for name, reason in reasons.items():
            per_variant[name]["skipped"][reason] += 1
        if not captions:
            skipped[reasons[names[0]]] += 1
            continue
        stored.add(key)
        keys.append(key)
        for name in names:
            row = unique.setdefault(captions[name], len(unique)) if name in captions else None
            variant_rows[name].append(row)
            if row is not None:
                per_variant[name]["keys"] += 1
        rows.append(next(variant_rows[name][-1] for name in names if name in captions))
    counts = {"records": n, "keys": len(keys), "unique": len(unique), "skipped": dict(sorted(skipped.items())),
              "variants": {name: {"keys": c["keys"], "skipped": dict(sorted(c["skipped"].items()))}
                           for name, c in per_variant.items()}}
    return VariantPlan(keys, rows, list(unique), counts, variant_rows)


# ----------------------------------------------------------------------------------------------------
# Reading: which row each (key, variant) points to
# ----------------------------------------------------------------------------------------------------

class VariantIndex(dict):
    """The reader's key index: ``key -> (shard number, row)`` of the row ``cache[key]`` reads.

    A ``(key, variant name)`` pair resolves too, through ``__missing__``, to that variant's
    ``(shard number, row)``, so that the reader reads a variant through its one ``__getitem__`` (whatever
    that does with a stored row) while ``len``, iteration and ``in`` see only the keys (dict's own
    ``__contains__`` and ``__iter__`` never call ``__missing__``). A cache made without variants has one,
    :data:`DEFAULT_VARIANT`."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names: list[str] = list(names) or [DEFAULT_VARIANT]
        self.rows: dict[str, tuple[int | None, ...]] = {}  # per key, a row per name (caches with variants)

    def add_variants(self, number: int, meta: dict[str, Any]) -> None:
        """Record the variant rows of shard ``number`` for the keys this shard resolves (the first shard of a
        duplicate key wins, as for ``rows``)."""
        by_name = meta.get("variants")
        if not by_name:
            return
        columns = [by_name.get(name) or [None] * len(meta["keys"]) for name in self.names]
        for position, key in enumerate(meta["keys"]):
            if dict.get(self, key, (None,))[0] == number:
                self.rows[key] = tuple(None if c[position] is None else int(c[position]) for c in columns)

    def rows_of(self, key: str) -> tuple[int | None, ...]:
        """The row of each variant of ``key`` (None: absent); ``KeyError`` for an unknown key."""
        number, row = dict.__getitem__(self, key)
        return self.rows.get(key, (row,) + (None,) * (len(self.names) - 1))

    def __missing__(self, item: Any) -> tuple[int, int]:
        if isinstance(item, tuple) and len(item) == 2 and item[1] in self.names:
            key, name = item
            row = self.rows_of(key)[self.names.index(name)]
            if row is not None:
                return dict.__getitem__(self, key)[0], row
        raise KeyError(item)
