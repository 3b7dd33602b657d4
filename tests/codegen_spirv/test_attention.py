"""Fused attention: the op and its kernels vs an independent float64 softmax attention.

Forward and all three gradients compiled on the device (lavapipe in CI) against a plain numpy
implementation (mask, softmax, matmul, GQA by repeating kv heads), for causal and full attention,
GQA, and T / head dims that are not multiples of the kernels' tiles; bf16 under autocast; NaN and
inf against the op's reference; every new module through spirv-val (lavapipe's caps and the
H200's); and the GPT step's plan: no [.., T, T] buffer left, fewer kernels.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import attention as K
from alpha_jit.errors import ShapeError
from alpha_jit.ir import interpreter
from alpha_jit.nn import functional as F
from alpha_jit.nn.module import Parameter
from tests.e2e.util import lm_step

H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


def naive(q, k, v, w, causal: bool, scale: float):
    """(out, loss gradients dq, dk, dv) of sum(attention(q, k, v) * w) in float64."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    rep = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    t = q.shape[2]
    s = q @ kk.swapaxes(-1, -2) * scale
    if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vv
    dp = w @ vv.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    b, h, _, hd = q.shape
    fold = lambda x: x.reshape(b, k.shape[1], rep, t, hd).sum(2)  # noqa: E731
    return out, ds @ kk * scale, fold(ds.swapaxes(-1, -2) @ q * scale), \
        fold(p.swapaxes(-1, -2) @ w)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "NaN in result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(b, h, hkv, t, hd, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return f(b, h, t, hd), f(b, hkv, t, hd), f(b, hkv, t, hd), f(b, h, t, hd)


def _grad_step(q, k, v, causal: bool, precision: str = "f32"):
    qp, kp, vp = Parameter(q.copy()), Parameter(k.copy()), Parameter(v.copy())

    @aj.compile(precision=precision)
    def step(w):
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal)
        (out * w).sum().backward()
        grads = (qp.grad * 1.0, kp.grad * 1.0, vp.grad * 1.0)
        for p in (qp, kp, vp):
            p.grad = None
        return (out, *grads)

    return step


