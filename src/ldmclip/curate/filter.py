"""``filter_shards``: new webdataset shards holding only the samples a ``--where`` expression keeps.

The scores are the folder ``ldmclip embed`` writes (``metadata/*.parquet``: one row per embedded sample
with its ``key``, ``clip_score``, ``width``, ``height`` and head columns; ``dedup/dedup.parquet`` with
``dup_keep``, ``dup_group_size``, ... when near-duplicates were marked, joined on ``key``). Output folder::

    manifest.json          what made the folder: the expression, the input shards, the scores' files (sha256)
                           and the plan (data.store.ChunkStore's manifest rules)
    00000.tar, 00001.tar   the kept samples in input order, ``shard_size`` per shard: shard k holds kept
                           samples k*shard_size .. (k+1)*shard_size-1; every member of a sample (jpg, txt,
                           json, anything) byte-identical and in its original order
    sizes.json             samples per output shard (as ``ldmclip pack`` and img2dataset write it)
    decisions.parquet      every input sample: key, shard (its input shard), kept, reason (the failed clauses
                           of the expression, "not_scored" for a key the scores lack, "duplicate_key" for a
                           key an earlier input shard had), out_shard
    summary.json           counts kept / dropped by reason, the expression, the output shards, shard problems
    histograms.png         per number column of the expression: kept and dropped values, thresholds marked

Resuming: the plan (which kept key goes to which output shard) is a pure function of the inputs, so each
output shard is written atomically (a hidden temporary, then a rename) and a rerun skips the shards that
exist when the manifest says the same plan; a rerun with another expression, other shards or other scores
into the same folder is refused naming what differs. A killed run leaves only temporaries, removed next time.

Bad input: a truncated or unreadable input shard is counted and reported; its complete samples before the
cut are handled, the one the cut interrupted is dropped ("truncated_shard"). ``--out`` inside a folder of
the input shards or of the scores is refused before any work, as is an expression that names no column
of the scores.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.errors import UserError
from ..core.files import atomic_write, write_json_atomic, write_parquet_atomic
from ..data.samples import REASON_DUPLICATE_KEY, REASON_TRUNCATED_SHARD, SampleStats
from ..data.shards import ShardMembers, expand_urls
from ..data.store import ChunkStore
from ..data.writer import write_shard_file
from .embed import check_finished
from .where import Where, column_kind, column_values, parse_where

__all__ = ["filter_shards", "FilterReport", "FORMAT", "NOT_SCORED", "read_score_columns"]

FORMAT = "ldmclip-filtered-shards"
NOT_SCORED = "not_scored"
_MANIFEST_FIELDS = ("where", "inputs", "scores", "shard_size", "plan")
# Every member gets this time stamp (2000-01-01): the output bytes then depend only on the inputs, so an
# interrupted and resumed run writes the same files as one that ran through.
_MTIME = 946684800
_DEDUP = Path("dedup") / "dedup.parquet"


@dataclass
class FilterReport:
    """What :func:`filter_shards` did; ``summary`` is what ``summary.json`` holds."""

    out: Path
    summary: dict[str, Any]
    written: list[str] = field(default_factory=list)  # output shards written by this run
    resumed: list[str] = field(default_factory=list)  # output shards a previous run had finished

    @property
    def kept(self) -> int:
        return int(self.summary["kept"])

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.summary, "written": self.written, "resumed": self.resumed}


@dataclass
class _Scores:
    keys: np.ndarray                   # object array of str, one per score row
    values: dict[str, np.ndarray]      # per column the expression reads
    files: dict[str, str]              # relative path -> sha256 (the scores' identity in the manifest)


@dataclass
class _Listing:
    """The first pass: every input sample in order (shard index, key), and each shard's problem."""

    shard: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    per_shard: list[int] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    cut: list[tuple[int, str]] = field(default_factory=list)
    stats: SampleStats = field(default_factory=SampleStats)


