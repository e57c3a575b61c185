"""webdataset shards in the img2dataset / LAION layout: ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt``
(+ ``{key}.json``, ignored) inside ``.tar`` files.

``ShardDataset`` is an ``IterableDataset`` that yields :class:`~ldmclip.data.samples.Sample` /
``None`` like every ldmclip dataset. It is built from webdataset's parts (URL brace expansion,
``gopen`` for local paths, ``pipe:``, ``http(s)://`` and the other schemes webdataset opens, its
shuffle buffer) around a lean reader: only the image member that is used and the caption are read
from the tar stream (other members are skipped), no generic decoders run, the shuffle buffer holds
encoded bytes, and the image goes straight from bytes to the transform. Tokenization happens in
``ImageTextCollator``, once per batch.

Splitting and shuffling, per epoch ``e`` (``set_epoch``):

* default (``resampled=False``): the shard list is shuffled with a seed made of ``(seed, e)`` — the
  same order on every node and worker — then node ``rank`` takes every ``world_size``-th shard and
  DataLoader worker ``w`` every ``num_workers``-th of those. Each shard is read by exactly one worker
  of one node: no duplicates. Use at least ``world_size * num_workers`` shards (more is better); a
  worker without shards yields nothing.
* ``resampled=True``: each worker of each node draws shards with replacement, forever, from its own
  RNG seeded with ``(seed, e, rank, worker)``; the trainer decides how many steps make an epoch.

Samples are then mixed in a buffer of ``shuffle_buffer`` encoded samples (RNG seeded with
``(seed, e, rank, worker)``); ``shuffle_buffer=0`` keeps file order (evaluation).

Exact resume (the trainer's ``--resume``): a reader is one DataLoader worker of one node, and what it
yields in an epoch is a pure function of ``(seed, epoch, rank, worker)``. :meth:`ShardDataset.resume_at`
gives each reader the number of items (samples and ``None`` items) it has already handed out; the reader then
fast-forwards by replaying that many items through the same shuffle buffer while reading tar *headers*
only (no member is extracted, no image is decoded), fills in the bytes of the samples still in the buffer,
and goes on. ``reader_offset`` renames the readers (loader worker ``i`` plays reader ``(i + offset) % W``) so
that a fresh DataLoader, which always starts with its worker 0, continues the round robin where it was.
Random crops are seeded per item from the same tuple and the item's count (``seed_sample`` of the
transform, when it has one), so a resumed reader also crops as an uninterrupted one.

Bad data is skipped and counted: unreadable shards, truncated tar files (counted once per shard; the
complete samples before the cut are kept), and bad samples are counted by reason (``samples`` module
docs); a key seen before in the same shard is counted as ``duplicate_key`` and only its first sample is
used. A stream that cannot be used at all stops instead of spinning: a reader that gets no complete
image-caption pair from any shard for ``stall_attempts`` shard attempts in a row, for ``stall_seconds``,
or from every shard of the pattern raises :class:`ShardStallError`, a ``UserError`` naming the shards and
what went wrong with each (not found, empty file, not a tar file, ...). Without resampling a stream
ends anyway, so there only a reader that tried every shard of the pattern in vain raises.

Inside a DataLoader worker the stream also ends with its parent: on Linux the kernel kills the worker
when the process that started it dies (:func:`exit_with_parent`), elsewhere the worker checks its
parent before each shard.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import multiprocessing.context
import os
import random
import re
import stat
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch.utils.data

from ..core.errors import UserError
from ..core.launch import process_rank
from .samples import (REASON_DUPLICATE_KEY, REASON_SHARD_ERROR, REASON_SHARD_UNREADABLE, REASON_TRUNCATED_SHARD,
                      Sample, SampleStats, clear_pending, exit_if_orphaned, exit_with_parent, has_pending, load_sample,
                      record_bad)

__all__ = ["ShardDataset", "ShardStallError", "ShardMembers", "make_shard_pipeline", "expand_urls", "dataset_size",
           "exit_with_parent", "IMAGE_EXTENSIONS", "STALL_ATTEMPTS", "STALL_SECONDS", "shard_name", "named_shards", "shard_sizes",
           "failed_as_a_whole"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TAR_BUFSIZE = 64 * 1024  # larger buffers make tarfile slower (it slices its buffer per read)
# A stalled stream: this many shard attempts in a row, or this long, without a usable sample. Even with
# 90% of the shards missing, 100 failures in a row come once in ~40,000 attempts.
STALL_ATTEMPTS = 100
STALL_SECONDS = 300.0
_STALL_EXAMPLES = 5  # shards named in the message
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http:, s3:, ... (2+ letters: not a drive letter)
# The raw sample entry of every member in member order, when all members are listed (ShardMembers): upper
# case, so no member suffix (lower-cased by _split_name) can be the same name.
_MEMBERS = "__MEMBERS__"
_UNREAD = "__UNREAD__"  # a raw sample read in a fast-forward: headers only, its wanted members are b""


class ShardStallError(UserError):
    """No usable sample from any shard of a stream (see the module docs).

    Raised inside a DataLoader worker, torch rebuilds it in the main process from the worker's whole
    traceback text (``type(error)(text)``); the constructor takes the one-line message back out of it,
    so the command line still shows one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_worker_message(message, type(self)))


