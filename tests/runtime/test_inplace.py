"""In-place memory: a one-thread-per-element kernel whose output may take the memory of an input
it reads for the last time (the cross-entropy gradient over the logits, a residual add). Values
against numpy, the sharing asserted on the plan, and the cases where it must not happen."""

from __future__ import annotations

import numpy as np

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as F
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step


def _plan(fn, args):
    return plan_step(fn.trace(*args).graph, get_device().caps, progress=False)


def _shared(plan):
    """(read, write) pairs of temporaries given the same memory."""
    mem = plan.memory
    out = []
    for k in plan.lowered.kernels:
        for r, w in k.inplace:
            if r in mem.offsets and w in mem.offsets and mem.offsets[r] == mem.offsets[w] \
                    and mem.pool_of[r] == mem.pool_of[w]:
                out.append((k.spec.family, r, w))
    return out


def test_last_read_gives_its_memory_to_the_output():
    x = np.random.default_rng(0).standard_normal((33, 70)).astype(np.float32)

    @aj.compile
    def f(x):
        a = x * 2.0 + 1.0
        return a - a.sum(axis=-1, keepdims=True)  # the reduction ends a group; a's last read

    got = f(x).numpy()
    a = x.astype(np.float64) * 2 + 1
    np.testing.assert_allclose(got, a - a.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-4)
    assert any(fam == "elementwise" for fam, _, _ in _shared(_plan(f, (x,))))


def test_no_sharing_for_a_transposed_or_repeated_read():
    x = np.random.default_rng(1).standard_normal((40, 40)).astype(np.float32)

    @aj.compile
    def f(x):
        a = x * 2.0 + 1.0
        s = a.sum(axis=-1, keepdims=True)
        return a.T - s  # element (i, j) of the output reads element (j, i) of a

    got = f(x).numpy()
    a = x.astype(np.float64) * 2 + 1
    np.testing.assert_allclose(got, a.T - a.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-4)
    assert not _shared(_plan(f, (x,)))


def test_cross_entropy_gradient_takes_the_logits_memory():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 24)).astype(np.float32)
    y = rng.integers(0, 53, 37).astype(np.int32)
    lin = nn.Linear(24, 53, bias=False)

    @aj.compile
    def step(x, y):
        loss = F.cross_entropy(lin(x), y)
        loss.backward()
        grad = lin.weight.grad
        lin.weight.grad = None
        return loss, grad

    w = lin.weight.numpy().astype(np.float64)
    z = x.astype(np.float64) @ w.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want_loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    p[np.arange(len(y)), y] -= 1
    want_grad = (p / len(y)).T @ x
    loss, grad = step(x, y)
    assert abs(float(loss) - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert any(fam == "ce_bwd" for fam, _, _ in _shared(_plan(step, (x, y))))
