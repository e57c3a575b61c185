"""CLIP byte-level BPE tokenizer.

The ids produced here are meant to be exactly those of OpenCLIP's ``SimpleTokenizer``
(``clean='lower'``, no reduction mask), which in turn reproduces the original OpenAI CLIP
tokenizer.  The BPE merges run in Hugging Face ``tokenizers`` (Rust); text cleaning and the
word split stay in Python so that they are the very same operations OpenCLIP performs.

How a caption becomes ids
-------------------------
1. Cleaning: ``ftfy.fix_text``, HTML unescaping applied twice, surrounding whitespace removed,
   every whitespace run collapsed to one space, then lower-casing.
2. Word split with the CLIP pattern (contractions, letter runs, single digits, runs of other
   symbols; whitespace is dropped), using the ``regex`` module with OpenCLIP's flags.  OpenCLIP
   puts its two special token strings ``<start_of_text>`` and ``<end_of_text>`` in front of
   that pattern, so a caption that literally contains one of them (where the scan reaches its
   ``<``; e.g. not right after another symbol such as ``!``) gets the special id 49406 / 49407
   in the middle of the sequence.  That is reproduced here.  The Hugging Face spelling
   ``<|endoftext|>`` is *not* special in OpenCLIP and is tokenized as plain text.
3. Each word is mapped byte-wise onto printable unicode characters, the last character gets
   the ``</w>`` suffix and the BPE merges are applied by rank.
4. ``[SOT] + ids + [EOT]``; longer sequences are cut to the context length with EOT kept as
   the last token; shorter ones are padded with ``pad_id`` (0 in OpenCLIP; Stable Diffusion
   1.x pipelines pad with EOT, 49407).

Speed
-----
* A text made only of printable ASCII (plus tab, newline, carriage return, form feed) and
  without ``&`` is left unchanged by ftfy and by HTML unescaping (up to line-break style, which
  the whitespace collapse erases), so it skips both; a batch is screened for such texts at
  once, byte-wise.  Every other text is cleaned exactly as OpenCLIP does.
* The batch is then joined into one string (a NUL chunk after each text), lower-cased and cut
  at whitespace in one go.  No match of the word pattern contains whitespace, so every chunk
  can be split on its own with the same result as splitting its whole text.
* Chunk ids are memoised per vocabulary in flat numpy arrays; only unseen chunks are split (in
  Python, with OpenCLIP's exact pattern) and only unseen words reach the Rust BPE, in one
  batched call.  Gathering, truncation and padding are vectorised.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import threading
from functools import lru_cache
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable, Sequence, Union

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from .core.files import atomic_write

__all__ = [
    "CLIPTokenizer",
    "build_tokenizer",
    "tokenize",
    "DEFAULT_CONTEXT_LENGTH",
    "SOT_TOKEN",
    "EOT_TOKEN",
]

DEFAULT_CONTEXT_LENGTH = 77

# OpenCLIP's spelling of the special tokens (what a caption can contain literally).
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# Hugging Face's spelling, used in vocab.json files written by ``transformers``.
HF_SOT_TOKEN = "<|startoftext|>"
HF_EOT_TOKEN = "<|endoftext|>"

_WORD_SUFFIX = "</w>"
_PACKAGED_VOCAB = Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")
# The packaged merges file holds ~262k merges; CLIP uses the first 49152 - 256 - 2 of them.
_CLIP_NUM_MERGES = 49152 - 256 - 2

# Word pattern of CLIP; OpenCLIP compiles it with IGNORECASE and its special tokens first.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PY_SPLIT = regex.compile(
    regex.escape(SOT_TOKEN) + "|" + regex.escape(EOT_TOKEN) + "|" + _WORD_PATTERN,
    regex.IGNORECASE,
)
# Any character outside this set sends a text through the full cleaning: ftfy deletes most
# ASCII control characters (which ``str.split`` would otherwise treat as whitespace) and '&'
# may start an HTML entity.
_NOT_FAST = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")
# A batch is cleaned and cut into chunks as one string, each text followed by the chunk _SEP.
# NUL can be neither in a text that takes the fast path (excluded above) nor in a cleaned text
# (ftfy removes it and html.unescape never produces it); the rare exception is handled apart.
_SEP = "\x00"
# The bytes a fast-path text may consist of.
_FAST_BYTES = bytes(c for c in range(0x80) if _NOT_FAST.match(chr(c)) is None)
_SCAN_LIMIT = 1024  # past this many offending bytes, check the texts one by one instead
_SMALL_BATCH = 8  # up to this many texts, encode text by text (lower fixed cost)

TextInput = Union[str, Sequence[str]]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from the 256 byte values to printable characters.

    Bytes that are printable Latin-1 characters map to themselves; the remaining 68 bytes
    (controls, space, DEL, NBSP, soft hyphen, ...) map to U+0100 onwards, in byte order.
    The dict is ordered the way CLIP's base vocabulary is: self-mapped bytes first.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in table]
    for offset, b in enumerate(moved):
        table[b] = chr(0x100 + offset)
    return table


_BYTE_ENCODER = _byte_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def _clean_text(text: str) -> str:
    """OpenCLIP's 'lower' cleaning: ftfy, HTML unescaping twice, strip, collapse whitespace runs
    to one space, lower-case.  (Lower-casing never creates or removes whitespace.)"""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class _ChunkTable:
    """Memo of chunk -> token ids, kept flat in numpy arrays so that a batch is gathered with
    vectorised indexing.  Only ever appended to (under the backend's write lock) or replaced
    as a whole, so readers need no lock: a chunk enters ``index`` only after its ids are in
    the arrays, and arrays are swapped for grown copies, never shrunk.  Entry 0 is the text
    separator, with no ids."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {_SEP: 0}
        self.start = np.zeros(1 << 12, dtype=np.int64)
        self.length = np.zeros(1 << 12, dtype=np.int64)
        self.tokens = np.zeros(1 << 15, dtype=np.int64)
        self.n_tokens = 0

    def add(self, chunks: list[str], flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append chunks that are not in the table yet (no duplicates); chunk ``k`` has the next
        ``lengths[k]`` ids of ``flat``."""
        n0, n, total = len(self.index), len(chunks), len(flat)
        if n0 + n > len(self.start):
            size = max(2 * len(self.start), n0 + n)
            self.start = _grown(self.start, n0, size)
            self.length = _grown(self.length, n0, size)
        if self.n_tokens + total > len(self.tokens):
            self.tokens = _grown(self.tokens, self.n_tokens, max(2 * len(self.tokens), self.n_tokens + total))
        self.tokens[self.n_tokens : self.n_tokens + total] = flat
        self.start[n0 : n0 + n] = np.cumsum(lengths) - lengths + self.n_tokens
        self.length[n0 : n0 + n] = lengths
        self.n_tokens += total
        self.index.update(zip(chunks, range(n0, n0 + n)))


def _grown(array: np.ndarray, used: int, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=array.dtype)
    out[:used] = array[:used]
    return out


def _prepare(texts: Sequence[str]) -> list[str] | None:
    """Cleaned, lower-cased, space-delimited chunks of all texts, each text followed by _SEP;
    None in the (theoretical) case of a cleaned text containing _SEP."""
    if not texts:
        return []
    try:
        joined = f" {_SEP} ".join(texts) + f" {_SEP}"
    except TypeError:
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise TypeError(f"expected str, got {type(texts[bad]).__name__} at position {bad}") from None
    slow = _slow_path_texts(texts, joined)
    if not slow:  # the common case: every text is plain printable ASCII
        return joined.lower().split()
    prepared = list(texts)
    for i in slow:
        prepared[i] = cleaned = _clean_text(texts[i])
        if _SEP in cleaned:
            return None
    # lower() is idempotent, so lower-casing the cleaned texts again changes nothing
    return (f" {_SEP} ".join(prepared) + f" {_SEP}").lower().split()


def _slow_path_texts(texts: Sequence[str], joined: str) -> list[int]:
    """Indices of the texts that need the full cleaning (``joined``: texts joined by _SEP)."""
    n = len(texts)
    offending = joined.encode("utf-8", "surrogatepass").translate(None, _FAST_BYTES)
    if len(offending) == n:  # only the n separators are left
        return []
    if offending.count(_SEP.encode()) != n or len(offending) - n > _SCAN_LIMIT:
        return [i for i, hit in enumerate(map(_NOT_FAST.search, texts)) if hit is not None]
    # Few offending bytes: non-ASCII texts are known from isascii(), the rest from the
    # positions of the offending ASCII characters.
    slow = set()
    if max(offending) >= 0x80:
        slow.update(i for i, plain in enumerate(map(str.isascii, texts)) if not plain)
    positions = []
    for byte in set(offending) - {ord(_SEP)}:
        if byte < 0x80:
            pos = joined.find(chr(byte))
            while pos >= 0:
                positions.append(pos)
                pos = joined.find(chr(byte), pos + 1)
    if positions:
        span = np.fromiter(map(len, texts), dtype=np.int64, count=n) + len(_SEP) + 2
        first = np.cumsum(span) - span  # where each text starts in ``joined``
        slow.update((np.searchsorted(first, positions, side="right") - 1).tolist())
    return sorted(slow)


class _Backend:
    """Everything derived from one vocabulary; shared by all tokenizers using that vocabulary.

    Encoding works on space-delimited chunks of the cleaned text.  No match of the CLIP word
    pattern can contain a space, so splitting a chunk on its own gives exactly the words that
    splitting the whole caption gives there.  Chunks repeat a lot in caption corpora, so their
    ids are memoised; only unseen chunks are split (in Python, with OpenCLIP's exact pattern)
    and only their unseen words are BPE-encoded (in Rust, batched).
    """

    _MAX_CHUNKS = 1 << 19  # memo sizes (~100 MB when full); past them a memo starts over
    _MAX_WORDS = 1 << 19
    _WORDS_PER_SEQUENCE = 256  # words per Rust sequence; the sequences of one call run in parallel

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.sot_id = _find_id(vocab, (SOT_TOKEN, HF_SOT_TOKEN))
        self.eot_id = _find_id(vocab, (EOT_TOKEN, HF_EOT_TOKEN))
        self.vocab_size = max(vocab.values()) + 1
        self.merges = merges
        self._vocab = vocab
        # id -> token text, special tokens spelled the OpenCLIP way (as its decode prints them)
        self.id_to_token: list[str] = [""] * self.vocab_size
        for tok, idx in vocab.items():
            self.id_to_token[idx] = tok
        self.id_to_token[self.sot_id] = SOT_TOKEN
        self.id_to_token[self.eot_id] = EOT_TOKEN

        # The Rust side only ever sees single words (split in Python).  Words of printable
        # ASCII are their own byte-level spelling and go straight to BPE; any other word is
        # first mapped byte-wise onto CLIP's printable characters.
        bpe = models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix=_WORD_SUFFIX)
        self._rust_plain = Tokenizer(bpe)
        self._rust_bytes = Tokenizer(bpe)
        self._rust_bytes.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

        self._write_lock = threading.Lock()
        self._table = _ChunkTable()
        self._words = self._fresh_word_memo()

    def _fresh_word_memo(self) -> dict[str, tuple[int, ...]]:
        # A word equal to a special-token string can only come from the special branch of the
        # pattern; OpenCLIP's BPE cache maps exactly these strings to the special ids.
        return {SOT_TOKEN: (self.sot_id,), EOT_TOKEN: (self.eot_id,)}

    # -- encoding -----------------------------------------------------------------------------
    def encode_ragged(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of all texts (no SOT/EOT, no truncation) as ``flat, starts, lengths``:
        text ``i`` is ``flat[starts[i] : starts[i] + lengths[i]]``."""
        texts = texts if isinstance(texts, (list, tuple)) else list(texts)
        chunks = _prepare(texts)
        if chunks is None:
            return self._encode_unmemoised(texts)
        n = len(chunks)
        table = self._table
        complete = False
        if len(table.index) > 1:  # a fresh table knows nothing: skip straight to filling it
            ids = np.fromiter(map(table.index.get, chunks, repeat(-1)), dtype=np.int64, count=n)
            complete = n == 0 or ids.min() >= 0
        if not complete:
            table = self._add_missing(chunks)
            ids = np.fromiter(map(table.index.__getitem__, chunks), dtype=np.int64, count=n)

        # gather the ids of every chunk into one flat array ...
        length = table.length[ids]
        chunk_end = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(length, out=chunk_end[1:])
        shift = np.repeat(table.start[ids] - chunk_end[:-1], length)
        flat = table.tokens[shift + np.arange(int(chunk_end[-1]), dtype=np.int64)]
        # ... and cut it at the separators
        ends = chunk_end[np.flatnonzero(ids == 0) + 1]
        starts = np.zeros_like(ends)
        starts[1:] = ends[:-1]
        return flat, starts, ends - starts

    def _encode_unmemoised(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Text by text, without the chunk table (used only if a cleaned text holds _SEP)."""
        per_text = []
        for text in texts:
            cleaned = text.lower() if _NOT_FAST.search(text) is None else _clean_text(text)
            with self._write_lock:
                per_text.append(self._encode_chunks(cleaned.split())[0].tolist())
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        starts = np.zeros_like(lengths)
        np.cumsum(lengths[:-1], out=starts[1:])
        flat = np.fromiter(chain.from_iterable(per_text), dtype=np.int64, count=int(lengths.sum()))
        return flat, starts, lengths

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if 0 < len(texts) <= _SMALL_BATCH:
            return self.encode_small(texts)
        flat, starts, lengths = self.encode_ragged(texts)
        flat_list = flat.tolist()
        return [flat_list[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())]

    def encode_small(self, texts: Sequence[str]) -> list[list[int]]:
        """Same result as ``encode_ragged``, text by text: less fixed cost for a few texts."""
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"expected str, got {type(text).__name__} at position {i}")
            cleaned = text.lower() if _NOT_FAST.search(text) is None else _clean_text(text)
            if _SEP in cleaned:
                out.append(self._encode_unmemoised([text])[0].tolist())
                continue
            chunks = cleaned.split()
            table = self._table
            rows = list(map(table.index.get, chunks, repeat(-1)))
            if -1 in rows:
                table = self._add_missing(chunks)
                rows = list(map(table.index.__getitem__, chunks))
            if not rows:
                out.append([])
                continue
            rows_arr = np.array(rows, dtype=np.int64)
            length = table.length[rows_arr]
            end = np.cumsum(length)
            shift = np.repeat(table.start[rows_arr] - (end - length), length)
            out.append(table.tokens[shift + np.arange(int(end[-1]), dtype=np.int64)].tolist())
        return out

    def _add_missing(self, chunks: list[str]) -> _ChunkTable:
        """Memoise the chunks not known yet; returns a table holding all of ``chunks``."""
        with self._write_lock:
            table = self._table
            missing = set(chunks).difference(table.index)
            if len(table.index) + len(missing) > self._MAX_CHUNKS:
                table = _ChunkTable()
                missing = set(chunks).difference(table.index)
            if missing:
                new = list(missing)
                table.add(new, *self._encode_chunks(new))
            self._table = table
            return table

    def _encode_chunks(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """OpenCLIP's word split, then BPE per word, for each chunk (caller holds the lock).
        Returns the ids of all chunks one after the other, and how many belong to each."""
        # flat lists rather than one list per chunk: fewer containers for the garbage collector
        words: list[str] = []
        word_counts: list[int] = []
        split, extend, count = _PY_SPLIT.findall, words.extend, word_counts.append
        for chunk in chunks:
            chunk_words = split(chunk)
            extend(chunk_words)
            count(len(chunk_words))
        memo = self._words
        unseen = set(words).difference(memo)
        if len(memo) + len(unseen) > self._MAX_WORDS:
            memo = self._words = self._fresh_word_memo()
            unseen = set(words).difference(memo)
        if unseen:
            memo.update(self._bpe(list(unseen)))
        word_ids = list(map(memo.__getitem__, words))
        word_len = np.fromiter(map(len, word_ids), dtype=np.int64, count=len(words))
        flat = np.fromiter(chain.from_iterable(word_ids), dtype=np.int64, count=int(word_len.sum()))
        word_end = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(word_len, out=word_end[1:])
        chunk_end = np.cumsum(np.asarray(word_counts, dtype=np.int64))
        return flat, word_end[chunk_end] - word_end[chunk_end - word_counts]

    def _bpe(self, words: list[str]) -> dict[str, tuple[int, ...]]:
        """BPE ids of plain words (never special tokens), computed in Rust."""
        plain = [w for w in words if w.isascii() and w.isprintable()]
        other = [w for w in words if not (w.isascii() and w.isprintable())]
        out: dict[str, tuple[int, ...]] = {}
        n = self._WORDS_PER_SEQUENCE
        for rust, group_words in ((self._rust_plain, plain), (self._rust_bytes, other)):
            if not group_words:
                continue
            groups = [group_words[i : i + n] for i in range(0, len(group_words), n)]
            encodings = rust.encode_batch(groups, is_pretokenized=True, add_special_tokens=False)
            for group, enc in zip(groups, encodings):
                ids, word_of = enc.ids, np.asarray(enc.word_ids, dtype=np.int64)
                # every word yields at least one token, in order: cut where the word index moves
                cut = np.flatnonzero(np.diff(word_of, prepend=-1, append=-1)).tolist()
                if len(cut) != len(group) + 1:
                    raise RuntimeError("unexpected word alignment from the tokenizers library")
                out.update(zip(group, (tuple(ids[a:b]) for a, b in zip(cut, cut[1:]))))
        return out

    # -- decoding / export --------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token id outside the vocabulary (size {self.vocab_size})")
        text = "".join([self.id_to_token[i] for i in ids])
        data = bytearray()
        for ch in text:
            b = _BYTE_DECODER.get(ch)
            if b is None:  # only possible with a non-CLIP vocabulary holding odd entries
                data.extend(ch.encode("utf-8"))
            else:
                data.append(b)
        return data.decode("utf-8", errors="replace").replace(_WORD_SUFFIX, " ")

    def hf_vocab(self) -> dict[str, int]:
        vocab = {t: i for t, i in self._vocab.items() if i not in (self.sot_id, self.eot_id)}
        vocab[HF_SOT_TOKEN] = self.sot_id
        vocab[HF_EOT_TOKEN] = self.eot_id
        return vocab


def _find_id(vocab: dict[str, int], names: Sequence[str]) -> int:
    for name in names:
        if name in vocab:
            return vocab[name]
    raise ValueError(f"vocabulary has none of the tokens {list(names)}")


def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    p = Path(path).resolve()
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


_backend_lock = threading.Lock()


@lru_cache(maxsize=8)
def _backend_from_clip_bpe(key: tuple[str, int, int]) -> _Backend:
    """Vocabulary from an OpenAI-style gzipped merges file (``bpe_simple_vocab_16e6.txt.gz``)."""
    with gzip.open(key[0], "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    # line 0 is a header; CLIP keeps the next 48,894 merges
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1]]
    tokens = list(_BYTE_ENCODER.values())
    tokens += [t + _WORD_SUFFIX for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    return _Backend(vocab, merges)  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _backend_from_hf_files(vocab_key: tuple[str, int, int], merges_key: tuple[str, int, int]) -> _Backend:
    with open(vocab_key[0], encoding="utf-8") as fh:
        vocab = {str(k): int(v) for k, v in json.load(fh).items()}
    with open(merges_key[0], encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    for m in merges:
        if len(m) != 2:
            raise ValueError(f"{merges_key[0]}: malformed merge line {' '.join(m)!r}")
    return _Backend(vocab, merges)  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _backend_from_tokenizer_json(key: tuple[str, int, int]) -> _Backend:
    with open(key[0], encoding="utf-8") as fh:
        data = json.load(fh)
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{key[0]}: not a BPE tokenizer")
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    for tok in data.get("added_tokens") or []:
        vocab.setdefault(tok["content"], int(tok["id"]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _Backend(vocab, merges)  # type: ignore[arg-type]


def _load_backend(source: tuple[str, ...]) -> _Backend:
    kind, *paths = source
    with _backend_lock:
        if kind == "clip_bpe":
            return _backend_from_clip_bpe(_file_key(paths[0] or _PACKAGED_VOCAB))
        if kind == "hf_files":
            return _backend_from_hf_files(_file_key(paths[0]), _file_key(paths[1]))
        if kind == "tokenizer_json":
            return _backend_from_tokenizer_json(_file_key(paths[0]))
    raise ValueError(f"unknown vocabulary source {kind!r}")


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or int(context_length) != context_length or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return int(context_length)


class CLIPTokenizer:
    """CLIP tokenizer with OpenCLIP-identical ids.

    ``tokenizer(texts)`` returns a ``torch.LongTensor`` of shape ``[B, context_length]``:
    ``[SOT, ids..., EOT, pad, pad, ...]``.

    Args:
        vocab_path: OpenAI-style gzipped BPE merges file; defaults to the packaged
            ``bpe_simple_vocab_16e6.txt.gz``.
        context_length: default sequence length (77 for every released CLIP).
        pad_id: id written after EOT (0 like OpenCLIP; 49407 for Stable Diffusion 1.x).
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike | None = None,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad_id: int = 0,
    ):
        path = "" if vocab_path is None else str(Path(vocab_path).resolve())  # "": packaged file
        self._setup(("clip_bpe", path), context_length, pad_id)

    def _setup(self, source: tuple[str, ...], context_length: int, pad_id: int) -> None:
        self._source = source
        self._backend = backend = _load_backend(source)
        self.sot_token_id: int = backend.sot_id
        self.eot_token_id: int = backend.eot_id
        self.all_special_ids: list[int] = [backend.sot_id, backend.eot_id]
        self.vocab_size: int = backend.vocab_size
        self.context_length: int = _check_context_length(context_length)
        pad_id = int(pad_id)
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id {pad_id} outside the vocabulary (size {self.vocab_size})")
        self.pad_id: int = pad_id

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | os.PathLike,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad_id: int = 0,
    ) -> "CLIPTokenizer":
        """Load the vocabulary of a Hugging Face style tokenizer folder.

        Reads ``vocab.json`` + ``merges.txt`` (what ``transformers`` 4.x and diffusers
        pipelines ship), else ``tokenizer.json`` (what ``transformers`` 5 writes); a
        ``tokenizer/`` subfolder (diffusers pipeline layout) is looked into as well.  Padding
        and context length are not taken from the folder's config files: pass ``pad_id=49407``
        for a Stable Diffusion 1.x text encoder.
        """
        root = Path(path).resolve()
        for folder in (root, root / "tokenizer"):
            vocab, merges = folder / "vocab.json", folder / "merges.txt"
            tok_json = folder / "tokenizer.json"
            if vocab.is_file() and merges.is_file():
                source: tuple[str, ...] = ("hf_files", str(vocab), str(merges))
                break
            if tok_json.is_file():
                source = ("tokenizer_json", str(tok_json))
                break
        else:
            raise FileNotFoundError(f"no vocab.json + merges.txt or tokenizer.json in {root}")
        self = cls.__new__(cls)
        self._setup(source, context_length, pad_id)
        return self

    # pickling (e.g. DataLoader workers started with 'spawn') sends only where the vocabulary
    # lives; the receiving process rebuilds, or reuses, its own backend.
    def __getstate__(self) -> dict:
        return {"source": self._source, "context_length": self.context_length, "pad_id": self.pad_id}

    def __setstate__(self, state: dict) -> None:
        self._setup(tuple(state["source"]), state["context_length"], state["pad_id"])

    # -- main API -------------------------------------------------------------------------------
    def __call__(self, texts: TextInput, context_length: int | None = None) -> torch.LongTensor:
        """Tokenize one string or a list of strings into ``[B, context_length]`` int64 ids:
        ``[SOT, ids..., EOT, pad...]``, cut to ``[SOT, ids..., EOT]`` when too long."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            texts = list(texts)
        ctx = self.context_length if context_length is None else _check_context_length(context_length)
        if 0 < len(texts) <= _SMALL_BATCH:
            return self._rows(self._backend.encode_small(texts), ctx)
        flat, starts, lengths = self._backend.encode_ragged(texts)
        return torch.from_numpy(self._assemble(flat, starts, lengths, ctx))

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT and without truncation."""
        return self._backend.encode_many([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once."""
        return self._backend.encode_many(list(texts))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of the ids the way OpenCLIP decodes them: every ``</w>`` becomes a space and
        special and padding ids are kept (SOT/EOT print as ``<start_of_text>`` /
        ``<end_of_text>``, id 0 as ``!``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self._backend.decode(ids)

    def save_pretrained_files(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` in the format of ``transformers``'
        CLIPTokenizer (special tokens spelled ``<|startoftext|>`` / ``<|endoftext|>``)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
        vocab_text = json.dumps(self._backend.hf_vocab(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(vocab_file, lambda temp: temp.write_text(vocab_text, encoding="utf-8"))
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._backend.merges)
        atomic_write(merges_file, lambda temp: temp.write_text(merges_text, encoding="utf-8"))
        return vocab_file, merges_file

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, pad_id={self.pad_id})"
        )

    # -- helpers ----------------------------------------------------------------------------------
    def _rows(self, all_ids: list[list[int]], ctx: int) -> torch.LongTensor:
        rows = []
        for ids in all_ids:
            if ctx == 1:  # OpenCLIP cuts [SOT, ..., EOT] to [SOT], then overwrites it with EOT
                rows.append([self.eot_token_id])
                continue
            ids = ids[: ctx - 2]  # longer texts lose their tail, EOT stays last
            rows.append([self.sot_token_id, *ids, self.eot_token_id] + [self.pad_id] * (ctx - 2 - len(ids)))
        return torch.from_numpy(np.array(rows, dtype=np.int64))

    def _assemble(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ctx: int) -> np.ndarray:
        n = len(starts)
        out = np.full((n, ctx), self.pad_id, dtype=np.int64)
        if ctx == 1:  # OpenCLIP cuts [SOT, ..., EOT] to [SOT], then overwrites it with EOT
            out[:, 0] = self.eot_token_id
            return out
        keep = np.minimum(lengths, ctx - 2)  # longer texts lose their tail, EOT stays last
        rows = np.arange(n)
        out[:, 0] = self.sot_token_id
        out[rows, keep + 1] = self.eot_token_id
        total = int(keep.sum())
        if total:
            first = np.zeros(n, dtype=np.int64)
            np.cumsum(keep[:-1], out=first[1:])
            pos = np.arange(total, dtype=np.int64) - np.repeat(first, keep)  # index within its text
            out[np.repeat(rows, keep), pos + 1] = flat[np.repeat(starts, keep) + pos]
        return out


def build_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH, pad_id: int = 0) -> CLIPTokenizer:
    """Tokenizer over the packaged OpenAI CLIP vocabulary (the one every CLIP model uses)."""
    return CLIPTokenizer(context_length=context_length, pad_id=pad_id)


@lru_cache(maxsize=1)
def _default_tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


def tokenize(texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """OpenCLIP's ``tokenize``: CLIP BPE ids ``[B, context_length]`` of a text or a list of texts,
    start and end of text added, zero-padded, truncated with the end-of-text token kept."""
    return _default_tokenizer()(texts, context_length=context_length)


def __getattr__(name: str) -> CLIPTokenizer:
    # OpenCLIP's module-level tokenizer instance, which its clients import (CLIP_benchmark's captioning
    # metric: `from open_clip.tokenizer import _tokenizer`); built on first use, not at import
    if name == "_tokenizer":
        return _default_tokenizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