def _worker_message(text: str, cls: type) -> str:
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):]
    return text


class _StallWatch:
    """Counts the shard attempts in a row that gave no usable sample, and raises when that is a stall."""

    def __init__(self, urls: Sequence[str], bounded: bool, attempts: int, seconds: float) -> None:
        self.shards = frozenset(urls)
        self.attempts_limit = attempts if bounded else None
        self.seconds_limit = seconds if bounded else None
        self.ok()

    def ok(self) -> None:
        self.attempts, self.since, self.failed = 0, 0.0, {}

    def failed_shard(self, url: str, problem: str) -> None:
        if self.attempts == 0:
            self.since = time.monotonic()
        self.attempts += 1
        self.failed[url] = problem
        waited = time.monotonic() - self.since
        if (len(self.failed) >= len(self.shards)
                or (self.attempts_limit is not None and self.attempts >= self.attempts_limit)
                or (self.seconds_limit is not None and waited >= self.seconds_limit)):
            raise ShardStallError(self.message(waited))

    def message(self, waited: float) -> str:
        examples = "; ".join(f"{url}: {problem}" for url, problem in list(self.failed.items())[:_STALL_EXAMPLES])
        more = len(self.failed) - _STALL_EXAMPLES
        if more > 0:
            examples += f" and {more} more"
        return (f"no usable image-caption sample from the webdataset shards in {self.attempts} shard "
                f"attempt(s) in a row ({waited:.0f} s; {len(self.failed)} of the {len(self.shards)} shards "
                f"tried): {examples}. Check the shard pattern and the files")


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard list from a brace pattern (``'data/{00000..00009}.tar'``; several patterns may be joined
    with ``::``, as in webdataset/OpenCLIP) or from a list of URLs/paths (each brace-expanded too)."""
    from webdataset.shardlists import expand_urls as wds_expand

    if isinstance(urls, (str, os.PathLike)):
        items = [os.fspath(urls)]
    else:
        items = [os.fspath(u) for u in urls]
    out: list[str] = []
    for item in items:
        out.extend(wds_expand(item))
    return out


def dataset_size(urls: str | Iterable[str]) -> int | None:
    """Number of samples from the ``sizes.json`` files next to local shards (``ldmclip pack`` and
    img2dataset write them; OpenCLIP reads them too), or ``None`` when some shard is not listed."""
    total = 0
    cache: dict[Path, dict[str, int]] = {}
    for url in expand_urls(urls):
        if "://" in url or url.startswith("pipe:"):
            return None
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in cache:
            try:
                cache[sizes_file] = json.loads(sizes_file.read_text())
            except (OSError, ValueError):
                return None
        n = cache[sizes_file].get(path.name)
        if n is None:
            return None
        total += int(n)
    return total


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def shard_name(url: str, index: int) -> str:
    """The name of the output made from shard ``url`` (the ``index``-th of its list): the shard's file
    stem (``data/00042.tar`` -> ``00042``), or ``shard-{index:06d}`` when the URL has no usable one.
    The text cache and ``ldmclip embed`` name their per-shard files by it."""
    # The last "name.tar" in the URL (also inside a `pipe:aws s3 cp s3://b/00042.tar -` command).
    found = re.findall(r"([^/\s:'\"]+?)\.tar(?:\.gz)?(?=$|[\s'\"?#])", url)
    name = found[-1] if found else ""
    return name if _NAME_RE.match(name) else f"shard-{index:06d}"


def named_shards(source: str | os.PathLike | Iterable[str | os.PathLike], verb: str) -> list[tuple[str, str]]:
    """``(name, url)`` of every shard of ``source`` (a brace pattern or a list), named by :func:`shard_name`,
    for commands that write one output per input shard. No shard, two shards with one name (their outputs
    would collide) and a local shard that does not exist are errors; ``verb`` says what the command does
    with them, for the message ("cache", "embed")."""
    urls = expand_urls(source)
    if not urls:
        raise UserError(f"no shards in {source!r}")
    seen: dict[str, str] = {}
    for index, url in enumerate(urls):
        name = shard_name(url, index)
        if name in seen:
            raise UserError(f"input shards {seen[name]!r} and {url!r} have the same file name {name!r}; "
                            f"{verb} them into separate folders")
        seen[name] = url
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).exists():
            raise FileNotFoundError(f"input shard not found: {url}")
    return list(seen.items())


def shard_sizes(urls: Sequence[str]) -> list[int | None]:
    """Samples per local shard from the ``sizes.json`` next to it (what ``ldmclip pack`` and img2dataset
    write), for the progress bar's ETA; ``None`` where unknown. Each ``sizes.json`` is read once."""
    tables: dict[Path, dict[str, Any]] = {}
    sizes: list[int | None] = []
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            sizes.append(None)
            continue
        path = Path(url)
        if path.parent not in tables:
            try:
                tables[path.parent] = json.loads((path.parent / "sizes.json").read_text())
            except (OSError, ValueError):
                tables[path.parent] = {}
        value = tables[path.parent].get(path.name)
        sizes.append(int(value) if isinstance(value, int) else None)
    return sizes


