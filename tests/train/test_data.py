"""Corpus discovery, the memmapped token cache, splits and the batch loader."""

from __future__ import annotations

import os

import numpy as np
import pytest

from alpha_jit.train.data import (
    SEPARATOR,
    BatchLoader,
    DataError,
    load_dataset,
    load_tokens,
    resolve_corpus,
    split_tokens,
    unigram_entropy,
)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_packs_documents_with_separator(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", b"world")
    _write(root / "a.py", b"hello")
    _write(root / "sub" / "c.md", b"!!")
    _write(root / "skip.png", b"\x89PNG")  # not a text suffix
    _write(root / "empty.txt", b"")  # empty documents add nothing
    corpus = resolve_corpus(root)
    assert corpus.kind == "text"
    assert [f.path.name for f in corpus.files] == ["a.py", "b.txt", "c.md"]
    tokens = load_tokens(corpus, cache_dir=tmp_path / "cache")
    assert tokens.dtype == np.dtype("<u2")
    expected = b"hello" + bytes([SEPARATOR]) + b"world" + bytes([SEPARATOR]) + b"!!"
    assert bytes(np.asarray(tokens).astype(np.uint8)) == expected


def test_single_text_file(tmp_path):
    f = _write(tmp_path / "doc.txt", b"abc" * 10)
    tokens = load_tokens(resolve_corpus(f), cache_dir=tmp_path / "cache")
    assert list(tokens[:3]) == [97, 98, 99] and len(tokens) == 30  # one document: no separator


def test_cache_written_once_and_reused(tmp_path):
    f = _write(tmp_path / "doc.txt", b"some text " * 100)
    cache = tmp_path / "cache"
    t1 = load_tokens(resolve_corpus(f), cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin"
    st = files[0].stat()
    del t1
    t2 = load_tokens(resolve_corpus(f), cache_dir=cache)
    st2 = files[0].stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert list(cache.iterdir()) == files  # no temp files left beside it
    assert len(t2) == 1000
    # A changed source (new size and mtime) gets a new cache entry.
    _write(f, b"changed")
    os.utime(f, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    t3 = load_tokens(resolve_corpus(f), cache_dir=cache)
    assert len(t3) == 7 and len(list(cache.iterdir())) == 2
    # A cache file of the wrong size (not written by us) is rebuilt, not trusted.
    del t3
    victim = next(p for p in cache.iterdir() if p != files[0])
    victim.write_bytes(b"xx")
    rebuilt = load_tokens(resolve_corpus(f), cache_dir=cache)
    assert bytes(np.asarray(rebuilt, np.uint8)) == b"changed"


def test_stdlib_default_corpus(tmp_path):
    corpus = resolve_corpus(None, max_bytes=100_000)
    assert corpus.kind == "text" and corpus.nbytes == 100_000
    assert all(f.path.suffix == ".py" for f in corpus.files)
    assert not any("site-packages" in f.path.parts for f in corpus.files)
    tokens = load_tokens(corpus, cache_dir=tmp_path)
    assert len(tokens) == 100_000 + len(corpus.files) - 1
    assert int(np.asarray(tokens).max()) < 256
    assert 2.0 < unigram_entropy(tokens) < np.log(256)


def test_bin_input(tmp_path):
    ids = np.arange(1000, dtype="<u2") % 256
    f = tmp_path / "toks.bin"
    ids.tofile(f)
    cache = tmp_path / "cache"
    tokens = load_tokens(resolve_corpus(f), cache_dir=cache)
    np.testing.assert_array_equal(tokens, ids)
    assert not cache.exists()  # a .bin is used in place, never copied


def test_bin_truncated_tail_is_an_error(tmp_path):
    f = tmp_path / "toks.bin"
    f.write_bytes(np.arange(10, dtype="<u2").tobytes() + b"\x01")
    with pytest.raises(DataError, match=r"toks\.bin.*21 bytes.*truncated"):
        resolve_corpus(f)


def test_bin_out_of_range_token_names_offset(tmp_path):
    ids = np.zeros(5000, dtype="<u2")
    ids[1234] = 300
    ids[4000] = 999
    f = tmp_path / "toks.bin"
    ids.tofile(f)
    with pytest.raises(DataError, match=r"toks\.bin: token id 300 at offset 1234"):
        load_tokens(resolve_corpus(f), vocab_size=256)
    load_tokens(resolve_corpus(f), vocab_size=1000)  # fine with a larger vocab


def test_missing_path_is_an_error_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"nope\.txt: does not exist"):
        load_dataset(tmp_path / "nope.txt", block_size=8, cache_dir=cache)
    assert not cache.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_an_error(tmp_path):
    f = _write(tmp_path / "secret.txt", b"x" * 100)
    f.chmod(0)
    try:
        with pytest.raises(DataError, match="not readable"):
            resolve_corpus(f)
    finally:
        f.chmod(0o644)


def test_unreadable_files_are_skipped_in_folder_and_fatal_alone(tmp_path, monkeypatch):
    from alpha_jit.train import data

    root = tmp_path / "corpus"
    _write(root / "a.txt", b"aaaa")
    bad = _write(root / "b.txt", b"bbbb")
    real = data._readable
    monkeypatch.setattr(data, "_readable", lambda p: p != bad and real(p))  # works as root too
    corpus = resolve_corpus(root)
    assert [f.path.name for f in corpus.files] == ["a.txt"] and corpus.skipped == 1
    with pytest.raises(DataError, match=r"b\.txt: file is not readable"):
        resolve_corpus(bad)


def test_empty_folder_is_an_error(tmp_path):
    _write(tmp_path / "img.png", b"x")
    with pytest.raises(DataError, match="no readable, non-empty text files"):
        resolve_corpus(tmp_path)


def test_split_sizes_and_too_short(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, block_size=16, val_fraction=0.1)
    assert len(train) == 900 and len(val) == 100
    assert val[0] == 900 and train[-1] == 899  # val is the tail of the stream
    with pytest.raises(DataError, match="val split has 100 tokens.*block_size \\+ 1 = 129"):
        split_tokens(tokens, block_size=128, val_fraction=0.1)
    with pytest.raises(DataError, match="val_fraction"):
        split_tokens(tokens, block_size=8, val_fraction=1.5)


def test_load_dataset_too_short_writes_nothing(tmp_path):
    f = _write(tmp_path / "tiny.txt", b"x" * 50)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="split has"):
        load_dataset(f, block_size=32, cache_dir=cache)
    assert not cache.exists()
    ds = load_dataset(f, block_size=4, cache_dir=cache)
    assert len(ds.train) == 45 and len(ds.val) == 5 and ds.info["files"] == 1


def test_batch_loader_shapes_and_shift():
    tokens = np.arange(500, dtype=np.uint16)
    loader = BatchLoader(tokens, block_size=16, batch_size=4, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == np.int32
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x + 1)  # arange stream: the target is the next token
    assert int(y.max()) <= 499


def test_batch_loader_covers_last_offset():
    tokens = np.arange(10, dtype=np.uint16)
    loader = BatchLoader(tokens, block_size=9, batch_size=8, seed=0)
    x, y = loader.next_batch()  # only offset 0 fits
    np.testing.assert_array_equal(x, np.tile(np.arange(9), (8, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 10), (8, 1)))
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchLoader(tokens, block_size=10, batch_size=1)


def test_batch_loader_resume_replays_same_batches():
    import json

    tokens = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint16)
    a = BatchLoader(tokens, block_size=32, batch_size=8, seed=123)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint's JSON meta
    expected = [a.next_batch() for _ in range(5)]
    b = BatchLoader(tokens, block_size=32, batch_size=8, seed=999)
    b.load_state_dict(state)
    for ex, got in zip(expected, (b.next_batch() for _ in range(5)), strict=True):
        np.testing.assert_array_equal(ex[0], got[0])
        np.testing.assert_array_equal(ex[1], got[1])
    c = BatchLoader(tokens, block_size=16, batch_size=8)
    with pytest.raises(DataError, match="block_size 32"):
        c.load_state_dict(state)


def test_eval_batches_deterministic():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    loader = BatchLoader(tokens, block_size=32, batch_size=4, seed=5)
    first = list(loader.eval_batches(3))
    loader.next_batch()  # drawing training batches does not change eval batches
    second = list(loader.eval_batches(3))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert x1.shape == (4, 32)


def test_unigram_entropy():
    assert unigram_entropy(np.zeros(100, dtype=np.uint16)) == 0.0
    uniform = np.tile(np.arange(256, dtype=np.uint16), 10)
    assert unigram_entropy(uniform) == pytest.approx(np.log(256))
