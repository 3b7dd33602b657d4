"""The on-disk kernel cache: raw SPIR-V plus JSON metadata, verified by a content hash on load.

Generating the SPIR-V of every kernel of a step costs seconds on a cold start, so `generate()`
keeps each `KernelBinary` across processes. A cache file is data, never code: the module is
stored raw (`spirv-dis` reads it) and everything else the binary carries (bindings, local size,
dispatches with their push-constant bytes, shared bytes, entry point, notes) in a JSON sidecar
that is decoded field by field into known types. Loading an object serializer's stream would
run whatever a planted file asks for; nothing here can.

The sidecar also holds a SHA-256 over the spec key, the metadata and the SPIR-V bytes. An entry
that was edited (one float constant changed), truncated, is not whole words, lacks the SPIR-V
magic, has bad JSON or was written for another spec fails the check, is named in a
`KernelCacheWarning` and regenerated, so a damaged file can neither silently change results nor
crash the driver on every later run. (The hash catches accidents and edits, not a forger who
rewrites it too; such a person could as well edit the program.)

Layout, one folder per device fingerprint and one generation per generator version:

    $ALPHA_JIT_CACHE_DIR/<fingerprint>/kernels/<codegen version>/<family>-<spec key>.spv
    $ALPHA_JIT_CACHE_DIR/<fingerprint>/kernels/<codegen version>/<family>-<spec key>.json
    $ALPHA_JIT_CACHE_DIR/<fingerprint>/pipeline_cache.bin      (runtime/pipelines.py)

Bounded: the first write of a process into a generation removes the generations of other
generator versions and, past `MAX_GENERATION_BYTES`, the least recently used entries of its own
(a load touches its sidecar). A cache root that cannot be written (read-only, full, a path under
a regular file) warns once per process and root; the process then runs without writing there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from alpha_jit.codegen_spirv.kernel import Binding, Dispatch, KernelBinary, KernelSpec

log = logging.getLogger("alpha_jit.cache")

FORMAT = 1  # bump when the sidecar layout changes; older entries then fail the check
SPIRV_MAGIC = 0x07230203
MAX_GENERATION_BYTES = 256 << 20  # ~50k kernels of a few KiB: many models, bounded disk
_GENERATION_NAME = re.compile(r"^[0-9a-f]{12}$")  # what codegen_version() names a folder
_NOTE_TYPES_FROM = "alpha_jit.codegen_spirv."  # dataclasses in notes must be our own

_unwritable_roots: set[Path] = set()  # roots already warned about in this process
_pruned: set[Path] = set()  # generations already pruned in this process


class KernelCacheWarning(UserWarning):
    """A cache entry was damaged (and is regenerated), or the cache cannot be written."""


class CorruptEntry(Exception):
    """Why one cache entry cannot be trusted; `path` is the file to blame."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ---- where ----------------------------------------------------------------------------------

