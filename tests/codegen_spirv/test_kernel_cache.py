"""The on-disk kernel cache: data only, verified on load, bounded, and never fatal.

Each test points ALPHA_JIT_CACHE_DIR at a fresh folder and empties the in-process memo of
`generate()`, so the disk path is what runs. Compiled functions go through the public API
(`aj.compile`), damage cases through `generate()` directly.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.codegen_spirv import disk_cache
from alpha_jit.codegen_spirv import generate as gen
from alpha_jit.codegen_spirv.disk_cache import KernelCacheWarning
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.runtime import get_device
from alpha_jit.runtime import pipelines as pl

# the device's own pipeline cache (fixed when it is created) stays out of the user's home
os.environ.setdefault("ALPHA_JIT_CACHE_DIR", tempfile.mkdtemp(prefix="alpha_jit_cache_"))

ROOT = Path(__file__).resolve().parents[2]

ELEMENTWISE = KernelSpec("elementwise", "scale_shift", (
    ("shape", (4, 33)), ("inputs", (("f32", (33, 1), 0),)),
    ("exprs", (("mul", "f32", (), (("in", 0), ("const", 1.75, "f32"))),
               ("add", "f32", (), (("e", 0), ("const", 0.5, "f32"))))),
    ("outputs", (("f32", 1),))))
REDUCTION = KernelSpec("reduction", "row_sum", (
    ("mode", "sum"), ("outer_shape", (5,)), ("outer_strides", (40,)), ("offset", 0),
    ("red_len", 40), ("red_stride", 1), ("in_dtype", "f32"), ("out_dtype", "f32")))
MATMUL = KernelSpec("matmul", "mm", (
    ("batch", 1), ("m", 8), ("n", 12), ("k", 16), ("a", ("f32", 0, 128, 16, 1)),
    ("b", ("f32", 0, 192, 12, 1)), ("out_dtype", "f32")))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache root, an empty in-process memo, and per-process cache state reset."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(root))
    monkeypatch.setattr(gen, "_CACHE", {})
    monkeypatch.setattr(disk_cache, "_pruned", set())
    monkeypatch.setattr(disk_cache, "_unwritable_roots", set())
    return root


@pytest.fixture(scope="module")
def caps():
    return get_device().caps


def generation(caps) -> Path:
    return disk_cache.generation_dir(caps.fingerprint(), gen.codegen_version())


def forget_memory(monkeypatch) -> None:
    """A later process: nothing generated in memory, only what is on disk."""
    monkeypatch.setattr(gen, "_CACHE", {})


def scale_shift(x: np.ndarray, a: float = 1.75) -> np.ndarray:
    """Compile (a fresh trace each call) and run `x * a + 0.5`: one kernel, two constants."""

    @aj.compile
    def f(t):
        return t * a + 0.5

    return f(x).numpy()


X = np.linspace(-3, 3, 40, dtype=np.float32).reshape(5, 8)
WANT = X * np.float32(1.75) + np.float32(0.5)


def cache_warnings(rec) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, KernelCacheWarning)]


class _TouchMarker:
    """A pickle that, when loaded, creates the file `path`: what a planted cache entry can do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ---- (1) a cache file is data, never code ------------------------------------------------------

def test_planted_pickle_in_cache_is_never_executed(cache, caps, tmp_path, monkeypatch):
    np.testing.assert_allclose(scale_shift(X), WANT, rtol=1e-6)
    folder = generation(caps)
    stems = {p.name.split(".", 1)[0] for p in folder.iterdir()}
    assert stems
    marker = tmp_path / "planted-code-ran"
    payload = pickle.dumps(_TouchMarker(marker))
    for p in list(folder.iterdir()):  # every entry, whatever its format, becomes the payload
        p.write_bytes(payload)
    for stem in stems:  # and under the name a pickling cache would read
        (folder / f"{stem}.pkl").write_bytes(payload)
    forget_memory(monkeypatch)
    with pytest.warns(KernelCacheWarning, match="not valid JSON"):
        got = scale_shift(X)
    assert not marker.exists(), "a cache file ran code"
    np.testing.assert_allclose(got, WANT, rtol=1e-6)


def test_no_object_deserializer_anywhere_in_the_package():
    uses = re.compile(r"^\s*(import|from)\s+(c?pickle|marshal|shelve|dill|cloudpickle)\b|"
                      r"\b(pickle|marshal|shelve)\.(loads?|Unpickler|open)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "alpha_jit").rglob("*.py")
                 if uses.search(p.read_text())]
    assert offenders == []


# ---- (2) (3) damaged entries through the public API ------------------------------------------