# (B, H, Hkv, T, hd, causal): one tile, several tiles with ragged ends, GQA, MQA, odd hd
SHAPES = [(2, 4, 2, 13, 8, True), (1, 3, 1, 100, 24, True), (1, 2, 2, 77, 24, False),
          (1, 2, 1, 70, 5, True), (2, 2, 2, 9, 64, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_float64(shape):
    b, h, hkv, t, hd, causal = shape
    q, k, v, w = _inputs(b, h, hkv, t, hd)
    got = [x.numpy() for x in _grad_step(q, k, v, causal)(w)]
    want = naive(q, k, v, w, causal, 1.0 / math.sqrt(hd))
    for name, g, ref in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == ref.shape, name
        assert rel(g, ref) < 1e-5, name


def test_one_fused_kernel_each_way_and_no_score_buffer():
    q, k, v, w = _inputs(1, 4, 2, 40, 16)
    step = _grad_step(q, k, v, True)
    step(w)
    (exe,) = [e for es in step.cache.values() for e in es]
    fams = [b.spec.family for b in exe.binaries]
    assert fams.count("attention_fwd") == 1 and fams.count("attention_dq") == 1
    assert fams.count("attention_dkdv") == 1 and "matmul" not in fams
    low = step.last_traced.graph
    assert not [n for n in low.g.nodes if low.shape(n)[-2:] == (40, 40)]


def test_bf16_autocast_within_1e2():
    q, k, v, w = _inputs(2, 4, 2, 33, 16, seed=3)
    got = [x.numpy() for x in _grad_step(q, k, v, True, "bf16")(w)]
    want = naive(q, k, v, w, True, 0.25)
    assert got[0].dtype == np.float32  # f32 out, like a GEMM under the precision policy
    for name, g, ref in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert rel(g, ref) < 1e-2, name


def _nan_case(poison):
    q, k, v, _ = _inputs(1, 2, 1, 21, 8, seed=5)
    poison(q, k, v)

    @aj.compile
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    got = f(q, k, v).numpy()
    tr = f.last_traced
    (exe,) = [e for es in f.cache.values() for e in es]
    (want,), _ = interpreter.run(tr.graph, tr.leaves([q, k, v], {}, exe.last_hparams),
                                 np.float64)
    return got, want


@pytest.mark.parametrize("where", ["q_nan", "k_nan", "v_nan_late", "v_inf", "k_inf"])
def test_nan_and_inf_propagate_like_the_reference(where):
    def poison(q, k, v):
        if where == "q_nan":
            q[0, 1, 4, 2] = np.nan
        elif where == "k_nan":
            k[0, 0, 9, 0] = np.nan
        elif where == "v_nan_late":  # key 15: rows before it never see it
            v[0, 0, 15, 3] = np.nan
        elif where == "v_inf":
            v[0, 0, 2, 1] = np.inf
        else:
            k[0, 0, 3, :] = np.inf

    got, want = _nan_case(poison)
    assert (np.isnan(got) == np.isnan(want)).all()
    assert np.isnan(want).any() or np.isinf(want).any()
    fin = np.isfinite(want)
    assert (np.isinf(got) == np.isinf(want)).all()
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6)
    if where == "v_nan_late":
        assert not np.isnan(got[0, :, :15]).any() and np.isnan(got[0, :, 15:, 3]).all()


def _specs():
    """Specs of every family: f32 and bf16 operands, strided q, causal or not, partial outputs."""
    def entry(dt, shape, strides=None, off=0):
        if strides is None:
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        return (dt, off, strides)

    out = []
    for dt, causal, (b, h, hkv, t, hd) in (("f32", True, (2, 4, 2, 19, 8)),
                                           ("bf16", False, (1, 2, 1, 70, 40))):
        base = (("b", b), ("h", h), ("hkv", hkv), ("t", t), ("hd", hd), ("causal", causal),
                ("scale", 0.3))
        q = entry(dt, (b, h, t, hd), (t * h * hd, hd, h * hd, 1), 3)  # [B, T, H, hd] memory
        kv = entry(dt, (b, hkv, t, hd))
        o, do = entry("f32", (b, h, t, hd)), entry("f32", (b, h, t, hd))
        lse = entry("f32", (b, h, t))
        out.append(KernelSpec("attention_fwd", "fwd", (*base, ("q", q), ("k", kv), ("v", kv),
                                                      ("out_dtype", "f32"),
                                                      ("outputs", ("o", "lse")))))
        bwd = (*base, ("q", q), ("k", kv), ("v", kv), ("o", o), ("lse", lse), ("do", do))
        out.append(KernelSpec("attention_dq", "dq", bwd))
        out.append(KernelSpec("attention_dkdv", "dkdv", (*bwd, ("outputs", ("dk", "dv")))))
        out.append(KernelSpec("attention_dkdv", "dv", (*bwd, ("outputs", ("dv",)))))
    return out


def test_every_module_validates():
    from alpha_jit.runtime import caps as caps_mod
    from alpha_jit.runtime.device import get_device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h200 = caps_mod.load(H200)
    for caps in (get_device().caps, h200):
        for spec in _specs():
            gen = getattr(K, K.FAMILIES[spec.family])
            binary = gen(spec, caps)
            tools.validate(binary.words, spec.name, target_env=caps.spirv_target_env())
            assert binary.shared_bytes <= caps.max_shared_memory


def test_cpu_modules_stay_small():
    """llvmpipe compiles a module at its first dispatch in time that grows faster than its
    size: with 16-key tiles the first GPT step on 2 cores took 100 s (10 s with 1-key tiles).
    CPU devices get modules a few times smaller than a GPU's."""
    import dataclasses

    from alpha_jit.runtime.device import get_device

    cpu = dataclasses.replace(get_device().caps, device_type="cpu")
    gpu = dataclasses.replace(get_device().caps, device_type="discrete")
    for spec in _specs():
        gen = getattr(K, K.FAMILIES[spec.family])
        small, big = len(gen(spec, cpu).words) // 4, len(gen(spec, gpu).words) // 4  # words
        assert small <= 25_000 and small * 3 <= big * 2, (spec.family, small, big)


def test_shape_errors_name_op_shapes_and_line():
    @aj.compile
    def f(q, k):
        return F.scaled_dot_product_attention(q, k, k, is_causal=True)

    q = np.ones((1, 3, 4, 8), np.float32)
    with pytest.raises(ShapeError, match=r"(?s)attention.*multiple of kv heads 2.*test_attention"):
        f(q, np.ones((1, 2, 4, 8), np.float32))


@pytest.mark.parametrize("b,h,hkv,t,hd,causal", [(2, 2, 2, 13, 8, True), (1, 4, 2, 9, 4, False)])
def test_dropout_in_the_fused_kernels_draws_the_unfused_mask(b, h, hkv, t, hd, causal):
    """The fused op with dropout (forward and every gradient) against the unfused math with
    nn.functional.dropout, compiled the same way: the same counter-based mask, so the same
    values, and about p of the probabilities dropped."""
    from alpha_jit import nn

    rng = np.random.default_rng(t)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               ((b, h, t, hd), (b, hkv, t, hd), (b, hkv, t, hd)))
    w = rng.standard_normal((b, h, t, hd)).astype(np.float32)

    from alpha_jit.nn.random import manual_seed as dropout_seed

    def run(fused):
        dropout_seed(11)  # the same seed and call counter: the same draws
        ps = [nn.Parameter(a) for a in (q, k, v)]

        @aj.compile
        def f(w):
            qq, kk, vv = ps
            if fused:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal,
                                                   dropout_p=0.3)
            else:
                if hkv != h:
                    rep = h // hkv
                    kk, vv = (z.reshape(b, hkv, 1, t, hd).broadcast_to((b, hkv, rep, t, hd))
                              .reshape(b, h, t, hd) for z in (kk, vv))
                o = F._attention_unfused(qq, kk, vv, causal, 1.0 / np.sqrt(hd), 0.3)
            (o * w).sum().backward()
            grads = [p.grad for p in ps]
            for p in ps:
                p.grad = None
            return (o, *grads)

        out = [x.numpy() for x in f(w)]
        return out, f.last_traced.graph

    got, g_fused = run(True)
    want, g_plain = run(False)
    assert g_fused.nodes_with_op("attention") and not g_plain.nodes_with_op("attention")
    for a, r in zip(got, want, strict=True):
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-5)
    # dropout happened: the no-dropout output differs
    plain = aj.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                      is_causal=causal))
    assert np.abs(plain(q, k, v).numpy() - got[0]).max() > 1e-3


