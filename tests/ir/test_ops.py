"""Every op: the compiled kernel vs the numpy reference, and autodiff vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import dtypes
from alpha_jit.codegen_spirv import tools
from alpha_jit.compile import trace_step
from alpha_jit.ir import autodiff, interpreter, trace
from alpha_jit.ir.ops import registry
from tests.ir.cases import CASES, Case


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "NaN in result"
    denom = np.linalg.norm(want.ravel())
    return float(np.linalg.norm((got - want).ravel()) / (denom if denom > 0 else 1.0))


def ops_covered() -> set[str]:
    seen: set[str] = set()
    rng = np.random.default_rng(0)
    for case in CASES:
        t = trace_step(case.fn, tuple(case.inputs(rng)))
        seen |= {t.graph.op(n) for n in t.graph.g.nodes}
    return seen


def test_every_op_has_a_case():
    missing = set(registry.all_ops()) - ops_covered() - {"state", "hparam", "gelu_grad"}
    assert not missing, f"ops without a test case: {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_matches_reference(case: Case):
    rng = np.random.default_rng(1)
    args = case.inputs(rng)
    step = aj.compile(case.fn)
    got = step(*args)
    traced = step.last_traced
    (exe,) = [e for es in step.cache.values() for e in es]
    want, _ = interpreter.run(traced.graph, traced.leaves(args, {}, exe.last_hparams),
                              np.float64)
    got_arr = got.numpy()
    assert got_arr.shape == want[0].shape
    assert rel_l2(got_arr, want[0]) < 1e-5
    for b in exe.binaries:  # every emitted module is valid SPIR-V for Vulkan
        tools.validate(b.words, b.name)


def _grad_graph(case: Case, args: list[np.ndarray], weights: np.ndarray):
    """Trace loss = sum(op(args) * weights) and its gradients wrt the float inputs."""
    ctx = trace.TraceContext()
    with trace.tracing(ctx):
        ins = [trace.leaf("input", {"index": i, "name": f"arg{i}"}, a.shape,
                          dtypes.from_numpy(a)) for i, a in enumerate(args)]
        w = trace.leaf("input", {"index": len(args), "name": "w"}, weights.shape,
                       dtypes.float32)
        out = case.fn(*ins)
        loss = (out * w).sum()
        wrt = [t.node for t in ins if t.dtype.is_float]
        grads = autodiff.grad(loss, wrt)
    g = ctx.graph
    g.outputs = [loss.node] + [grads[n].node for n in wrt if n in grads]
    g.state_values = {k: h.numpy() for k, h in ctx.state.items()}  # captured constants
    has_grad = [n in grads for n in wrt]
    return g, [i for i, t in enumerate(ins) if t.dtype.is_float], has_grad


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=lambda c: c.name)
def test_gradient_matches_finite_differences(case: Case):
    rng = np.random.default_rng(2)
    args = [a.astype(np.float64) if a.dtype == np.float32 else a for a in case.inputs(rng)]
    out_shape = trace_step(case.fn, tuple(a.astype(np.float32) if a.dtype == np.float64 else a
                                          for a in args)).graph
    oshape = out_shape.shape(out_shape.outputs[0])
    weights = rng.standard_normal(oshape)
    g, float_idx, has_grad = _grad_graph(case, [a.astype(np.float32) if a.dtype == np.float64 else a
                                      for a in args], weights.astype(np.float32))
    inputs = {n: None for n in g.g.nodes if g.op(n) == "input"}

    def run(vals: list[np.ndarray]) -> list[np.ndarray]:
        feed = {n: np.asarray(1, g.dtype(n).np_storage) for n in g.g.nodes
                if g.op(n) == "hparam"}  # e.g. the RNG counter: any fixed value
        feed.update({n: g.state_values[g.attrs(n)["key"]] for n in g.g.nodes
                     if g.op(n) == "state"})
        for n in inputs:
            i = g.attrs(n)["index"]
            feed[n] = vals[i] if i < len(vals) else weights
        outs, _ = interpreter.run(g, feed, np.float64)
        return outs

    outs = run(args)
    eps = 1e-6
    out_pos = iter(range(1, len(outs)))
    for k, i in enumerate(float_idx):
        # no gradient node means autodiff proved it zero (e.g. through a comparison)
        analytic = outs[next(out_pos)] if has_grad[k] else np.zeros_like(args[i])
        numeric = np.zeros_like(args[i])
        flat = numeric.reshape(-1)
        # a random sample of coordinates keeps big inputs cheap; the rest are not compared
        picks = rng.choice(args[i].size, size=min(args[i].size, 24), replace=False)
        for j in picks:
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[i].reshape(-1)[j] += eps
            minus[i].reshape(-1)[j] -= eps
            flat[j] = (run(plus)[0] - run(minus)[0]) / (2 * eps)
        analytic = analytic.reshape(-1)[picks]
        numeric = flat[picks]
        if np.abs(numeric).max() == 0:
            assert np.abs(analytic).max() == 0
        else:
            assert rel_l2(analytic, numeric) < 1e-5, f"input {i}"