def cache_root() -> Path:
    """`$ALPHA_JIT_CACHE_DIR`, default `~/.cache/alpha_jit`."""
    env = os.environ.get("ALPHA_JIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "alpha_jit"


def cache_dir(fingerprint: str) -> Path:
    """Everything cached for one device (its capabilities' fingerprint)."""
    return cache_root() / fingerprint


def generation_dir(fingerprint: str, version: str) -> Path:
    """The kernels one generator version produced for one device."""
    return cache_dir(fingerprint) / "kernels" / version


def entry_paths(folder: Path, spec: KernelSpec) -> tuple[Path, Path]:
    """(raw SPIR-V, JSON sidecar) of `spec` in a generation folder."""
    stem = f"{spec.family}-{spec.key()}"
    return folder / f"{stem}.spv", folder / f"{stem}.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def writable(path: Path) -> bool:
    """False once reading or writing under `path`'s cache root failed in this process."""
    return _root_of(path) not in _unwritable_roots


def note_unwritable(path: Path, exc: OSError) -> None:
    """Using the cache root failed (read-only, full, not a folder): warn once per process and
    root, and write nothing there from now on."""
    root = _root_of(path)
    if root in _unwritable_roots:
        return
    _unwritable_roots.add(root)
    warnings.warn(f"alpha_jit: cannot use the cache under {root} ({exc}); this process runs "
                  "without the on-disk cache (set ALPHA_JIT_CACHE_DIR to a writable folder)",
                  KernelCacheWarning, stacklevel=3)


def _root_of(path: Path) -> Path:
    root = cache_root()
    return root if path == root or root in path.parents else path


# ---- load and store -------------------------------------------------------------------------

def load(spec: KernelSpec, folder: Path) -> KernelBinary | None:
    """The verified binary of `spec` from `folder`, or None (absent, or damaged: warned)."""
    spv, side = entry_paths(folder, spec)
    try:
        text = side.read_bytes()
        words = spv.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None  # never written, or pruned meanwhile: an ordinary miss
    except OSError as exc:  # e.g. a folder without read permission: say so once, not per kernel
        note_unwritable(side, exc)
        return None
    try:
        binary = decode(spec, text, words, spv, side)
    except CorruptEntry as exc:
        _warn_corrupt(exc)
        return None
    try:
        os.utime(side)  # last use, for the size cap's LRU order
    except OSError:
        pass
    return binary


def store(binary: KernelBinary, folder: Path) -> None:
    """Write `binary` into `folder` (SPIR-V first, then the sidecar that vouches for it)."""
    if not writable(folder):
        return
    try:
        sidecar, words = encode(binary)
    except TypeError as exc:  # a note of a type the codec does not know: stay in memory only
        log.debug("kernel %s not cached on disk: %s", binary.name, exc)
        return
    spv, side = entry_paths(folder, binary.spec)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if folder not in _pruned:
            _pruned.add(folder)
            prune(folder)
        atomic_write(spv, words)
        atomic_write(side, sidecar)
    except OSError as exc:
        note_unwritable(folder, exc)


def _warn_corrupt(exc: CorruptEntry) -> None:
    warnings.warn(f"alpha_jit: kernel cache file {exc.path} {exc.reason}; regenerating it",
                  KernelCacheWarning, stacklevel=4)


# ---- bounds ---------------------------------------------------------------------------------

def prune(folder: Path, max_bytes: int | None = None) -> None:
    """Remove other generator versions' folders beside `folder`, then the least recently used
    entries of `folder` until it is under 3/4 of `max_bytes` (default MAX_GENERATION_BYTES)."""
    limit = MAX_GENERATION_BYTES if max_bytes is None else max_bytes
    try:
        siblings = list(folder.parent.iterdir())
    except OSError:
        return
    for other in siblings:
        if other != folder and _GENERATION_NAME.match(other.name) and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    try:
        _evict_lru(folder, limit)
    except OSError:  # another process pruning at the same time: leave it to that one
        pass


def _evict_lru(folder: Path, limit: int) -> None:
    entries: dict[str, list[os.DirEntry]] = {}  # stem -> its files (.spv, .json, stray .tmp)
    with os.scandir(folder) as it:
        for f in it:
            if f.is_file(follow_symlinks=False):
                entries.setdefault(f.name.split(".", 1)[0], []).append(f)
    size = {stem: sum(f.stat().st_size for f in fs) for stem, fs in entries.items()}
    total = sum(size.values())
    if total <= limit:
        return
    used = {stem: max(f.stat().st_mtime for f in fs) for stem, fs in entries.items()}
    for stem in sorted(entries, key=used.__getitem__):
        if total <= limit * 3 // 4:
            break
        # the sidecar goes first: a reader never finds a sidecar without its SPIR-V
        for f in sorted(entries[stem], key=lambda f: not f.name.endswith(".json")):
            Path(f.path).unlink(missing_ok=True)
        total -= size[stem]
    log.info("kernel cache %s pruned to %d bytes", folder, total)


# ---- the format -----------------------------------------------------------------------------

def content_hash(spec_key: str, meta: dict, words: bytes) -> str:
    """SHA-256 over the spec key, the canonical metadata and the SPIR-V bytes."""
    h = hashlib.sha256(b"alpha_jit kernel cache\0")
    h.update(spec_key.encode() + b"\0" + _canonical(meta).encode() + b"\0")
    h.update(words)
    return h.hexdigest()


def encode(binary: KernelBinary) -> tuple[bytes, bytes]:
    """(JSON sidecar, raw SPIR-V) of a binary; TypeError for a note the codec cannot hold."""
    words = bytes(binary.words)
    meta = {
        "format": FORMAT,
        "spec_key": binary.spec.key(),
        "family": binary.spec.family,
        "name": binary.spec.name,  # for people reading the folder; the spec key decides
        "spirv_bytes": len(words),
        "entry_point": binary.entry_point,
        "local_size": list(binary.local_size),
        "bindings": [[b.name, b.dtype, b.writable] for b in binary.bindings],
        "dispatches": [[list(d.groups), d.push_constants.hex()] for d in binary.dispatches],
        "push_constant_size": binary.push_constant_size,
        "shared_bytes": binary.shared_bytes,
        "notes": _enc(dict(binary.notes)),
    }
    sidecar = {"sha256": content_hash(meta["spec_key"], meta, words), "meta": meta}
    return (json.dumps(sidecar, sort_keys=True, indent=1) + "\n").encode(), words


def decode(spec: KernelSpec, sidecar: bytes, words: bytes, spv: Path,
           side: Path) -> KernelBinary:
    """The binary an entry describes, for `spec`; CorruptEntry naming the file at fault."""
    try:
        doc = json.loads(sidecar.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(side, f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise CorruptEntry(side, "has no metadata object")
    meta = doc["meta"]
    if meta.get("format") != FORMAT:
        raise CorruptEntry(side, f"has format {meta.get('format')!r}, not {FORMAT}")
    if meta.get("spec_key") != spec.key() or meta.get("family") != spec.family:
        raise CorruptEntry(side, f"was written for spec {meta.get('spec_key')!r}, "
                                 f"not {spec.family}-{spec.key()}")
    if not words or len(words) % 4:
        raise CorruptEntry(spv, f"is {len(words)} bytes, not a whole number of 32-bit words")
    if len(words) != meta.get("spirv_bytes"):
        raise CorruptEntry(spv, f"holds {len(words)} bytes, its metadata says "
                                f"{meta.get('spirv_bytes')!r} (truncated?)")
    if int.from_bytes(words[:4], "little") != SPIRV_MAGIC:
        raise CorruptEntry(spv, "does not start with the SPIR-V magic number")
    want = doc.get("sha256")
    if not isinstance(want, str) or not hmac.compare_digest(
            want, content_hash(spec.key(), meta, words)):
        raise CorruptEntry(spv, f"or its metadata {side.name} does not match the content "
                                "hash (edited or corrupted)")
    try:
        return KernelBinary(
            spec=spec, words=words,
            bindings=tuple(Binding(_typed(n, str), _typed(d, str), _typed(w, bool))
                           for n, d, w in meta["bindings"]),
            local_size=_ints3(meta["local_size"]),
            dispatches=tuple(Dispatch(_ints3(g), bytes.fromhex(_typed(pc, str)))
                             for g, pc in meta["dispatches"]),
            push_constant_size=_typed(meta["push_constant_size"], int),
            entry_point=_typed(meta["entry_point"], str),
            shared_bytes=_typed(meta["shared_bytes"], int),
            notes=_typed(_dec(meta["notes"]), dict))
    except (KeyError, TypeError, ValueError, ImportError) as exc:  # hashed, but malformed
        raise CorruptEntry(side, f"has malformed metadata ({exc!r})") from None


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _typed(v: Any, t: type) -> Any:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise TypeError(f"{v!r} is not {t.__name__}")
    return v


def _ints3(v: Any) -> tuple[int, int, int]:
    if not isinstance(v, list) or len(v) != 3:
        raise TypeError(f"{v!r} is not three integers")
    a, b, c = (_typed(x, int) for x in v)
    return a, b, c


# ---- notes: JSON scalars plus tagged tuples, lists, dicts and our own frozen dataclasses ----

def _enc(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, list):
        return {"list": [_enc(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_enc(k), _enc(x)] for k, x in v.items()]}
    cls = type(v)
    if (dataclasses.is_dataclass(v) and cls.__module__.startswith(_NOTE_TYPES_FROM)
            and cls.__dataclass_params__.frozen and "." not in cls.__qualname__):
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _enc(getattr(v, f.name))
                           for f in dataclasses.fields(v) if f.init}}
    raise TypeError(f"note value {v!r} of type {cls.__name__} has no JSON form")


def _dec(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if not isinstance(v, dict) or len(v) not in (1, 2):
        raise TypeError(f"unknown note encoding {v!r}")
    if "tuple" in v:
        return tuple(_dec(x) for x in v["tuple"])
    if "list" in v:
        return [_dec(x) for x in v["list"]]
    if "dict" in v:
        return {_dec(k): _dec(x) for k, x in v["dict"]}
    if "dataclass" in v:
        mod, _, name = _typed(v["dataclass"], str).partition(":")
        if not mod.startswith(_NOTE_TYPES_FROM) or not name.isidentifier():
            raise TypeError(f"note type {v['dataclass']!r} is not ours")
        cls = getattr(importlib.import_module(mod), name, None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)
                and cls.__dataclass_params__.frozen):
            raise TypeError(f"note type {v['dataclass']!r} is not a frozen dataclass")
        fields = _typed(v["fields"], dict)
        return cls(**{k: _dec(x) for k, x in fields.items()})
    raise TypeError(f"unknown note encoding {v!r}")