# Shard-level problems after which an input shard is retried on the next run instead of marked done.
_RETRY_REASONS = (REASON_SHARD_UNREADABLE, REASON_SHARD_ERROR)


def failed_as_a_whole(problems: Mapping[str, int], records: int) -> str | None:
    """Why an input shard gives no output (None: it gives one). It failed as a whole when it could not be
    opened, failed while being read, or gave not one record before a tar error: a zero-byte file, random
    bytes, a copy cut inside its first member. Storing that as an empty result would mark it done and no
    rerun would look at it again; a tar cut later keeps the complete samples before the cut."""
    retry = [r for r in _RETRY_REASONS if problems.get(r)]
    if retry:
        return ", ".join(retry)
    if records == 0 and problems.get(REASON_TRUNCATED_SHARD):
        return "empty, not a tar file, or cut before its first sample"
    return None


def _rng(*parts: Any) -> random.Random:
    return random.Random("ldmclip-shards-" + "-".join(str(p) for p in parts))


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")


def _split_name(name: str) -> tuple[str | None, str]:
    """``'dir/000001.jpg'`` -> ``('dir/000001', 'jpg')``: the key ends at the first dot of the file name
    (webdataset's rule)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


class ShardDataset(torch.utils.data.IterableDataset):
    """Image–text samples from webdataset shards; see the module docs for splitting and shuffling.

    Args:
        urls: brace pattern or list of shard URLs/paths.
        transform: applied to each decoded PIL image (``None``: RGB PIL images).
        shuffle_buffer: samples in the shuffle buffer (0 or 1: no shuffling).
        resampled: draw shards with replacement, endlessly (see module docs).
        seed, epoch: shuffling seeds; change the epoch with :meth:`set_epoch` before each epoch.
        shuffle_shards: shuffle the shard order (default: when ``shuffle_buffer > 1``).
        split_by_node: give each node (torch.distributed rank) its own shards (non-resampled mode).
        rank, world_size: override the node information (default: torch.distributed when initialised,
            else the ``RANK``/``WORLD_SIZE`` variables torchrun sets, else a single node).
        image_extensions: member suffixes tried for the image, in order.
        caption_extension: member suffix of the caption.
        fast_decode: decode big JPEGs at reduced scale (``load_image(fast=True)``); changes pixels.
        shuffle_initial: samples collected before the first one leaves the buffer
            (default ``min(shuffle_buffer, 100)``).
        stall_attempts, stall_seconds: when a reader of a resampled stream gives up (module docs).

    ``stats`` holds the counts of the current process (the main process when ``num_workers=0``); the
    batches of ``ImageTextCollator`` carry them from every worker. When bad-sample reasons are still
    waiting for a collator at the end of the stream, one extra ``None`` is yielded to carry them.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable | None = None,
        *,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle_shards: bool | None = None,
        split_by_node: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
        caption_extension: str = "txt",
        fast_decode: bool = False,
        shuffle_initial: int | None = None,
        stall_attempts: int = STALL_ATTEMPTS,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise UserError(f"no shards in {urls!r}")
        self.transform = transform
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.shuffle_initial = (min(self.shuffle_buffer, 100) if shuffle_initial is None
                                else max(1, min(int(shuffle_initial), self.shuffle_buffer)))
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.shuffle_shards = self.shuffle_buffer > 1 if shuffle_shards is None else bool(shuffle_shards)
        self.split_by_node = bool(split_by_node)
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self._node = (int(rank), int(world_size)) if rank is not None else None
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.caption_extension = caption_extension.lower().lstrip(".")
        # The members whose bytes are read (None: every member); _list_members: raw samples also list every
        # member as written, in order (ShardMembers).
        self._wanted: frozenset[str] | None = frozenset(self.image_extensions + (self.caption_extension,))
        self._list_members = False
        self.cut_key: str | None = None  # the sample a truncated shard cut off (where members are listed)
        self.fast_decode = fast_decode
        self.stall_attempts, self.stall_seconds = max(1, int(stall_attempts)), float(stall_seconds)
        self.shard_problem: str | None = None  # what went wrong with the last shard read (None: nothing)
        # Shared with DataLoader workers, also persistent ones: set_epoch() in the main process is
        # seen by the workers when they start the next epoch.
        self._epoch: Any = multiprocessing.Value("q", int(epoch), lock=False)
        self.stats = SampleStats()
        # Exact resume (module docs): items each reader already handed out this epoch, and the renaming
        # of loader workers into readers.
        self.resume_items: dict[int, int] = {}
        self.reader_offset = 0
        self._headers_only = False  # fast-forwarding: read tar headers, extract nothing
        self._only_keys: frozenset[str] | None = None  # filling in the buffer: extract these keys only

    def resume_at(self, items: Mapping[int, int], reader_offset: int = 0) -> None:
        """Continue each reader after the ``items[reader]`` items it has handed out in this epoch (see the
        module docs); loader worker ``i`` reads as reader ``(i + reader_offset) % num_workers``."""
        self.resume_items = {int(k): int(v) for k, v in items.items()}
        self.reader_offset = int(reader_offset)

    def reader_id(self, worker: int, num_workers: int) -> int:
        """The reader a loader worker plays (module docs)."""
        return (worker + self.reader_offset) % max(1, num_workers)

    # -- epoch ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch.value) if not isinstance(self._epoch, int) else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed the shard order and the shuffle buffer; call it before iterating
        (before ``iter(loader)``), also with persistent workers."""
        if isinstance(self._epoch, int):
            self._epoch = int(epoch)
        else:
            self._epoch.value = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # A shared Value can only travel to a process being started (DataLoader workers with the
        # spawn/forkserver methods); other pickles/deep copies get the current value.
        if multiprocessing.context.get_spawning_popen() is None and not isinstance(self._epoch, int):
            state["_epoch"] = self.epoch
        return state

    # -- iteration ------------------------------------------------------------------------------------
    def node_info(self) -> tuple[int, int]:
        """``(rank, world_size)`` used to split shards."""
        if self._node is not None:
            return self._node
        return process_rank()

    def shards_for_worker(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None
                          ) -> list[str]:
        """Shards read by one DataLoader worker of this node in an epoch (non-resampled mode)."""
        epoch = self.epoch if epoch is None else epoch
        urls = list(self.urls)
        if self.shuffle_shards:
            _rng(self.seed, epoch).shuffle(urls)
        if self.split_by_node:
            rank, world = self.node_info()
            urls = urls[rank::world]
        return urls[worker::num_workers]

    def _shard_urls(self, epoch: int, rank: int, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            rng = _rng(self.seed, epoch, rank, worker, "resample")
            while True:
                yield rng.choice(self.urls)
        urls = self.shards_for_worker(worker, num_workers, epoch)
        world = self.node_info()[1] if self.split_by_node else 1
        if worker == 0 and rank == 0 and len(self.urls) < world * num_workers:
            warnings.warn(f"{len(self.urls)} shards for {world * num_workers} readers "
                          f"({world} node(s) x {num_workers} worker(s)): some readers get no data",
                          stacklevel=2)
        yield from urls

    def _read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard: ``{"__key__": key, ext: bytes | None, ...}`` with the bytes of the
        wanted members only (``None`` marks a member that is present but not read). Errors are counted
        once per shard and end that shard; ``self.shard_problem`` then says what went wrong (in words,
        for messages). A key seen before in the shard is counted (``duplicate_key``) and skipped."""
        from webdataset.gopen import gopen

        self.shard_problem = _local_problem(url)
        self.cut_key = None
        if self.shard_problem is not None:  # a FIFO would block open() forever: only regular files
            record_bad(REASON_SHARD_UNREADABLE, self.stats, url, self.shard_problem)
            return
        try:
            stream = gopen(url, "rb")
        except Exception as e:  # noqa: BLE001
            record_bad(REASON_SHARD_UNREADABLE, self.stats, url, e)
            self.shard_problem = f"cannot open: {_short(e)}"
            return
        current: dict[str, Any] | None = None
        keys: set[str] = set()
        members, abandoned = 0, False
        try:
            with tarfile.open(fileobj=stream, mode="r|*", bufsize=_TAR_BUFSIZE) as tar:
                for info in tar:
                    members += 1
                    tar.members = []  # streaming: keep no member list
                    if not info.isreg() or _is_meta(info.name):
                        continue
                    key, ext = _split_name(info.name)
                    if key is None:
                        continue
                    if current is None or key != current["__key__"] or ext in current:
                        if current is not None and self._first_of_key(current, keys):
                            yield current
                        current = {"__key__": key, "__url__": url}
                    wanted = self._wanted is None or ext in self._wanted
                    if wanted and self._headers_only or (self._only_keys is not None and key not in self._only_keys):
                        current[ext] = b"" if wanted else None  # present, not read (a fast-forward)
                        current[_UNREAD] = True
                    elif wanted:
                        member = tar.extractfile(info)
                        current[ext] = member.read() if member is not None else None
                    else:
                        current[ext] = None
                    if self._list_members:  # the suffix as written (not lower-cased), in member order
                        current.setdefault(_MEMBERS, []).append((info.name[len(key) + 1:], current[ext]))
            if current is not None and self._first_of_key(current, keys):
                yield current
            current = None
        except (tarfile.ReadError, EOFError) as e:
            record_bad(REASON_TRUNCATED_SHARD, self.stats, url, e)
            self.shard_problem = _tar_problem(e, members)
        except Exception as e:  # noqa: BLE001
            record_bad(REASON_SHARD_ERROR, self.stats, url, e)
            self.shard_problem = _short(e)
        except BaseException:  # GeneratorExit (the reader stopped early), a stop request, ...
            abandoned = True
            raise
        finally:
            self._close(stream, url, abandoned)
        # A sample interrupted by the error is kept only if its image and caption were read in full; where
        # every member is listed, it is never kept (its other members may be missing): cut_key names it.
        if current is not None and self._list_members:
            self.cut_key = current["__key__"]
        elif current is not None and self._complete(current) and self._first_of_key(current, keys):
            yield current

    def _close(self, stream: Any, url: str, abandoned: bool) -> None:
        proc = getattr(stream, "proc", None)  # a pipe: command (webdataset's Pipe)
        if abandoned and proc is not None:
            proc.kill()  # closing waits for the command to end: do not wait on one still producing
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - e.g. a pipe: command with a non-zero exit status
            if not abandoned:
                record_bad(REASON_SHARD_ERROR, self.stats, url, e)
                self.shard_problem = self.shard_problem or _short(e)

    def _first_of_key(self, raw: dict[str, Any], keys: set[str]) -> bool:
        key = raw["__key__"]
        if key in keys:
            record_bad(REASON_DUPLICATE_KEY, self.stats, f"{raw['__url__']}: {key}")
            return False
        keys.add(key)
        return True

    def _complete(self, raw: dict[str, Any]) -> bool:
        return (raw.get(self.caption_extension) is not None
                and any(raw.get(e) is not None for e in self.image_extensions))

    def _usable(self, raw: dict[str, Any]) -> bool:
        """Worth a stream: a caption, and an image where images are read."""
        return self._complete(raw) or (not self.image_extensions and raw.get(self.caption_extension) is not None)

    def _raw_samples(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        watch = _StallWatch(self.urls, self.resampled, self.stall_attempts, self.stall_seconds)
        in_worker = torch.utils.data.get_worker_info() is not None
        for url in urls:
            if in_worker:
                exit_if_orphaned()
            usable = False
            for raw in self._read_shard(url):
                usable = usable or self._usable(raw)
                yield raw
            if usable:
                watch.ok()
            else:
                watch.failed_shard(url, self.shard_problem or "no complete image-caption sample")

    def decode(self, raw: dict[str, Any]) -> Sample | None:
        """Raw sample -> ``Sample`` (image transformed, caption decoded) or ``None`` (reason counted)."""
        image = next((raw[e] for e in self.image_extensions if raw.get(e) is not None), None)
        return load_sample(image, raw.get(self.caption_extension), raw["__key__"], self.transform, self.stats,
                           fast=self.fast_decode)

    def __iter__(self) -> Iterator[Sample | None]:
        clear_pending()  # reasons left over from an earlier, abandoned pass belong to no batch of this one
        epoch = self.epoch
        info = torch.utils.data.get_worker_info()
        if info is not None:
            exit_with_parent()  # whatever DataLoader runs this stream: no worker outlives its parent
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.reader_id(worker, num_workers)
        rank = self.node_info()[0] if (self.split_by_node or self.resampled) else 0
        skip = self.resume_items.get(reader, 0)
        raw: Iterator[dict[str, Any]] = self._raw_samples(self._shard_urls(epoch, rank, reader, num_workers))
        seeded = getattr(self.transform, "seed_sample", None)
        count = skip
        for item in self._shuffled(raw, _rng(self.seed, epoch, rank, reader, "samples"), skip):
            if seeded is not None:  # the crop of item `count` of this reader, whatever came before it
                seeded(_rng(self.seed, epoch, rank, reader, "crop", count).getrandbits(62))
            count += 1
            yield self.decode(item)
        if has_pending():
            yield None  # carries the reasons recorded after the last batch to the collator

    def _shuffled(self, raw: Iterator[dict[str, Any]], rng: random.Random, skip: int = 0
                  ) -> Iterator[dict[str, Any]]:
        """The shuffle buffer, with a position: its first ``skip`` draws are replayed without reading the
        samples (shards are read header by header meanwhile), then the samples left in the buffer get their
        bytes. The policy is webdataset's ``shuffle(bufsize, initial)`` (webdataset.filters): the buffer
        takes two samples per draw until it is full, draws begin once it holds ``initial``, and a draw takes
        a uniformly random entry, swapping the last one into its place; the RNG calls are the same, so a
        seed gives the picks that pipeline gives."""
        size = max(1, self.shuffle_buffer) if self.shuffle_buffer > 1 else 1
        start = min(self.shuffle_initial, size) if self.shuffle_buffer > 1 else 1
        buffer: list[dict[str, Any]] = []
        state = {"drawn": 0}
        if skip > 0:
            self._start_fast_forward()

        def draw() -> Iterator[dict[str, Any]]:
            index = rng.randint(0, len(buffer) - 1) if size > 1 else 0
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            sample = buffer.pop()
            state["drawn"] += 1
            if state["drawn"] <= skip:  # replayed: a header-only sample that was trained on before
                if state["drawn"] == skip:
                    self._end_fast_forward(buffer)
                return
            yield sample

        try:
            for sample in raw:
                buffer.append(sample)
                if len(buffer) < size:  # still filling: a second sample with this one
                    buffer.extend(itertools.islice(raw, 1))
                if len(buffer) >= start:
                    yield from draw()
            while buffer:
                yield from draw()
        finally:
            if state["drawn"] < skip:  # the reader ended before its position: nothing left to give
                self._end_fast_forward([])

    def _start_fast_forward(self) -> None:
        self._headers_only = True
        self._real_stats, self.stats = self.stats, SampleStats()  # a replay counts nothing twice

    def _end_fast_forward(self, buf: list[dict[str, Any]]) -> None:
        """Back to reading bytes; the samples left in the buffer (read header-only) get theirs."""
        self._headers_only = False
        unread: dict[str, set[str]] = {}
        for raw in buf:
            if raw.get(_UNREAD):
                unread.setdefault(raw["__url__"], set()).add(raw["__key__"])
        filled: dict[tuple[str, str], dict[str, Any]] = {}
        for url, keys in unread.items():
            self._only_keys = frozenset(keys)
            try:
                for raw in self._read_shard(url):
                    if raw["__key__"] in keys:
                        filled[(url, raw["__key__"])] = raw
            finally:
                self._only_keys = None
        for i, raw in enumerate(buf):
            if raw.get(_UNREAD):
                buf[i] = filled.get((raw["__url__"], raw["__key__"]), raw)
        self.stats = getattr(self, "_real_stats", self.stats)
        clear_pending()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shards={len(self.urls)}, shuffle_buffer={self.shuffle_buffer}, "
                f"resampled={self.resampled}, seed={self.seed}, epoch={self.epoch})")