def filter_shards(source_shards: str | Sequence[str], scores_dir: str | os.PathLike, where: str,
                  out: str | os.PathLike, *, shard_size: int = 10000, progress: bool = False,
                  on_shard: Callable[[str], None] | None = None) -> FilterReport:
    """Write the samples of ``source_shards`` that ``where`` keeps to new shards in ``out`` (module docs).

    Args:
        source_shards: a brace pattern (``"data/{00000..00099}.tar"``) or a list of shard paths/URLs.
        scores_dir: the folder ``ldmclip embed --out`` wrote.
        where: the expression (``curate.where``), e.g. ``"clip_score >= 0.28 and dup_keep"``.
        out: a new folder (or one this function wrote with the same inputs: it resumes).
        shard_size: kept samples per output shard.
        progress: tqdm progress bars.
        on_shard: called with each output shard's file name once it is in place.
    """
    if int(shard_size) < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    urls = expand_urls(source_shards)
    if not urls:
        raise UserError(f"no input shards in {source_shards!r}")
    scores_dir, out = Path(scores_dir), Path(out)
    _check_out(out, urls, scores_dir)
    metadata, dedup = _score_files(scores_dir)
    kinds = _column_kinds(metadata, dedup)
    expression = parse_where(where, kinds)  # before any work: a mistyped column costs nothing
    store = ChunkStore(out, FORMAT, "", ".tar", kind="filtered shard folder")
    existing = store.read_manifest()
    if existing is None:
        store.check_unrelated()
    scores = read_score_columns(scores_dir, expression.columns, metadata, dedup)

    manifest = {"format": FORMAT, "where": expression.text, "inputs": [_identity(u) for u in urls],
                "scores": {"path": str(scores_dir.resolve()), "files": scores.files}, "shard_size": int(shard_size)}
    _check_same(store, existing, manifest)  # the setup first: refused before the shards are read
    listing = _scan(urls, progress)
    decisions = _decide(listing, scores, expression)
    plan = _plan(listing, decisions["kept"], int(shard_size))
    manifest["plan"] = _plan_identity(plan, listing)
    _check_same(store, existing, manifest)  # then the plan: the same setup on changed shards is refused too
    store.create()
    store.write_manifest({**manifest, "complete": False})
    names = [f"{k:05d}" for k in range(len(plan))]
    out_shard = np.full(len(listing.keys), "", dtype=object)
    for name, rows in zip(names, plan):
        out_shard[rows] = f"{name}.tar"
    _write_decisions(out / "decisions.parquet", listing, urls, decisions, out_shard)

    report = FilterReport(out, {})
    _write_outputs(store, names, plan, listing, urls, report, progress, on_shard)
    write_json_atomic(out / "sizes.json", {f"{n}.tar": len(rows) for n, rows in zip(names, plan)}, sort_keys=True)
    _write_histograms(out / "histograms.png", expression, scores, decisions)
    report.summary = _summary(expression, listing, urls, decisions, names, plan, scores, int(shard_size))
    write_json_atomic(out / "summary.json", report.summary, sort_keys=True)
    store.write_manifest({**manifest, "complete": True})
    return report


# -- inputs and the output folder ---------------------------------------------------------------------------

def _check_same(store: ChunkStore, existing: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    if existing is not None:
        store.check_same(existing, manifest, [f for f in _MANIFEST_FIELDS if f in manifest], contents="shards filtered",
                         advice="Use a new --out folder, or the shards, --scores and --where it was made with.")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _identity(url: str) -> str:
    return os.path.abspath(url) if _is_local(url) else url


def _check_out(out: Path, urls: Sequence[str], scores_dir: Path) -> None:
    """Refuse an output folder that is, or lies inside, a folder of the inputs (the new shards would mix
    with the old ones, and a later ``*.tar`` pattern would read both)."""
    target = out.resolve()
    folders = {Path(u).resolve().parent: "a folder of the input shards" for u in urls if _is_local(u)}
    folders[scores_dir.resolve()] = "the --scores folder"
    for folder, what in folders.items():
        if target == folder or folder in target.parents:
            raise UserError(f"--out {out} is inside {folder} ({what}); choose a new folder outside it, e.g. "
                            f"{folder.parent / (folder.name + '-filtered')}")


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the parquet and test extras
        raise UserError("ldmclip filter reads the scores' parquet files: pip install pyarrow") from None
    return pq


def _score_files(scores_dir: Path) -> tuple[list[Path], Path | None]:
    if not scores_dir.is_dir():
        raise UserError(f"--scores {scores_dir} is not a folder; pass the folder 'ldmclip embed --out' wrote")
    check_finished(scores_dir)
    metadata = sorted(p for p in (scores_dir / "metadata").glob("*.parquet") if not p.name.startswith("."))
    if not metadata:
        raise UserError(f"--scores {scores_dir} holds no metadata/*.parquet; pass the folder 'ldmclip embed --out' "
                        "wrote (after at least one shard is finished)")
    dedup = scores_dir / _DEDUP
    return metadata, (dedup if dedup.is_file() else None)


def _read_schema(path: Path) -> Any:
    try:
        return _pyarrow_parquet().read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid etc.
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); is the scores folder damaged?") from None


