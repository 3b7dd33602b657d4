"""Sibling GEMM merge: Linears sharing an input become one GEMM before autodiff. Outputs and
every gradient against numpy and against the same step with the pass off, in f32 and bf16,
with unequal widths (grouped-query k/v) and a bias-less member; the GEMM counts it saves; and
the cases it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step

C, WIDTHS = 24, (24, 8, 8)
OFFSETS = (0, 24, 32)  # each output's slice of the target: distinct gradients


def _layers():
    nn.manual_seed(4)
    return [nn.Linear(C, w, bias=i != 2) for i, w in enumerate(WIDTHS)]


SCALE = nn.Parameter(np.linspace(0.5, 1.5, C).astype(np.float32))  # so dX is needed too


def _step(layers, precision):
    params = [p for lin in layers for p in (lin.weight, lin.bias) if p is not None] + [SCALE]

    @aj.compile(precision=precision)
    def step(x, t):
        h = x * SCALE
        outs = [lin(h) for lin in layers]
        loss = sum((o.astype("f32") * t[:, :, a:a + o.shape[-1]]).sum()
                   for o, a in zip(outs, OFFSETS, strict=True))
        loss.backward()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return (outs[0], loss, *grads)

    return step


def _run(precision, monkeypatch, off):
    if off:
        monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "gemm_merge")
    layers = _layers()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 11, C)).astype(np.float32)
    t = rng.standard_normal((3, 11, sum(WIDTHS))).astype(np.float32)
    step = _step(layers, precision)
    got = [v.numpy().astype(np.float32) for v in step(x, t)]
    plan = plan_step(step.trace(x, t).graph, get_device().caps, progress=False)
    monkeypatch.delenv("ALPHA_JIT_DISABLE_PASSES", raising=False)
    return got, plan, layers, x, t


def _gemms(plan, phase):
    return sum(1 for k in plan.kernels if k.family == "matmul" and k.phase.startswith(phase))


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_merged_projections_match_numpy_and_the_unmerged_step(monkeypatch, precision):
    got, plan, layers, x, t = _run(precision, monkeypatch, off=False)
    ref, plan_off, _, _, _ = _run(precision, monkeypatch, off=True)
    assert (_gemms(plan, "fwd"), _gemms(plan, "bwd")) == (1, 2)
    assert (_gemms(plan_off, "fwd"), _gemms(plan_off, "bwd")) == (3, 6)
    tol = 1e-5 if precision == "f32" else 2e-2
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol)
    if precision == "f32":
        x64 = (x * SCALE.numpy()).reshape(-1, C).astype(np.float64)
        lin0 = layers[0]
        y0 = x64 @ lin0.weight.numpy().T + lin0.bias.numpy()
        np.testing.assert_allclose(got[0].reshape(-1, 24), y0, rtol=1e-5, atol=1e-5)
        want = []
        for lin, w, a in zip(layers, WIDTHS, OFFSETS, strict=True):
            dy = t[..., a:a + w].reshape(-1, w).astype(np.float64)
            want.append(dy.T @ x64)
            if lin.bias is not None:
                want.append(dy.sum(axis=0))
        dh = sum(t[..., a:a + w].reshape(-1, w).astype(np.float64) @ lin.weight.numpy()
                 for lin, w, a in zip(layers, WIDTHS, OFFSETS, strict=True))
        want.append((dh * x.reshape(-1, C)).sum(axis=0))
        for a, w in zip(got[2:], want, strict=True):
            np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)


def test_left_alone_when_inputs_differ_or_one_feeds_the_other():
    rng = np.random.default_rng(6)
    x, z = (rng.standard_normal((7, C)).astype(np.float32) for _ in range(2))
    w1, w2 = (nn.Parameter(rng.standard_normal((C, C)).astype(np.float32) * 0.2)
              for _ in range(2))

    @aj.compile
    def f(x, z):
        a = x @ w1.T
        b = x @ (a.sum() * 0.0 + w2).T  # its weight depends on the sibling's result
        c = z @ w1.T  # another input
        loss = (a * a).sum() + b.sum() + c.sum()
        loss.backward()
        grad = w2.grad
        w1.grad = w2.grad = None
        return a, b, c, grad

    traced = f.trace(x, z)
    stage = [n for n, _ in traced.snapshots if n.startswith("pass gemm_merge")]
    assert stage == ["pass gemm_merge (forward): merged 0 GEMMs sharing an input into 0"]
    got = [v.numpy() for v in f(x, z)]
    a = x.astype(np.float64) @ w1.numpy().T
    want = (a, x @ w2.numpy().T, z @ w1.numpy().T, np.ones((7, C)).T @ x)
    for g_, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g_, w, rtol=1e-5, atol=1e-5)


def test_left_alone_when_a_bias_depends_on_a_sibling():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    w1, w2 = (nn.Parameter(rng.standard_normal((5, 8)).astype(np.float32)) for _ in range(2))
    b2 = nn.Parameter(rng.standard_normal((5,)).astype(np.float32))

    @aj.compile
    def f(x):
        y2 = x @ w2.T + b2
        y1 = x @ w1.T + y2.sum(0)  # its bias is computed from the sibling's result
        loss = (y1 * y1).sum()
        loss.backward()
        grad = w1.grad
        w1.grad = w2.grad = b2.grad = None
        return loss, grad

    loss, grad = (v.numpy() for v in f(x))
    xd = x.astype(np.float64)
    y2 = xd @ w2.numpy().T + b2.numpy()
    y1 = xd @ w1.numpy().T + y2.sum(0)
    assert float(loss) == pytest.approx((y1 * y1).sum(), rel=1e-5)
    np.testing.assert_allclose(grad, 2 * y1.T @ xd, rtol=1e-4, atol=1e-3)