class ShardMembers:
    """Every sample of one shard with all its members, in the order they are stored: iterating yields
    ``(key, [(suffix, data), ...])`` where ``suffix`` is the member's name after the key as written
    (``"jpg"``, ``"JSON"``, ``"seg.png"``) and ``data`` its bytes (``None`` with ``read=False``, which only
    lists the members: e.g. a first pass that needs the keys).

    It is :class:`ShardDataset`'s reader, so bad data is handled the same way: problems are counted in
    ``stats`` by reason, a key seen before in the shard is counted (``duplicate_key``) and skipped, and a
    truncated shard yields the complete samples before the cut. After the iteration, ``problem`` says what
    went wrong with the shard (``None``: nothing) and ``cut_key`` names the sample the cut interrupted,
    which is never yielded (members after the cut may belong to it)."""

    def __init__(self, url: str, stats: SampleStats | None = None, *, read: bool = True) -> None:
        self.url = url
        self._reader = ShardDataset([url], shuffle_buffer=0, split_by_node=False, image_extensions=())
        self._reader._wanted = None if read else frozenset()
        self._reader._list_members = True
        if stats is not None:
            self._reader.stats = stats
        self.problem: str | None = None
        self.cut_key: str | None = None

    @property
    def stats(self) -> SampleStats:
        return self._reader.stats

    def __iter__(self) -> Iterator[tuple[str, list[tuple[str, bytes | None]]]]:
        try:
            for raw in self._reader._read_shard(self.url):
                yield raw["__key__"], raw[_MEMBERS]
        finally:
            self.problem, self.cut_key = self._reader.shard_problem, self._reader.cut_key


def _local_problem(url: str) -> str | None:
    """Why a local shard path cannot be read (``None``: a regular file, or not a local path)."""
    if _SCHEME.match(url):
        return None
    try:
        mode = os.stat(url).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return f"cannot open: {_short(e)}"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _tar_problem(error: BaseException, members: int) -> str:
    if str(error) == "empty file":
        return "empty file (0 bytes)"
    if members == 0:
        return f"not a tar file ({_short(error)})"
    return f"truncated after {members} members ({_short(error)})"


def _short(error: BaseException, limit: int = 120) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())  # one line
    return text if len(text) <= limit else text[:limit - 3] + "..."


def make_shard_pipeline(
    urls: str | Sequence[str],
    transform: Callable | None = None,
    tokenizer: Any = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    seed: int = 0,
    epoch: int = 0,
    **kwargs: Any,
) -> ShardDataset:
    """A :class:`ShardDataset` (keyword arguments as there). ``tokenizer`` is accepted for symmetry and
    ignored: captions are tokenized per batch by ``ImageTextCollator(tokenizer)``."""
    del tokenizer
    return ShardDataset(urls, transform, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed,
                        epoch=epoch, **kwargs)
