"""Retraces are bounded: a one-time warning (or an error) and an LRU cache that frees memory.

A step traced for every new input shape compiles new kernels and allocates a new arena each
time; these tests check that churn is reported once, naming the argument that changes, that
`max_recompiles` turns it into an error, and that evicted steps give their device memory back
while the values they returned, the parameters they trained and re-used shapes stay correct.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.compile import RecompileError, RecompileWarning
from alpha_jit.runtime import get_device
from alpha_jit.runtime.step import Executable
from tests.e2e.util import classifier_step


def _double_and_bump(x, w):
    return (x * 2.0).sum() + w.sum(), x + 1.0


def test_shape_churn_warns_once_naming_the_argument():
    f = aj.compile(_double_and_bump)
    w = np.ones(3, np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning, not Python's once-per-line
        for n in range(1, 13):
            f(np.ones((1, n), np.float32), w)
    found = [c for c in caught if issubclass(c.category, RecompileWarning)]
    assert len(found) == 1, [str(c.message) for c in found]
    msg = str(found[0].message)
    assert "traced 9 times" in msg
    assert "argument 0 took 9 different shapes: (1, 1), (1, 2)" in msg
    assert "argument 1" not in msg  # the fixed argument is not blamed
    assert "pipelines" in msg and "max_recompiles" in msg
    assert found[0].filename == __file__  # points at the user's call, not at alpha_jit
    assert f.traces == 12


def test_max_recompiles_raises_on_the_next_trace():
    f = aj.compile(_double_and_bump, max_recompiles=3)
    w = np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)  # a limit replaces the warning
        for n in range(1, 4):
            f(np.ones((2, n), np.float32), w)
        with pytest.raises(RecompileError) as err:
            f(np.ones((2, 4), np.float32), w)
    assert isinstance(err.value, aj.AlphaJitError)
    msg = str(err.value)
    assert "_double_and_bump needs trace 4 but max_recompiles=3" in msg
    assert "argument 0 took 4 different shapes: (2, 1), (2, 2), (2, 3), (2, 4)" in msg
    assert f.traces == 3  # refused before tracing
    total, bumped = f(np.ones((2, 3), np.float32), w)  # cached shapes keep working
    assert float(total) == 15.0 and f.traces == 3


def test_evicted_steps_free_device_memory_and_values_stay_readable():
    dev = get_device()
    f = aj.compile(_double_and_bump, cache_size=4)
    w = np.ones(3, np.float32)
    rng = np.random.default_rng(0)
    base = dev.memory.bytes_in_use()
    xs, outs, used = [], [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        for i, n in enumerate(range(60, 80)):
            xs.append(rng.standard_normal((64, n)).astype(np.float32))
            outs.append(f(xs[-1], w))  # never read here: every handle is pending at eviction
            used[i + 1] = dev.memory.bytes_in_use() - base
    assert len(f.cache) == 4 and f.evictions == 16 and f.traces == 20
    # Four steps alive at any time: memory follows the cache, not the number of shapes seen
    # (the slack covers later shapes being a little larger).
    assert used[4] > 0
    assert used[20] <= 1.5 * used[4], used
    for x, (total, bumped) in zip(xs, outs, strict=True):
        np.testing.assert_allclose(float(total), 2.0 * x.astype(np.float64).sum() + 3.0,
                                   rtol=1e-4)
        np.testing.assert_array_equal(bumped.numpy(), x + 1.0)
    # The first shape was evicted long ago: it is traced again and still right.
    total, bumped = f(xs[0], w)
    assert f.traces == 21
    np.testing.assert_array_equal(bumped.numpy(), xs[0] + 1.0)


def _mlp(seed: int) -> nn.Module:
    nn.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 5))


def test_training_across_evictions_matches_an_unbounded_cache():
    """Parameters and moments are shared by every step: evicting a step must not free them."""
    models = [_mlp(7), _mlp(7)]
    opts = [nn.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    small = classifier_step(models[0], opts[0])
    small.cache_size = 2
    full = classifier_step(models[1], opts[1])
    full.cache_size = None
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        for n in [8, 9, 10, 8, 11, 9, 8, 12, 10]:  # shapes come back after being evicted
            x = rng.standard_normal((n, 6)).astype(np.float32)
            y = rng.integers(0, 5, n).astype(np.int32)
            a, b = float(small(x, y)), float(full(x, y))
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"loss at batch {n}")
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), rtol=1e-6, atol=1e-7)
    assert full.traces == 5 and small.traces > full.traces and len(small.cache) == 2


def test_release_is_idempotent_and_a_released_step_refuses_to_run():
    f = aj.compile(_double_and_bump)
    x, w = np.ones((2, 2), np.float32), np.ones(3, np.float32)
    total, _ = f(x, w)
    (exe,) = [e for es in f.cache.values() for e in es]
    assert isinstance(exe, Executable)
    used = get_device().memory.bytes_in_use()
    f.clear_cache()
    assert get_device().memory.bytes_in_use() < used
    exe.release()  # a second release is a no-op
    assert float(total) == 11.0  # fetched at release
    assert exe.kernel_times() == []
    with pytest.raises(aj.AlphaJitError, match="released"):
        exe([x, w])
    assert float(f(x, w)[0]) == 11.0 and f.traces == 2  # the function itself retraces


def test_recompile_log_says_a_signature_was_evicted(monkeypatch, capsys):
    monkeypatch.setenv("ALPHA_JIT_LOG", "recompile")
    f = aj.compile(_double_and_bump, cache_size=1)
    w = np.ones(3, np.float32)
    for n in (1, 2, 1):
        f(np.ones(n, np.float32), w)
    err = capsys.readouterr().err
    assert "argument 0 changed from f32[1] to f32[2]" in err
    assert "evicted from the cache (cache_size=1)" in err


@pytest.mark.parametrize("bad", [{"cache_size": 0}, {"max_recompiles": -1},
                                 {"cache_size": 2.5}])
def test_bad_limits_are_rejected(bad):
    with pytest.raises(aj.AlphaJitError, match="positive int or None"):
        aj.compile(_double_and_bump, **bad)
