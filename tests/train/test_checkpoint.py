"""Checkpoint round trip, atomic replacement on a crash, stale temporaries, NaN refusal, and
config mismatch errors."""

from __future__ import annotations

import numpy as np
import pytest

from alpha_jit.train import atomic
from alpha_jit.train import checkpoint as ckpt
from alpha_jit.train.atomic import remove_stale_temps
from alpha_jit.train.checkpoint import (
    CheckpointError,
    ConfigMismatchError,
    NonFiniteError,
    check_compatible,
    load_checkpoint,
    nonfinite_tensors,
    require_meta,
    require_tensors,
    save_checkpoint,
    strip_prefix,
    with_prefix,
)

CONFIG = {"vocab_size": 256, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}


def _state(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "blocks.0.attn.qkv.weight": rng.standard_normal((128, 384)).astype(np.float32),
        "blocks.0.ln_1.bias": rng.standard_normal(128).astype(np.float32),
        "wte.weight": rng.standard_normal((256, 128)).astype(np.float16),
    }
    tensors = with_prefix("model", params)
    tensors |= with_prefix("optim.m", {k: v.astype(np.float32) * 0.1 for k, v in params.items()})
    tensors |= with_prefix("optim.v", {k: v.astype(np.float32) ** 2 for k, v in params.items()})
    tensors["optim.scale"] = np.array(65536.0, dtype=np.float32)  # a 0-d tensor
    return tensors


def _meta(step=10):
    return {
        "config": CONFIG,
        "step": step,
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "t": step},
        "loader": {"rng": {"bit_generator": "PCG64", "state": {"state": 2**100, "inc": 7}}},
        "loss": np.float32(2.5),  # numpy scalars are stored as plain numbers
    }


def test_round_trip_bit_identical(tmp_path):
    tensors = _state()
    tensors["strided"] = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]  # non-contiguous
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tensors, _meta())
    got, meta = load_checkpoint(path)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert got[name].tobytes() == np.ascontiguousarray(t).tobytes()
    expected = _meta()
    expected["loss"] = 2.5
    assert meta == expected
    assert set(strip_prefix("optim.m", got)) == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.ln_1.bias",
        "wte.weight",
    }


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _state(0), _meta(10))
    before = path.read_bytes()

    def crash(tensors, tmp, metadata):
        tmp.write_bytes(b"partial garbage")  # some bytes made it out before the crash
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "_write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(1), _meta(20))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp left
    monkeypatch.undo()
    _, meta = load_checkpoint(path)
    assert meta["step"] == 10


def test_bad_meta_or_tensor_writes_nothing(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _state(), _meta())
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        save_checkpoint(path, _state(), {"fn": object()})
    with pytest.raises(CheckpointError, match="tensor 'x' is a list"):
        save_checkpoint(path, {"x": [1, 2]}, _meta())
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: file not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a safetensors file"):
        load_checkpoint(junk)
    from safetensors.numpy import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(bare))
    with pytest.raises(CheckpointError, match=r"bare\.safetensors: no 'alpha_jit' metadata"):
        load_checkpoint(bare)


def test_config_mismatch_lists_every_field(tmp_path):
    check_compatible(CONFIG, dict(CONFIG))
    model = dict(CONFIG, n_layer=6, n_embd=256, dropout=0.1)
    with pytest.raises(ConfigMismatchError) as err:
        check_compatible(CONFIG, model, path=tmp_path / "c.safetensors")
    text = str(err.value)
    assert "c.safetensors" in text and "3 field(s) differ" in text
    assert "n_layer: checkpoint 4, model 6" in text
    assert "n_embd: checkpoint 128, model 256" in text
    assert "dropout: checkpoint <missing>, model 0.1" in text
    assert [d[0] for d in err.value.differences] == ["dropout", "n_embd", "n_layer"]
    check_compatible(CONFIG, dict(CONFIG, dropout=0.2), ignore=["dropout"])


def test_config_from_dataclass_and_json_round_trip(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        n_layer: int = 4
        betas: tuple = (0.9, 0.95)

    path = save_checkpoint(tmp_path / "c.safetensors", _state(), {"config": Cfg()})
    _, meta = load_checkpoint(path)
    check_compatible(meta["config"], Cfg())  # tuple vs stored list is not a difference
    with pytest.raises(ConfigMismatchError, match="n_layer: checkpoint 4, model 2"):
        check_compatible(meta["config"], Cfg(n_layer=2))


def test_nonfinite_tensors_are_refused_and_the_old_file_kept(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _state(), _meta())
    before = path.read_bytes()
    for bad in (np.nan, np.inf, -np.inf):
        tensors = _state(1)
        tensors["optim.v.wte.weight"][3, 4] = bad
        with pytest.raises(NonFiniteError, match=r"1 tensor\(s\) hold NaN or inf") as err:
            save_checkpoint(path, tensors, _meta(20))
        assert err.value.names == ["optim.v.wte.weight"]
        assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    nan_state = {"x": np.full(3, np.nan, np.float32), "i": np.arange(3)}  # ints always finite
    assert nonfinite_tensors(nan_state) == ["x"]
    save_checkpoint(tmp_path / "raw.safetensors", nan_state, _meta(), allow_nonfinite=True)


def test_missing_tensor_or_meta_key_is_named(tmp_path):
    tensors = _state()
    with pytest.raises(CheckpointError, match=r"c\.st: missing tensor\(s\) 'model\.head'"):
        require_tensors(tensors, {"model.head": (2,)}, path=tmp_path / "c.st")
    with pytest.raises(CheckpointError, match=r"'model\.wte\.weight' has shape \[256, 128\], "
                                              r"the model expects \[256, 64\]"):
        require_tensors(tensors, {"model.wte.weight": (256, 64)}, path="c.st")
    require_tensors(tensors, {"model.wte.weight": (256, 128)}, path="c.st")
    with pytest.raises(CheckpointError, match="metadata has no step, rng"):
        require_meta({"config": {}}, ["config", "step", "rng"], path="c.st")


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _state(), _meta())
    # A SIGKILL between the write and the rename runs no cleanup; simulate both.
    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(atomic.os, "replace", killed)
    monkeypatch.setattr(atomic.Path, "unlink", lambda self, *a, **k: None)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(path, _state(1), _meta(20))
    monkeypatch.undo()
    other = tmp_path / ".tmp-other.safetensors.abc"  # another file's temporary stays
    other.write_bytes(b"x")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-ckpt.safetensors.")]
    assert len(stale) == 1
    assert remove_stale_temps(path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "ckpt.safetensors"]
    assert remove_stale_temps(tmp_path / "nowhere" / "ckpt.safetensors") == []
    assert load_checkpoint(path)[1]["step"] == 10
