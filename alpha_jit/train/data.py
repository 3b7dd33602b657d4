"""Byte-level training data: corpus discovery, a memmapped token cache, splits and batches.

The GPT example trains on bytes (vocab 256) so that it needs no tokenizer and no download: the
default corpus is the `.py` files of the running interpreter's standard library, which every
Python install has. `--data PATH` swaps in a text file, a folder of text files, or a
pre-tokenized `.bin` of little-endian uint16 token ids.

Text documents are packed back to back into one uint16 stream with the separator token
`SEPARATOR` (byte 0, NUL, which does not occur in text files) between consecutive documents, so
no block is padded. The stream is written file by file into a `np.memmap` cache keyed by a hash
of (file list, sizes, mtimes, separator), so the corpus is never held in memory and a second
run reuses the cache. Every bad input (missing path, unreadable file, truncated `.bin`, token id
out of range, corpus too short for one block) is a `DataError` raised before anything is
written or any GPU work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.train.atomic import atomic_path

VOCAB_SIZE = 256
SEPARATOR = 0  # NUL: never in text, so it can mark a document boundary in a byte stream
TOKEN_DTYPE = np.dtype("<u2")  # the on-disk `.bin` format: little-endian uint16
DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # keeps the default corpus tokenizing in about a second
DEFAULT_CACHE_DIR = Path("~/.cache/alpha_jit/data")
CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are not reused
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .py .pyi .c .h .cc .cpp .hpp .json .jsonl .csv .tsv .toml .yaml .yml"
    " .cfg .ini .html .xml .js .ts .rs .go .java .sh .tex".split()
)
_CHUNK = 1 << 20  # bytes read per step while streaming a file into the cache
_SCAN = 1 << 24  # tokens checked per step when validating or counting a memmap


class DataError(AlphaJitError, ValueError):
    """Training data that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SourceFile:
    """One document of a text corpus: how many of its bytes to take, and its mtime for the key."""

    path: Path
    nbytes: int
    mtime_ns: int


@dataclass(frozen=True)
class Corpus:
    """What `resolve_corpus` found: text documents to pack, or one pre-tokenized `.bin`."""

    kind: str  # "text" or "bin"
    description: str
    files: tuple[SourceFile, ...]
    skipped: int = 0  # unreadable files left out of a folder or the stdlib
    separator: int = SEPARATOR

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def cache_key(self) -> str:
        """Hash of everything that decides the token stream's content."""
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_FORMAT, self.kind, self.separator]).encode())
        for f in self.files:
            h.update(json.dumps([str(f.path), f.nbytes, f.mtime_ns]).encode())
        return h.hexdigest()[:24]


def _source(path: Path, nbytes: int | None = None) -> SourceFile:
    st = path.stat()
    return SourceFile(path, st.st_size if nbytes is None else nbytes, st.st_mtime_ns)


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _capped(paths: list[Path], max_bytes: int | None) -> tuple[list[SourceFile], int]:
    """Stat readable files in order until `max_bytes`; the last one is cut to fit the cap."""
    out: list[SourceFile] = []
    skipped = 0
    total = 0
    for p in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        if not _readable(p):
            skipped += 1
            continue
        src = _source(p)
        if src.nbytes == 0:
            continue  # an empty document would only add a separator
        if max_bytes is not None and total + src.nbytes > max_bytes:
            src = SourceFile(src.path, max_bytes - total, src.mtime_ns)
        out.append(src)
        total += src.nbytes
    return out, skipped