def _gpt_plan(monkeypatch, fused: bool):
    from alpha_jit.runtime.step_plan import plan_step

    if not fused:  # the math the op replaced, for the before/after comparison
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, is_causal, scale, dropout_p:
                            F._attention_unfused(q, k, v, is_causal, scale, dropout_p))
    nn.manual_seed(0)
    t = 20  # no other buffer of the step ends in (t, t)
    model = nn.GPT(nn.GPTConfig(vocab_size=48, block_size=t, n_layer=2, n_head=4, n_embd=32,
                                n_kv_head=2))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3)

    step = lm_step(model, opt, "bf16")

    x = np.zeros((2, t), np.int32) + np.arange(t, dtype=np.int32)
    from alpha_jit.runtime.device import get_device

    plan = plan_step(step.trace(x, x).graph, get_device().caps, progress=False)
    monkeypatch.undo()
    return plan, t


def test_gpt_step_has_no_score_buffer_and_fewer_kernels(monkeypatch):
    fused, t = _gpt_plan(monkeypatch, True)
    unfused, _ = _gpt_plan(monkeypatch, False)
    tt = lambda plan: [b for b in plan.lowered.buffers.values()  # noqa: E731
                       if tuple(b.shape[-2:]) == (t, t)]
    assert tt(unfused) and not tt(fused)
    assert len(fused.kernels) < len(unfused.kernels)
    temps = lambda plan: sum(b.nbytes for b in plan.lowered.buffers.values()  # noqa: E731
                             if b.kind == "temp")
    assert temps(fused) < temps(unfused)