def test_edited_float_constant_is_detected_and_regenerated(cache, caps, monkeypatch):
    np.testing.assert_allclose(scale_shift(X), WANT, rtol=1e-6)
    old, new = struct.pack("<f", 1.75), struct.pack("<f", 3.75)
    edited = [p for p in generation(caps).iterdir() if old in p.read_bytes()]
    assert edited, "no cached kernel holds the constant 1.75"
    for p in edited:
        p.write_bytes(p.read_bytes().replace(old, new))
    forget_memory(monkeypatch)
    with pytest.warns(KernelCacheWarning) as rec:
        got = scale_shift(X)
    msgs = cache_warnings(rec)
    assert any(str(p) in m and "content hash" in m for p in edited for m in msgs), msgs
    np.testing.assert_allclose(got, WANT, rtol=1e-6)
    assert all(old in p.read_bytes() for p in edited)  # the entry was rewritten whole


def test_corrupt_spirv_word_warns_and_regenerates(cache, caps, monkeypatch):
    np.testing.assert_allclose(scale_shift(X), WANT, rtol=1e-6)
    (spv,) = generation(caps).glob("*.spv")
    words = bytearray(spv.read_bytes())
    mid = len(words) // 8 * 4
    words[mid:mid + 4] = b"\xef\xbe\xad\xde"  # an opcode the driver chokes on
    spv.write_bytes(bytes(words))
    forget_memory(monkeypatch)
    with pytest.warns(KernelCacheWarning, match=re.escape(str(spv))):
        got = scale_shift(X)
    np.testing.assert_allclose(got, WANT, rtol=1e-6)


# ---- every kind of damage, through generate() ------------------------------------------------