def stdlib_files() -> list[Path]:
    """The `.py` files of this interpreter's standard library, sorted, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        files.extend(Path(dirpath) / n for n in filenames if n.endswith(".py"))
    return sorted(files)


def _folder_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .git, .venv, caches
        files.extend(
            Path(dirpath) / n
            for n in filenames
            if Path(n).suffix.lower() in TEXT_SUFFIXES and not n.startswith(".")
        )
    return sorted(files)


def resolve_corpus(
    path: str | os.PathLike[str] | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Corpus:
    """Find the documents behind `--data PATH` (None: the stdlib) without writing anything.

    `max_bytes` caps a text corpus (files taken in sorted order, the last one cut to fit);
    None takes everything. It does not apply to a `.bin`, which is used as it is.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if path is None:
        files, skipped = _capped(stdlib_files(), max_bytes)
        root = sysconfig.get_paths()["stdlib"]
        if not files:
            raise DataError(f"no readable .py files in the standard library at {root}")
        return Corpus("text", f"stdlib .py files under {root}", tuple(files), skipped)

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {p}: does not exist")
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise DataError(f"data path {p}: folder is not readable")
        files, skipped = _capped(_folder_files(p), max_bytes)
        if not files:
            suffixes = " ".join(sorted(TEXT_SUFFIXES))
            raise DataError(
                f"data path {p}: no readable, non-empty text files (suffixes: {suffixes})"
            )
        return Corpus("text", f"text files under {p}", tuple(files), skipped)
    if not _readable(p):
        raise DataError(f"data path {p}: file is not readable")
    if p.suffix.lower() == ".bin":
        size = p.stat().st_size
        if size % TOKEN_DTYPE.itemsize:
            raise DataError(
                f"{p}: size {size} bytes is odd, but a .bin holds uint16 tokens (2 bytes each); "
                "the file looks truncated"
            )
        if size == 0:
            raise DataError(f"{p}: empty .bin file, no tokens")
        return Corpus("bin", f"pre-tokenized {p}", (_source(p),))
    files, _ = _capped([p], max_bytes)
    if not files:
        raise DataError(f"data path {p}: file is empty")
    return Corpus("text", f"text file {p}", tuple(files))


def check_token_range(tokens: np.ndarray, vocab_size: int, *, name: str = "tokens") -> None:
    """Raise if any id is >= vocab_size, naming the first bad offset (chunked, vectorised)."""
    for start in range(0, len(tokens), _SCAN):
        chunk = np.asarray(tokens[start : start + _SCAN])
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{name}: token id {int(chunk[i])} at offset {start + i} (byte {2 * (start + i)})"
                f" is out of range for vocab_size {vocab_size}"
            )