def _column_kinds(metadata: Sequence[Path], dedup: Path | None) -> dict[str, str]:
    """The columns an expression can use (name -> kind): those every metadata file has, then dedup's."""
    kinds: dict[str, str] = {}
    schemas = [_read_schema(p) for p in metadata]
    for f in schemas[0]:
        kind = column_kind(f.type)
        if kind is not None and all(f.name in s.names for s in schemas[1:]):
            kinds[f.name] = kind
    if dedup is not None:
        for f in _read_schema(dedup):
            kind = column_kind(f.type)
            if kind is not None and f.name != "key":
                kinds.setdefault(f.name, kind)
    if "key" not in kinds:
        raise UserError(f"{metadata[0]} has no 'key' column; pass the folder 'ldmclip embed --out' wrote")
    return kinds


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_score_columns(scores_dir: str | os.PathLike, columns: Sequence[str], metadata: Sequence[Path] | None = None,
                       dedup: Path | None = None) -> _Scores:
    """The keys of every metadata row (sorted files, concatenated) and the values of ``columns`` (a
    column of ``dedup/dedup.parquet`` is joined on key; a row dedup lacks reads as null there)."""
    pq = _pyarrow_parquet()
    scores_dir = Path(scores_dir)
    if metadata is None:
        metadata, dedup = _score_files(scores_dir)
    kinds = _column_kinds(metadata, dedup)
    first = set(_read_schema(metadata[0]).names)
    own = [c for c in columns if c in first and c != "key"]
    keys, values = [], {c: [] for c in own}
    for path in metadata:
        table = pq.read_table(path, columns=["key", *own])
        keys.append(column_values(table.column("key"), "string"))
        for c in own:
            values[c].append(column_values(table.column(c), kinds[c]))
    all_keys = np.concatenate(keys)
    _check_unique(all_keys, "the scores' metadata")
    joined = {c: np.concatenate(v) for c, v in values.items()}
    files = {str(p.relative_to(scores_dir)): _sha256(p) for p in metadata}
    from_dedup = [c for c in columns if c not in joined and c != "key"]
    if from_dedup and dedup is not None:
        table = pq.read_table(dedup, columns=["key", *from_dedup])
        dedup_keys = column_values(table.column("key"), "string")
        _check_unique(dedup_keys, str(dedup))
        row = _lookup(dedup_keys, all_keys)
        for c in from_dedup:
            column = column_values(table.column(c), kinds[c])
            joined[c] = _take(column, row, kinds[c])
        files[str(_DEDUP)] = _sha256(dedup)
    if "key" in columns:
        joined["key"] = all_keys
    return _Scores(all_keys, joined, files)


def _check_unique(keys: np.ndarray, where: str) -> None:
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise UserError(f"{where} has the key {unique[counts > 1][0]!r} more than once; keys must be unique")


def _lookup(table_keys: np.ndarray, wanted: Sequence[str] | np.ndarray) -> np.ndarray:
    """Per wanted key, its row in ``table_keys`` (-1: absent)."""
    rows = {k: i for i, k in enumerate(table_keys.tolist())}
    return np.fromiter((rows.get(k, -1) for k in wanted), dtype=np.int64, count=len(wanted))


def _take(column: np.ndarray, row: np.ndarray, kind: str) -> np.ndarray:
    """``column[row]`` with a null (NaN, False, "") where ``row`` is -1."""
    missing = {"number": np.nan, "bool": False, "string": ""}[kind]
    taken = column[np.maximum(row, 0)] if len(column) else np.full(len(row), missing, dtype=column.dtype)
    taken = taken.copy()
    taken[row < 0] = missing
    return taken


# -- the first pass and the plan ------------------------------------------------------------------------------

