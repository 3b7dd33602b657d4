"""The compiled training step end to end on the default device (lavapipe in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.ir import interpreter
from alpha_jit.nn import functional as F
from alpha_jit.runtime import get_device
from tests.e2e.util import classifier_step

ROOT = Path(__file__).resolve().parents[2]


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 16, classes: int = 5):
    nn.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, classes))
    return model


def batch(rng, n=24, d_in=6, classes=5):
    return (rng.standard_normal((n, d_in)).astype(np.float32),
            rng.integers(0, classes, n).astype(np.int32))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_compiled_step_matches_reference_interpreter(opt_name):
    """20 steps: each compiled step equals the reference interpreter run of the same graph
    from the same state (loss, every parameter, every optimizer moment)."""
    rng = np.random.default_rng(0)
    model = mlp()
    if opt_name == "adamw":
        opt = nn.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    else:
        opt = nn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    step = classifier_step(model, opt)

    traced = None
    for it in range(20):
        x, y = batch(rng)
        if traced is None:
            before = {p.state_key: p.numpy() for p in model.parameters()}
        else:
            before = {k: h.numpy() for k, h in traced.state.items()}
        loss = step(x, y)
        traced = step.last_traced
        hp = {k: opt.hparams(opt.step_count)[h.name] for k, h in traced.hparams.items()}
        state0 = {k: before.get(k, np.zeros(h.shape, np.float32)) if it == 0 else before[k]
                  for k, h in traced.state.items()}
        outs, writes = interpreter.run(traced.graph, traced.leaves([x, y], state0, hp))
        assert rel(float(loss), outs[0]) < 1e-5, f"loss at step {it}"
        for key, want in writes.items():
            got = traced.state[key].numpy()
            assert rel(got, want) < 1e-5, f"{traced.state[key].state_name} at step {it}"
    assert step.traces == 1


def test_loss_falls_and_replay_records_once():
    rng = np.random.default_rng(1)
    model = mlp(1)
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2)

    step = classifier_step(model, opt)

    dev = get_device()
    x, y = batch(rng, 32)
    step(x, y)
    recordings = dev.stats["recordings"]
    losses = [float(step(x, y)) for _ in range(10)]
    assert dev.stats["recordings"] == recordings, "replay must not re-record"
    assert losses[-1] < losses[0]
    x2, y2 = batch(rng, 48)  # a new batch shape is a new signature: its recordings, made once
    step(x2, y2)             # (one per staging slot: a call overlaps the previous step)
    from alpha_jit.runtime.step_plan import STAGING_RING

    assert dev.stats["recordings"] == recordings + STAGING_RING
    assert step.traces == 2


def test_lr_change_does_not_retrace_and_takes_effect():
    rng = np.random.default_rng(2)
    model = mlp(2)
    opt = nn.optim.SGD(model.parameters(), lr=0.0)

    step = classifier_step(model, opt)

    x, y = batch(rng)
    w0 = model.layers[0].weight.numpy()
    step(x, y)
    np.testing.assert_array_equal(model.layers[0].weight.numpy(), w0)  # lr 0: no change
    opt.lr = 0.5
    step(x, y)
    assert np.abs(model.layers[0].weight.numpy() - w0).max() > 1e-4
    assert step.traces == 1


def test_grads_kept_without_zero_grad_accumulate():
    rng = np.random.default_rng(3)
    model = mlp(3)

    @aj.compile
    def grads_only(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    x, y = batch(rng)
    grads_only(x, y)
    g1 = model.layers[0].weight.grad.numpy()
    grads_only(x, y)  # PyTorch semantics: a second backward adds to .grad
    g2 = model.layers[0].weight.grad.numpy()
    grads_only(x, y)  # replayed (no retrace): adds again
    g3 = model.layers[0].weight.grad.numpy()
    assert np.abs(g1).max() > 0
    np.testing.assert_allclose(g2, 2 * g1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-5, atol=1e-7)
    assert grads_only.traces == 2  # once without a kept grad, once with


def test_values_are_handles_until_read():
    @aj.compile
    def f(x):
        return (x * 2.0).sum(), x + 1.0

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    s, y = f(x)
    s2, _ = f(x * 2)  # the first call's outputs survive the second submit
    assert float(s) == pytest.approx(30.0)
    assert float(s2) == pytest.approx(60.0)
    np.testing.assert_array_equal(y.numpy(), x + 1)


def test_train_mlp_example_prints_json():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mlp.py"), "--steps",
                          "200"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"first_loss", "last_loss", "steps", "device"}
    assert result["steps"] == 200
    assert result["last_loss"] < 0.5 * result["first_loss"]


def test_calls_in_flight_keep_their_own_outputs():
    """Calls alternate between staging slots: a call's inputs are written while the previous
    step may still run, and each returned handle reads its own call's outputs, whenever it is
    read (a slot's unread outputs are fetched before the slot is reused)."""
    import alpha_jit as aj

    @aj.compile
    def f(x):
        return x * 2.0, x.sum()

    xs = [np.full((3, 5), float(i), np.float32) for i in range(5)]
    handles = [f(x) for x in xs]  # none read yet: five calls, two slots
    for x, (doubled, total) in zip(xs, handles, strict=True):
        np.testing.assert_array_equal(doubled.numpy(), x * 2.0)
        assert float(total) == x.sum()