def _write_cache(corpus: Corpus, dest: Path) -> None:
    """Stream every document into a uint16 memmap at a temp path, then publish it."""
    total = corpus.nbytes + max(len(corpus.files) - 1, 0)
    with atomic_path(dest) as tmp:
        mm = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="w+", shape=(total,))
        pos = 0
        for i, src in enumerate(corpus.files):
            if i:
                mm[pos] = corpus.separator
                pos += 1
            try:
                with open(src.path, "rb") as f:
                    left = src.nbytes
                    while left:
                        chunk = f.read(min(_CHUNK, left))
                        if not chunk:
                            raise DataError(
                                f"{src.path}: file shrank while reading "
                                f"(expected {src.nbytes} bytes)"
                            )
                        mm[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                        pos += len(chunk)
                        left -= len(chunk)
            except OSError as e:
                raise DataError(f"{src.path}: cannot read ({e.strerror or e})") from e
        assert pos == total
        mm.flush()
        del mm  # unmap before the rename so the file is closed everywhere


def load_tokens(
    corpus: Corpus,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> np.memmap:
    """The corpus as a read-only uint16 memmap: the `.bin` itself, or a (re)used text cache."""
    if corpus.kind == "bin":
        path = corpus.files[0].path
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        check_token_range(tokens, vocab_size, name=str(path))
        return tokens
    if vocab_size <= max(255, corpus.separator):
        raise DataError(f"vocab_size {vocab_size} cannot hold byte tokens and the separator")
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    dest = folder / f"tokens-{corpus.cache_key()}.bin"
    expected = 2 * (corpus.nbytes + len(corpus.files) - 1)
    if not dest.exists() or dest.stat().st_size != expected:  # size check: a foreign or cut file
        _write_cache(corpus, dest)
    return np.memmap(dest, dtype=TOKEN_DTYPE, mode="r")


def split_sizes(n: int, *, block_size: int, val_fraction: float = 0.1) -> tuple[int, int]:
    """(train, val) token counts of an n-token stream; raises if either is shorter than a block."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(n * val_fraction)
    need = block_size + 1  # one block of inputs plus its shifted target
    for name, size in (("train", n - n_val), ("val", n_val)):
        if size < need:
            raise DataError(
                f"{name} split has {size} tokens (corpus {n}, val_fraction {val_fraction}),"
                f" fewer than block_size + 1 = {need}; use more data or a smaller block_size"
            )
    return n - n_val, n_val


def split_tokens(
    tokens: np.ndarray, *, block_size: int, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Train = the first (1 - val_fraction) of the stream, val = the rest (views, no copy)."""
    n_train, _ = split_sizes(len(tokens), block_size=block_size, val_fraction=val_fraction)
    return tokens[:n_train], tokens[n_train:]


def unigram_entropy(tokens: np.ndarray, vocab_size: int | None = None) -> float:
    """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
    counts = np.zeros(vocab_size or 1, dtype=np.int64)
    for start in range(0, len(tokens), _SCAN):
        c = np.bincount(np.asarray(tokens[start : start + _SCAN]), minlength=len(counts))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts += c
    total = counts.sum()
    if total == 0:
        raise DataError("unigram_entropy of an empty token stream")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


class BatchLoader:
    """Random (x, y) blocks from a token stream, resumable through its generator state."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0):
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size {block_size} and batch_size {batch_size} must be >= 1")
        if len(tokens) < block_size + 1:
            raise DataError(
                f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._span = np.arange(block_size + 1, dtype=np.int64)

    def _gather(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.tokens[offsets[:, None] + self._span], dtype=np.int32)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """x int32 [B, T] and y = x shifted by one, at random offsets."""
        # The largest offset is n - T - 1, so the target of the last position still exists.
        high = len(self.tokens) - self.block_size
        offsets = self.rng.integers(0, high, size=self.batch_size, dtype=np.int64)
        return self._gather(offsets)

    def eval_batches(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`n` batches at evenly spaced offsets: the same every call, independent of the RNG."""
        if n < 1:
            raise DataError(f"eval_batches needs n >= 1, got {n}")
        last = len(self.tokens) - self.block_size - 1
        offsets = np.linspace(0, last, n * self.batch_size).round().astype(np.int64)
        for i in range(n):
            yield self._gather(offsets[i * self.batch_size : (i + 1) * self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; `load_state_dict` of it replays the same batch sequence."""
        return {
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("block_size", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state has {key} {state.get(key)}, this loader {getattr(self, key)}"
                )
        rng = state.get("rng")
        if not isinstance(rng, dict) or rng.get("bit_generator") != "PCG64":
            raise DataError(f"loader state has no PCG64 generator state: {rng!r}")
        self.rng.bit_generator.state = rng
        self.seed = state.get("seed", self.seed)


@dataclass
class Dataset:
    """A loaded corpus split for training: what the trainer needs in one object."""

    corpus: Corpus
    tokens: np.ndarray
    train: np.ndarray
    val: np.ndarray
    vocab_size: int = VOCAB_SIZE
    info: dict[str, Any] = field(default_factory=dict)


def load_dataset(
    path: str | os.PathLike[str] | None = None,
    *,
    block_size: int,
    val_fraction: float = 0.1,
    vocab_size: int = VOCAB_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Dataset:
    """resolve_corpus + load_tokens + split_tokens; every check runs before the cache write."""
    corpus = resolve_corpus(path, max_bytes=max_bytes)
    if corpus.kind == "text":
        # The stream length is known before tokenizing, so a too-short corpus fails write-free.
        n = corpus.nbytes + len(corpus.files) - 1
        split_sizes(n, block_size=block_size, val_fraction=val_fraction)
    tokens = load_tokens(corpus, cache_dir=cache_dir, vocab_size=vocab_size)
    train, val = split_tokens(tokens, block_size=block_size, val_fraction=val_fraction)
    info = {
        "source": corpus.description,
        "files": len(corpus.files),
        "skipped": corpus.skipped,
        "tokens": len(tokens),
        "train_tokens": len(train),
        "val_tokens": len(val),
    }
    return Dataset(corpus, tokens, train, val, vocab_size, info)