@pytest.mark.parametrize("causal", [True, False])
def test_grid_orders_and_split_grids_compute_what_one_dispatch_does(run_kernel, monkeypatch,
                                                                    causal):
    """Every block order (`_grid_order`), on grids split over every axis by tiny
    workgroup-count limits, gives the same results, bit for bit, as the default order in one
    dispatch: the push-constant bases and the block numbering cover each (block, head, batch)
    exactly once. The default's results are checked against float64 by
    `test_forward_and_gradients_match_float64`."""
    import dataclasses

    from alpha_jit.runtime.device import get_device

    b, h, t, hd = 3, 2, 70, 8
    caps = get_device().caps
    split = dataclasses.replace(caps, max_workgroup_count=(2, 1, 2))
    rng = np.random.default_rng(7)
    arr = {n: rng.standard_normal((b, h, t, hd)).astype(np.float32)
           for n in ("q", "k", "v", "o", "do")}
    arr["lse"] = rng.standard_normal((b, h, t)).astype(np.float32) + 3.0

    def entry(n):
        return ("f32", 0, tuple(s // 4 for s in arr[n].strides))

    base = (("b", b), ("h", h), ("hkv", h), ("t", t), ("hd", hd), ("causal", causal),
            ("scale", 0.35), *((n, entry(n)) for n in ("q", "k", "v")))
    bwd = (*base, *((n, entry(n)) for n in ("o", "lse", "do")))
    four, three = ((b, h, t, hd), np.float32), ((b, h, t), np.float32)
    cases = [(KernelSpec("attention_fwd", "fwd", (*base, ("out_dtype", "f32"),
                                                  ("outputs", ("o", "lse")))),
              ("q", "k", "v"), [four, three]),
             (KernelSpec("attention_dq", "dq", bwd), ("q", "k", "v", "o", "lse", "do"), [four]),
             (KernelSpec("attention_dkdv", "dkdv", (*bwd, ("outputs", ("dk", "dv")))),
              ("q", "k", "v", "o", "lse", "do"), [four, four])]
    default = K._grid_order
    for spec, names, outs in cases:
        gen = getattr(K, K.FAMILIES[spec.family])
        one = gen(spec, caps)
        assert len(one.dispatches) == 1, spec.family
        want = run_kernel(one, [arr[n] for n in names], outs, fill=0x7FC00000)
        assert all(np.isfinite(w).all() for w in want), spec.family  # every element written
        for order in ("fastest", "slowest", "slowest reversed"):
            monkeypatch.setattr(K, "_grid_order", lambda family, p, order=order: order)
            many = gen(spec, split)
            monkeypatch.setattr(K, "_grid_order", default)
            assert len(many.dispatches) > 2, (spec.family, order)
            got = run_kernel(many, [arr[n] for n in names], outs, fill=0x7FC00000)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w, err_msg=f"{spec.family} {order}")


def test_causal_query_blocks_start_from_the_longest_walk():
    """The chosen orders: a causal forward and dq put their blocks on the slowest axis, the
    last query block (the longest walk) first; dk/dv and non-causal grids keep blocks on x."""
    for fam in ("attention_fwd", "attention_dq"):
        assert K._grid_order(fam, {"causal": True}) == "slowest reversed"
        assert K._grid_order(fam, {"causal": False}) == "fastest"
    assert K._grid_order("attention_dkdv", {"causal": True}) == "fastest"