def _scan(urls: Sequence[str], progress: bool) -> _Listing:
    """List every sample of every input shard (member names only; nothing is decoded)."""
    listing = _Listing()
    bar = _bar(progress, len(urls), "shards", "scan")
    try:
        for i, url in enumerate(urls):
            members = ShardMembers(url, listing.stats, read=False)
            count = 0
            for key, _ in members:
                listing.shard.append(i)
                listing.keys.append(key)
                count += 1
            listing.per_shard.append(count)
            if members.problem is not None:
                listing.problems[url] = members.problem
            if members.cut_key is not None:
                listing.cut.append((i, members.cut_key))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return listing


def _decide(listing: _Listing, scores: _Scores, expression: Where) -> dict[str, np.ndarray]:
    """Per input sample: ``kept``, ``reason`` and ``row`` (its score row, -1: not scored)."""
    n = len(scores.keys)
    score_kept, score_reasons = expression.reasons(scores.values, n)
    row = _lookup(scores.keys, listing.keys)
    kept = np.zeros(len(row), dtype=bool)
    reason = np.full(len(row), NOT_SCORED, dtype=object)
    scored = row >= 0
    kept[scored] = score_kept[row[scored]]
    reason[scored] = score_reasons[row[scored]]
    # A key an earlier input shard had: its scores are that sample's; only the first is used.
    seen: set[str] = set()
    for i, key in enumerate(listing.keys):
        if key in seen:
            kept[i], reason[i] = False, REASON_DUPLICATE_KEY
        seen.add(key)
    return {"kept": kept, "reason": reason, "row": row}


def _plan(listing: _Listing, kept: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """The input rows of each output shard: kept samples in input order, ``shard_size`` per shard."""
    rows = np.flatnonzero(kept)
    return [rows[start:start + shard_size] for start in range(0, len(rows), shard_size)]


def _plan_identity(plan: Sequence[np.ndarray], listing: _Listing) -> dict[str, Any]:
    digest = hashlib.sha256()
    for k, rows in enumerate(plan):
        for r in rows.tolist():
            digest.update(f"{k}\t{listing.shard[r]}\t{listing.keys[r]}\n".encode("utf-8", "surrogateescape"))
    return {"sha256": digest.hexdigest(), "shards": len(plan), "samples": int(sum(len(r) for r in plan))}


# -- writing ---------------------------------------------------------------------------------------------------

def _write_outputs(store: ChunkStore, names: Sequence[str], plan: Sequence[np.ndarray], listing: _Listing,
                   urls: Sequence[str], report: FilterReport, progress: bool,
                   on_shard: Callable[[str], None] | None) -> None:
    """Write each output shard that is not there yet, reading only the input shards it needs."""
    missing = [k for k, name in enumerate(names) if not store.chunk_path(name).is_file()]
    report.resumed = [f"{names[k]}.tar" for k in range(len(names)) if k not in set(missing)]
    destination: dict[int, dict[str, int]] = {}  # input shard -> key -> output shard
    for k in missing:
        for r in plan[k].tolist():
            destination.setdefault(listing.shard[r], {})[listing.keys[r]] = k
    bar = _bar(progress, sum(listing.per_shard[i] for i in destination), "img", "filter")

    def kept_samples() -> Iterator[tuple[int, str, list[tuple[str, bytes]]]]:
        for i in sorted(destination):
            wanted = destination[i]
            for key, members in ShardMembers(urls[i], SampleStats()):  # (problems were counted by the scan)
                if bar is not None:
                    bar.update(1)
                if key in wanted:
                    yield wanted[key], key, members

    try:
        for k, group in itertools.groupby(kept_samples(), key=lambda item: item[0]):
            expected = [listing.keys[r] for r in plan[k].tolist()]
            path = store.chunk_path(names[k])
            atomic_write(path, functools.partial(_write_checked, samples=((key, m) for _, key, m in group),
                                                 expected=expected, name=path.name))
            report.written.append(path.name)
            if on_shard is not None:
                on_shard(path.name)
    finally:
        if bar is not None:
            bar.close()
    absent = [f"{names[k]}.tar" for k in missing if f"{names[k]}.tar" not in report.written]
    if absent:
        raise UserError(f"the input shards changed while filtering: no samples for {', '.join(absent[:3])}; "
                        "rerun on shards that are not being written")


def _write_checked(temp: Path, *, samples: Iterator[tuple[str, list]], expected: list[str], name: str) -> None:
    """One output shard, checked against the plan: the inputs must still hold what the scan listed."""
    got: list[str] = []

    def checked() -> Iterator[tuple[str, list]]:
        for key, members in samples:
            got.append(key)
            yield key, members

    stream = checked()
    counts: dict[str, int] = {}
    write_shard_file(temp, first=next(stream), rest=stream, limit=len(expected), name=name, counts=counts, mtime=_MTIME)
    if got != expected:
        raise UserError(f"the input shards changed while filtering ({name} was to hold {len(expected)} samples, "
                        f"{len(got)} were found in order); rerun on shards that are not being written")


def _write_decisions(path: Path, listing: _Listing, urls: Sequence[str], decisions: dict[str, np.ndarray],
                     out_shard: np.ndarray) -> None:
    import pyarrow as pa

    keys = list(listing.keys) + [key for _, key in listing.cut]
    shards = [urls[i] for i in listing.shard] + [urls[i] for i, _ in listing.cut]
    cut = len(listing.cut)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "shard": pa.array(shards, pa.string()),
        "kept": pa.array(np.concatenate([decisions["kept"], np.zeros(cut, dtype=bool)]), pa.bool_()),
        "reason": pa.array(list(decisions["reason"]) + [REASON_TRUNCATED_SHARD] * cut, pa.string()),
        "out_shard": pa.array([s or None for s in out_shard.tolist()] + [None] * cut, pa.string()),
    })
    write_parquet_atomic(path, table)