def _flip_word(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    b = bytearray(spv.read_bytes())
    b[40:44] = bytes(x ^ 0xFF for x in b[40:44])
    spv.write_bytes(bytes(b))
    return spv


def _truncate(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    spv.write_bytes(spv.read_bytes()[:len(spv.read_bytes()) // 8 * 4])
    return spv


def _partial_word(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    spv.write_bytes(spv.read_bytes()[:-1])
    return spv


def _empty(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    spv.write_bytes(b"")
    return spv


def _bad_magic(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    spv.write_bytes(b"\x00\x00\x00\x00" + spv.read_bytes()[4:])
    return spv


def _bad_json(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    side.write_bytes(side.read_bytes()[:-20])
    return side


def _other_spec(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    spv.write_bytes(other[0].read_bytes())
    side.write_bytes(other[1].read_bytes())
    return side


def _edited_metadata(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    doc = json.loads(side.read_text())
    doc["meta"]["local_size"] = [1, 1, 1]
    side.write_text(json.dumps(doc))
    return spv


def _edited_push_constants(spv: Path, side: Path, other: tuple[Path, Path]) -> Path:
    doc = json.loads(side.read_text())
    doc["meta"]["dispatches"][0][1] = "ff" * 8
    side.write_text(json.dumps(doc))
    return spv


@pytest.mark.parametrize("damage", [_flip_word, _truncate, _partial_word, _empty, _bad_magic,
                                    _bad_json, _other_spec, _edited_metadata,
                                    _edited_push_constants], ids=lambda f: f.__name__[1:])
def test_damaged_entry_is_named_and_regenerated(cache, caps, monkeypatch, damage):
    fresh = gen.generate(ELEMENTWISE, caps)
    gen.generate(REDUCTION, caps)
    folder = generation(caps)
    spv, side = disk_cache.entry_paths(folder, ELEMENTWISE)
    blamed = damage(spv, side, disk_cache.entry_paths(folder, REDUCTION))
    forget_memory(monkeypatch)
    made = gen.COUNTS["generated"]
    with pytest.warns(KernelCacheWarning, match=re.escape(str(blamed))):
        got = gen.generate(ELEMENTWISE, caps)
    assert got == fresh and gen.COUNTS["generated"] == made + 1
    forget_memory(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry loads cleanly
        assert gen.generate(ELEMENTWISE, caps) == fresh
    assert gen.COUNTS["generated"] == made + 1


# ---- (4) an unwritable cache ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_unwritable_cache_warns_once_and_runs(cache, caps, tmp_path, monkeypatch, how):
    if how == "under_a_file":
        (tmp_path / "plain").write_text("not a folder")
        root = tmp_path / "plain" / "cache"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        root = tmp_path / "ro"
        root.mkdir(mode=0o500)
    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(root))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        np.testing.assert_allclose(scale_shift(X), WANT, rtol=1e-6)
        np.testing.assert_allclose(scale_shift(X, 2.5), X * np.float32(2.5) + 0.5, rtol=1e-6)
        mgr = pl.PipelineManager(get_device())  # its pipeline_cache.bin is under `root` too
        try:
            assert mgr.get(gen.generate(MATMUL, caps)).handle
            assert mgr.save() is False
        finally:
            mgr.destroy()
    msgs = cache_warnings(rec)
    assert len(msgs) == 1 and str(root) in msgs[0], msgs
    assert not [w for w in rec if not issubclass(w.category, KernelCacheWarning)]


# ---- (5) bounded -----------------------------------------------------------------------------

def test_other_generations_are_pruned(cache, caps):
    folder = generation(caps)
    stale = folder.parent / "0123456789ab"  # what an older generator version left behind
    stale.mkdir(parents=True)
    (stale / "elementwise-0.spv").write_bytes(b"\x03\x02\x23\x07")
    unrelated = folder.parent / "notes"  # not a generation: left alone
    unrelated.mkdir()
    gen.generate(ELEMENTWISE, caps)
    assert not stale.exists() and unrelated.exists()
    assert disk_cache.entry_paths(folder, ELEMENTWISE)[0].exists()


def test_generation_keeps_recent_entries_under_the_size_cap(cache, caps, monkeypatch):
    folder = generation(caps)
    folder.mkdir(parents=True)
    for i in range(10):  # old, unused entries of 1 KiB each
        for ext in ("spv", "json"):
            p = folder / f"elementwise-old{i}.{ext}"
            p.write_bytes(b"\0" * 512)
            os.utime(p, (1_000_000 + i, 1_000_000 + i))
    monkeypatch.setattr(disk_cache, "MAX_GENERATION_BYTES", 4096)
    gen.generate(ELEMENTWISE, caps)
    names = {p.name.split(".", 1)[0] for p in folder.iterdir()}
    assert f"elementwise-{ELEMENTWISE.key()}" in names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 4096 + 8192  # + the new entry
    assert "elementwise-old0" not in names and "elementwise-old9" in names  # oldest go first


def test_pipeline_cache_file_is_bounded(cache, caps, monkeypatch):
    # the cap is far above one pipeline's data (7 KB on an H200) and below the planted file
    monkeypatch.setattr(pl, "MAX_PIPELINE_CACHE_BYTES", 100_000)
    path = disk_cache.cache_dir(caps.fingerprint()) / "pipeline_cache.bin"
    disk_cache.atomic_write(path, b"\0" * 200_000)
    mgr = pl.PipelineManager(get_device())
    try:
        mgr.get(gen.generate(ELEMENTWISE, caps))
        assert mgr.save()
    finally:
        mgr.destroy()
    assert path.stat().st_size <= 100_000


# ---- (6) warm round trip ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", [ELEMENTWISE, REDUCTION, MATMUL], ids=lambda s: s.family)
def test_warm_cache_round_trip_gives_an_equal_binary(cache, caps, monkeypatch, spec):
    cold = gen.generate(spec, caps)
    spv, side = disk_cache.entry_paths(generation(caps), spec)
    assert spv.read_bytes() == cold.words  # raw SPIR-V: spirv-dis reads it as is
    assert json.loads(side.read_text())["meta"]["spec_key"] == spec.key()
    forget_memory(monkeypatch)
    made, hits = gen.COUNTS["generated"], gen.COUNTS["disk"]
    warm = gen.generate(spec, caps)
    assert (gen.COUNTS["generated"], gen.COUNTS["disk"]) == (made, hits + 1)
    assert warm is not cold and warm == cold
    assert {k: type(v) for k, v in warm.notes.items()} == {k: type(v)
                                                          for k, v in cold.notes.items()}


# ---- progress over a cold build --------------------------------------------------------------

def test_cold_build_shows_pipeline_progress_and_says_where_it_is_cached(cache, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(pl, "_BAR_MIN_NEW", 1)
    monkeypatch.setattr(pl, "_BAR_DELAY_S", 0.0)
    monkeypatch.setattr(pl, "_NOTE_AFTER_S", 0.0)
    monkeypatch.setattr(pl, "_noted_cache", False)
    np.testing.assert_allclose(scale_shift(X, 1.0625), X * np.float32(1.0625) + 0.5, rtol=1e-6)
    err = capsys.readouterr().err
    assert "building pipelines" in err
    assert "cached under" in err and str(cache) in err
    scale_shift(X, 1.125)
    assert "cached under" not in capsys.readouterr().err  # once per process


def test_changed_scalar_rule_changes_the_cache_generation(monkeypatch):
    """Elementwise kernels are emitted from the ops' scalar rules (ir/ops): editing one must
    never reuse binaries cached by the old rule."""
    from pathlib import Path

    from alpha_jit.codegen_spirv import generate as gen

    gen.codegen_version.cache_clear()
    before = gen.codegen_version()
    real = Path.read_bytes

    def edited(self: Path) -> bytes:
        data = real(self)
        return data + b"\n# edited" if self.name == "elementwise.py" and \
            self.parent.name == "ops" else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    gen.codegen_version.cache_clear()
    try:
        assert gen.codegen_version() != before
    finally:
        monkeypatch.undo()
        gen.codegen_version.cache_clear()