def _write_histograms(path: Path, expression: Where, scores: _Scores, decisions: dict[str, np.ndarray]) -> None:
    """One panel per number column of the expression: kept and dropped values of the scored input samples,
    each threshold a dashed line. A text panel when the expression uses no number column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [c for c in expression.columns if scores.values[c].dtype == np.float64]
    row, kept = decisions["row"], decisions["kept"]
    scored = row >= 0
    fig, axes = plt.subplots(1, max(1, len(numeric)), figsize=(4.5 * max(1, len(numeric)), 3.4), squeeze=False)
    for ax, column in zip(axes[0], numeric):
        values = scores.values[column][row[scored]]
        keep = kept[scored]
        finite = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(finite, bins=40) if finite.size else 10
        ax.hist(values[keep & np.isfinite(values)], bins=bins, alpha=0.6, label=f"kept ({int(keep.sum())})")
        ax.hist(values[~keep & np.isfinite(values)], bins=bins, alpha=0.6, label=f"dropped ({int((~keep).sum())})")
        for threshold in expression.thresholds.get(column, ()):
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_title(column)
        ax.set_xlabel(column)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    if not numeric:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, f"{expression.text}\nuses no number column", ha="center", va="center")
    fig.suptitle(f"--where {expression.text}", fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=100, metadata={"Software": None}))
    finally:
        plt.close(fig)


def _summary(expression: Where, listing: _Listing, urls: Sequence[str], decisions: dict[str, np.ndarray],
             names: Sequence[str], plan: Sequence[np.ndarray], scores: _Scores, shard_size: int) -> dict[str, Any]:
    kept, reason = decisions["kept"], decisions["reason"]
    by_reason = Counter(r for r, k in zip(reason.tolist(), kept.tolist()) if not k)
    if listing.cut:
        by_reason[REASON_TRUNCATED_SHARD] += len(listing.cut)
    by_clause = Counter()
    for r, count in by_reason.items():
        for clause in r.split("; ") if r not in (NOT_SCORED, REASON_DUPLICATE_KEY, REASON_TRUNCATED_SHARD) else ():
            by_clause[clause] += count
    in_input = set(listing.keys)
    return {
        "where": expression.text,
        "clauses": list(expression.clauses),
        "input_shards": len(urls),
        "input_samples": len(listing.keys) + len(listing.cut),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()) + len(listing.cut),
        "dropped_by_reason": dict(by_reason.most_common()),
        "failed_by_clause": {c: by_clause.get(c, 0) for c in expression.clauses},
        "scored_not_in_input": int(sum(1 for k in scores.keys.tolist() if k not in in_input)),
        "shard_size": shard_size,
        "output_shards": [f"{n}.tar" for n in names],
        "output_sizes": [len(rows) for rows in plan],
        "shard_problems": dict(listing.problems),
        "skipped": dict(sorted(listing.stats.counts.items())),
    }


def _bar(progress: bool, total: int, unit: str, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

