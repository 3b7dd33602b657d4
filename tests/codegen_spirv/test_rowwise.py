"""Fused row kernels (LayerNorm / RMSNorm / cross-entropy, forward and backward) on lavapipe.

Each op compiled vs the reference interpreter in float64 on random data (odd row lengths that
are not multiples of the workgroup or subgroup, rows longer than the workgroup), the gradients
too, bf16 storage and the bf16 precision policy, ignore_index, NaN/inf rows exactly as the numpy
reference, and the GPT step: fewer kernels and no [N, V] one-hot. Finite-difference checks of
the VJPs run through the op table (tests/ir/cases.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.ir import autodiff, interpreter, trace
from alpha_jit.nn import functional as F
from alpha_jit.runtime import caps as caps_mod
from alpha_jit.runtime.step_plan import plan_step
from tests.e2e.util import lm_step

rng = np.random.default_rng(7)
H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


def _run(fn, args, precision="f32"):
    """(compiled outputs, float64 reference outputs); spirv-val on every module."""
    step = aj.compile(fn, precision=precision)
    got = step(*args)
    got = [g.numpy() for g in (got if isinstance(got, tuple | list) else [got])]
    tr = step.last_traced
    (exe,) = [e for es in step.cache.values() for e in es]
    want, _ = interpreter.run(tr.graph, tr.leaves(list(args), {}, exe.last_hparams), np.float64)
    for b in exe.binaries:
        tools.validate(b.words, b.name)
    return got, want, exe


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "NaN in result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _with_grads(op):
    """loss = sum(op(*ins) * weights) and its gradients wrt every float input."""
    def f(*a):
        *ins, wt = a
        loss = (op(*ins) * wt).sum()
        floats = [t for t in ins if t.dtype.is_float]
        gs = autodiff.grad(loss, [t.node for t in floats])
        return (loss, *[gs[t.node] for t in floats])

    return f


def ln(x, w, b):
    return trace.apply("layer_norm", [x, w, b], {"eps": 1e-5})


def ln_nobias(x, w):
    return trace.apply("layer_norm", [x, w], {"eps": 1e-5})


def rms(x, w):
    return trace.apply("rms_norm", [x, w], {"eps": 1e-6})


def _f32(*shape, scale=2.0, shift=0.5):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 7, 77, 1001])
@pytest.mark.parametrize("op", [ln, ln_nobias, rms], ids=lambda f: f.__name__)
def test_norm_forward_and_grads_match_reference(op, dim):
    x = _f32(3, 5, dim)
    params = [_f32(dim) for _ in range(2 if op is ln else 1)]
    got, want, _ = _run(_with_grads(op), [x, *params, _f32(3, 5, dim)])
    for g, w in zip(got, want, strict=True):
        # dim 1: a LayerNorm's output and dx are 0 up to rounding; compare absolutely there
        assert _rel(g, w) < 1e-5 or np.abs(g - w).max() < 1e-5


def _row_lanes() -> int:
    """The lanes of the subgroup that owns a short row on this device (lavapipe: 8)."""
    from alpha_jit.codegen_spirv.kernels.rowwise import row_subgroup
    from alpha_jit.runtime.device import get_device

    lanes = row_subgroup(64, get_device().caps)
    if lanes is None:
        pytest.skip("rows are not owned by subgroups on this device")
    return lanes


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("op", [ln, ln_nobias, rms], ids=lambda f: f.__name__)
def test_norm_rows_in_registers_match_reference(op, groups, precision):
    """Rows that are whole groups of 8 per lane of the row's subgroup (1, 3 or 4 a lane; on
    lavapipe's 8 lanes rows of 64, 192, 256) run with the row in registers, forward and dx,
    through the residual gradient's add and a bf16 output under the bf16 policy; against
    float64 on random data with NaN and inf in one row each (kept to their row)."""
    dim = groups * 8 * _row_lanes()
    x = _f32(3, 7, dim)
    x[0, 1, 5], x[1, 2, dim - 1] = np.nan, np.inf
    params = [_f32(dim) for _ in range(2 if op is ln else 1)]
    r = _f32(3, 7, dim)

    def f(x, *ws_wt):
        *ws, wt = ws_wt
        h = op(x.astype(precision), *ws) if precision == "bf16" else op(x, *ws)
        y = h.astype("f32") + x * 0.5  # a residual: dx takes the add as an epilogue
        loss = (y * wt).sum()
        gs = autodiff.grad(loss, [x.node, *[w.node for w in ws]])
        return (h, gs[x.node], *[gs[w.node] for w in ws])

    got, want, exe = _run(f, [x, *params, r], precision=precision)
    assert sum("row in registers" in b.variant for b in exe.binaries) == 2, \
        [b.variant for b in exe.binaries]
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        ok = np.isfinite(w)
        rtol = 2e-2 if precision == "bf16" else 1e-4
        np.testing.assert_allclose(g[ok], w[ok], rtol=rtol, atol=rtol)
    h = np.asarray(got[0], np.float64)
    assert np.isnan(h[0, 1]).all() and np.isfinite(h[2]).all()


def test_norm_one_kernel_per_direction():
    x, w, b = _f32(9, 33), _f32(33), _f32(33)
    step = aj.compile(_with_grads(ln))
    plan = plan_step(step.trace(x, w, b, _f32(9, 33)).graph, _h200(), progress=False)
    fams = [k.family for k in plan.kernels]
    assert fams.count("norm_fwd") == 1 and fams.count("norm_dx") == 1
    assert fams.count("norm_dwb") == 1  # dw and db: one column reduction
    assert "reduction" not in fams[:fams.index("norm_fwd") + 1]


@pytest.mark.parametrize("classes", [1, 10, 301, 3000, 5000])
@pytest.mark.parametrize("ignore", [None, 2])
def test_cross_entropy_matches_reference(classes, ignore):
    # 3000 and 5000: rows read as 16-byte vectors (f32 x 4), by a subgroup or a workgroup
    z = _f32(17, classes, scale=4.0)
    y = rng.integers(0, classes, 17).astype(np.int32)
    y[::5] = 2 if ignore is not None else 0

    def f(z, y, wt):
        return _with_grads(lambda z, y: F.cross_entropy(z, y, ignore_index=ignore))(z, y, wt)

    got, want, _ = _run(f, [z, y, np.array(1.3, np.float32)])
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5


def test_cross_entropy_all_ignored_is_zero_loss_and_grad():
    z, y = _f32(5, 11), np.full(5, -100, np.int32)
    got, want, _ = _run(_with_grads(lambda z, y: F.cross_entropy(z, y, ignore_index=-100)),
                        [z, y, np.array(1.0, np.float32)])
    assert got[0] == 0.0 and not np.any(got[1]) and not np.any(want[1])


def test_cross_entropy_bad_label_is_nan_not_a_quiet_value():
    # a label computed in the step (not range-checked on the host) outside [0, C): NaN loss
    z, y = _f32(4, 6), np.array([0, 1, 2, 3], np.int32)
    got, want, _ = _run(lambda z, y: trace.apply("cross_entropy_rows", [z, y * 3],
                                                 {"ignore_index": None}), [z, y])
    assert np.isnan(got[0][2:, 0]).all() and np.isnan(want[0][2:, 0]).all()
    assert np.isfinite(got[0][:2]).all()


def test_nan_and_inf_rows_behave_as_the_reference():
    x = _f32(6, 40)
    x[1, 3], x[2, 7], x[3, :] = np.nan, np.inf, -np.inf
    z = _f32(7, 40)
    z[1, 3], z[2, 7], z[3, 5], z[4, :] = np.nan, np.inf, -np.inf, -np.inf
    y = np.array([0, 1, 2, 3, 4, 5, 6], np.int32)
    y[3] = 6  # a -inf elsewhere in the row: the loss stays finite (no 0 * inf from a one-hot)
    w = _f32(40)

    def f(x, w, z, y, g):
        a = _with_grads(lambda x, w: rms(x, w))(x, w, g)
        r = trace.apply("cross_entropy_rows", [z, y], {"ignore_index": 5})
        dz = autodiff.grad((r[:, 0] * 1.5).sum(), [z.node])[z.node]
        return (ln_nobias(x, w), a[1], r, dz)

    got, want, _ = _run(f, [x, w, z, y, _f32(6, 40)])
    for g, wv in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(wv))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(wv))
        ok = np.isfinite(wv)
        assert np.allclose(g[ok], wv[ok], rtol=1e-4, atol=1e-5)
    assert np.isfinite(got[2][3]).all() and np.isnan(got[2][1, 0])


@pytest.mark.parametrize("classes", [40, 4104, 5000])
def test_bf16_cross_entropy_rows_as_vectors_keep_nan_and_inf(classes):
    """bf16 logits whose rows are read 8 per 16-byte load (classes a multiple of 8; 5000 by a
    workgroup per row): the loss, lse and gradient match the reference on random data, and a
    NaN, an inf or a row of -inf anywhere in a vector behaves as it does there."""
    z = _f32(9, classes, scale=4.0)
    z[1, 3], z[2, classes - 1], z[3, 5], z[4, :] = np.nan, np.inf, -np.inf, -np.inf
    y = rng.integers(0, classes, 9).astype(np.int32)

    def f(z, y):
        zb = z.astype("bf16")
        r = trace.apply("cross_entropy_rows", [zb, y], {"ignore_index": None})
        dz = autodiff.grad((r[:, 0] * 1.5).sum(), [zb.node])[zb.node]
        return r, dz

    got, want, _ = _run(f, [z, y], precision="bf16")
    for g, wv in zip(got, want, strict=True):
        g, wv = np.asarray(g, np.float64), np.asarray(wv, np.float64)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(wv))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(wv))
        ok = np.isfinite(wv)
        assert np.allclose(g[ok], wv[ok], rtol=1e-2, atol=1e-3)
    rows = np.asarray(got[0], np.float64)
    assert np.isnan(rows[1]).all() and np.isinf(rows[2, 1]) and np.isfinite(rows[5:]).all()


@pytest.mark.parametrize("classes", [37, 3000, 5000])
def test_cross_entropy_lse_in_one_pass_keeps_far_shifted_rows(classes):
    """The forward's one-pass logsumexp (running max and rescaled sums per thread): rows
    shifted by +-1000 (exp of the raw values over- or underflows), a row whose maximum is its
    last element (every thread rescales), a row whose maximum is its first, and a row with one
    huge value among -inf; the loss and lse match float64."""
    z = _f32(8, classes, scale=3.0)
    z[1] += 1000.0
    z[2] -= 1000.0
    z[3] = np.linspace(-50.0, 50.0, classes, dtype=np.float32)
    z[4] = np.linspace(50.0, -50.0, classes, dtype=np.float32)
    z[5] = -np.inf
    z[5, classes // 2] = 3.0e4
    y = rng.integers(0, classes, 8).astype(np.int32)
    y[5] = classes // 2
    got, want, _ = _run(lambda z, y: trace.apply("cross_entropy_rows", [z, y],
                                                 {"ignore_index": None}), [z, y])
    assert np.isfinite(got[0]).all()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-4)


def test_cross_entropy_reads_vectors_only_where_aligned():
    """ce_fwd's 16-byte loads: 8 bf16 or 4 f32 per load where the row length and the
    element offset are multiples of that, else one element per load (f16, odd offsets)."""
    from alpha_jit.codegen_spirv.kernels.cross_entropy import generate_ce_fwd

    def variant(classes, dt, off):
        spec = KernelSpec("ce_fwd", "ce", (("rows", 4), ("classes", classes),
                                           ("ignore", (False, 0)), ("z", (dt, off)), ("y", 0)))
        return generate_ce_fwd(spec, _h200()).notes["variant"]

    assert variant(50304, "bf16", 0).endswith("8 per load")
    assert variant(5000, "f32", 8).endswith("4 per load")
    assert variant(1000, "bf16", 16).endswith("8 per load")  # a subgroup per row too
    for classes, dt, off in ((50304, "f16", 0), (50304, "bf16", 3), (5002, "f32", 0)):
        assert "per load" not in variant(classes, dt, off)


def test_bf16_storage_and_precision_policy():
    x, w, b = _f32(4, 6, 50), _f32(50), _f32(50)
    z, y = _f32(24, 37), rng.integers(0, 37, 24).astype(np.int32)

    def f(x, w, b, z, y):
        h = ln(x.astype("bf16"), w, b)  # 16-bit input, f32 math, bf16 output
        loss = F.cross_entropy(z.astype("bf16"), y) + (h.astype("f32") ** 2.0).mean()
        gs = autodiff.grad(loss.astype("f32"), [x.node, w.node, z.node])
        return (loss, h, *[gs[n] for n in (x.node, w.node, z.node)])

    got, want, _ = _run(f, [x, w, b, z, y], precision="bf16")
    for g, wv in zip(got, want, strict=True):
        assert _rel(g, wv) < 1e-2


def _h200():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return caps_mod.load(H200)


def test_gpt_step_has_fused_norms_and_no_one_hot():
    nn.manual_seed(0)
    cfg = nn.GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = nn.GPT(cfg)
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3)

    step = lm_step(model, opt, "bf16")

    x = rng.integers(0, 97, (3, 16)).astype(np.int32)
    traced = step.trace(x, x)
    g = traced.graph
    nv = (3 * 16, 97)
    assert not [n for n in g.g.nodes if g.op(n) in ("eq", "iota") and g.shape(n) == nv]
    plan = plan_step(g, _h200(), progress=False)
    fams = [k.family for k in plan.kernels]
    norms = 2 * cfg.n_layer + 1
    for fam in ("norm_fwd", "norm_dx", "norm_dwb"):
        assert fams.count(fam) == norms, fam
    # the backward's statistics come from the forward kernel (no norm_stats kernel)
    assert fams.count("norm_stats") == 0
    assert all(dict(k.spec.params).get("stats_out") and len(k.writes) == 2
               for k in plan.lowered.kernels if k.spec.family == "norm_fwd")
    assert fams.count("ce_fwd") == 1 and fams.count("ce_bwd") == 1
    big = [b for b in plan.lowered.buffers.values() if b.shape == nv and b.kind == "temp"]
    assert len(big) <= 3, [(b.shape, b.dtype) for b in big]  # logits, dz, its bf16 copy


@pytest.mark.parametrize("chunks,bias,unroll", [(1, True, 1), (3, True, 1), (4, False, 1),
                                               (1, True, 4), (6, True, 3)])
def test_norm_dwb_row_chunks_match_numpy(chunks, bias, unroll):
    """dw/db with the rows split in chunks (what a GPU gets when the column strips are few):
    partial sums in the chunk binding, then added in chunk order; odd rows and columns; whole
    unrolled trips and a ragged tail of rows."""
    from alpha_jit.codegen_spirv.kernel import KernelSpec
    from alpha_jit.codegen_spirv.kernels.rowwise import generate_norm_dwb
    from alpha_jit.runtime.testing import run_kernel

    rows, dim = 1001, 70
    rng = np.random.default_rng(3)
    x, g = (rng.standard_normal((rows, dim)).astype(np.float32) for _ in range(2))
    stats = np.stack([x.mean(1), 1.0 / np.sqrt(x.var(1) + 1e-5)], 1).astype(np.float32)
    params = (("rows", rows), ("dim", dim), ("rms", False), ("bias", bias), ("x", ("f32", 0)),
              ("g", ("f32", 0)), ("stats", 0))
    if chunks > 1:
        params += (("chunks", chunks),)
    params += (("unroll", unroll),)  # rows in flight per thread (a GPU's 4)
    b = generate_norm_dwb(KernelSpec("norm_dwb", f"dwb_{chunks}_{bias}_{unroll}", params))
    tools.validate(b.words, b.name, "vulkan1.2")
    n_out = 2 if bias else 1
    outs = [((n_out, dim), np.float32)] + ([((chunks, n_out, dim), np.float32)]
                                          if chunks > 1 else [])
    got = run_kernel(b, [x, g, stats], outs)[0]
    xh = (x.astype(np.float64) - stats[:, :1]) * stats[:, 1:]
    want = [(g * xh).sum(0), g.astype(np.float64).sum(0)][:n_out]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-3)
    assert len(b.dispatches) == (2 if chunks > 1 else 1)


@pytest.mark.parametrize("op", [ln, ln_nobias, rms], ids=lambda f: f.__name__)
def test_norm_weight_grads_in_row_chunks_inside_a_step(op, monkeypatch):
    """The row-chunked dw/db a GPU gets (here forced on lavapipe) inside compiled steps: the
    chunks' workspace is a temporary of the plan, and the grads match the reference."""
    from alpha_jit.codegen_spirv.kernels import rowwise

    monkeypatch.setattr(rowwise, "dwb_chunks", lambda rows, dim, caps: 5)
    x = _f32(7, 43, 77)
    params = [_f32(77) for _ in range(2 if op is ln else 1)]
    got, want, exe = _run(_with_grads(op), [x, *params, _f32(7, 43, 77)])
    assert any("row chunks" in b.variant for b in exe.binaries)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("dim", [50, "regs", 4100])
def test_norm_rows_by_subgroup_or_workgroup_on_a_strided_grid(dim):
    """LayerNorm forward with rows owned by a subgroup (dim <= SUBGROUP_ROW_MAX, several rows
    per workgroup) or by a workgroup (longer rows), and dx (a workgroup per row, or the row
    in registers where it fits), on a grid of
    two workgroups that strides over 37 rows (a ragged last trip), against float64 numpy; on
    the H200 the forward gets one 32-lane subgroup per 768-wide row, and the modules
    validate."""
    import dataclasses

    from alpha_jit.codegen_spirv.kernel import KernelSpec
    from alpha_jit.codegen_spirv.kernels import rowwise
    from alpha_jit.runtime.device import get_device
    from alpha_jit.runtime.testing import run_kernel

    rows = 37
    regs = dim == "regs"  # two groups of 8 a lane: the row in registers
    dim = 2 * 8 * _row_lanes() if regs else dim
    caps = dataclasses.replace(get_device().caps, max_workgroup_count=(2, 65535, 65535))
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((rows, dim)) * 2 + 0.5).astype(np.float32)
    w, bias, g = _f32(dim), _f32(dim), _f32(rows, dim)
    base = (("rows", rows), ("dim", dim), ("rms", False), ("eps", 1e-5), ("x", ("f32", 0)),
            ("w", ("f32", 0)))
    fwd = KernelSpec("norm_fwd", f"ln_{dim}", (*base, ("b", ("f32", 0)),
                                               ("out_dtype", "f32"), ("stats_out", True)))
    b = rowwise.generate_norm_fwd(fwd, caps)
    owner = "subgroup per row" if dim <= rowwise.SUBGROUP_ROW_MAX else "workgroup per row"
    assert b.variant.startswith(owner) and b.dispatches[0].groups[0] == 2, b.variant
    out, stats = run_kernel(b, [x, w, bias], [((rows, dim), np.float32), ((rows, 2), np.float32)],
                            fill=0x7FC00000)
    x64 = x.astype(np.float64)
    mean, rstd = x64.mean(1, keepdims=True), 1 / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    xh = (x64 - mean) * rstd
    np.testing.assert_allclose(out, xh * w + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats, np.concatenate([mean, rstd], 1), rtol=1e-5, atol=1e-5)
    dx_spec = KernelSpec("norm_dx", f"ln_dx_{dim}", (*base, ("g", ("f32", 0)), ("stats", 0),
                                                     ("out_dtype", "f32")))
    bdx = rowwise.generate_norm_dx(dx_spec, caps)
    # a workgroup per row (measured faster than a subgroup reading one element per load),
    # or the row in registers where it fits
    assert ("row in registers" in b.variant) == regs and bdx.variant.startswith(
        "subgroup per row x" if regs else "workgroup per row"), bdx.variant
    (dx,) = run_kernel(bdx, [x, w, g, stats], [((rows, dim), np.float32)], fill=0x7FC00000)
    gw = g * w.astype(np.float64)
    want = rstd * (gw - gw.mean(1, keepdims=True) - xh * (gw * xh).mean(1, keepdims=True))
    np.testing.assert_allclose(dx, want, rtol=1e-3, atol=1e-4)
    h200 = _h200()
    for spec in (fwd, dx_spec):
        wide = KernelSpec(spec.family, spec.name, tuple((k, 768 if k == "dim" else v)
                                                        for k, v in spec.params))
        gen = getattr(rowwise, rowwise.FAMILIES[spec.family])
        hb = gen(wide, h200)
        # 768 = 3 groups of 8 per lane of 32: the row in registers, a subgroup per row
        assert hb.variant == "subgroup per row x32, row in registers", hb.variant
        assert hb.dispatches[0].groups[0] == 10
        tools.validate(hb.words, hb.name, target_env=h200.spirv_target_env())


def test_subgroup_rows_need_a_pinned_width_and_full_subgroups():
    """A row is owned by a subgroup only where the width can be pinned and every subgroup
    required full (a driver may report a size it does not run, or start partial subgroups):
    without either, the same spec gets workgroup rows; a binary asking for full subgroups is
    refused by a device without them, naming the kernel."""
    import dataclasses

    from alpha_jit.codegen_spirv.kernel import KernelSpec
    from alpha_jit.codegen_spirv.kernels import rowwise
    from alpha_jit.errors import AlphaJitError
    from alpha_jit.runtime.pipelines import validate

    h200 = _h200()
    spec = KernelSpec("norm_fwd", "ln_768", (("rows", 64), ("dim", 768), ("rms", False),
                                             ("eps", 1e-5), ("x", ("f32", 0)), ("w", ("f32", 0)),
                                             ("out_dtype", "f32")))
    b = rowwise.generate_norm_fwd(spec, h200)
    assert b.variant.startswith("subgroup per row x32")
    assert b.notes["required_subgroup_size"] == 32 and b.notes["full_subgroups"]
    validate(b, h200)
    for field in ("compute_full_subgroups", "subgroup_size_control"):
        lacking = dataclasses.replace(h200, **{field: False})
        assert rowwise.generate_norm_fwd(spec, lacking).variant.startswith("workgroup per row")
        with pytest.raises(AlphaJitError, match="ln_768"):
            validate(b, lacking)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("offsets,regs", [((8, 16, 24, 8, 6), True), ((0, 0, 0, 0, 0), True),
                                          ((3, 8, 8, 8, 2), False), ((8, 16, 5, 8, 2), False)])
def test_norm_rows_in_registers_read_operands_at_their_offsets(rms, offsets, regs):
    """Forward and dx kernels whose operands start past their bindings' first element (x, w,
    b, g at multiples of 8 and stats anywhere: the row in registers; x or b off the vector
    width: the general kernels), against float64 numpy; the bindings' leading elements are
    junk, so an offset dropped or misread shows."""
    from alpha_jit.codegen_spirv.kernels import rowwise
    from alpha_jit.ir.ops import registry
    from alpha_jit.runtime.device import get_device
    from alpha_jit.runtime.testing import run_kernel

    caps = get_device().caps
    g_ = np.random.default_rng(1)
    rows, dim = 7, 3 * 8 * _row_lanes()
    xo, wo, bo, go, so = offsets
    x = (g_.standard_normal((rows, dim)) * 2 + 0.5).astype(np.float32)
    w, b = (g_.standard_normal(dim).astype(np.float32) for _ in range(2))
    gr = g_.standard_normal((rows, dim)).astype(np.float32)

    def pad(a, o):
        return np.concatenate([np.full(o, 7.0, np.float32), a.ravel()])

    base = (("rows", rows), ("dim", dim), ("rms", rms), ("eps", 1e-5), ("x", ("f32", xo)),
            ("w", ("f32", wo)))
    fwd = KernelSpec("norm_fwd", "f", (*base, ("b", ("f32", bo)), ("out_dtype", "f32"),
                                       ("stats_out", True)))
    bf = rowwise.generate_norm_fwd(fwd, caps)
    assert ("row in registers" in bf.variant) == regs, bf.variant
    out, stats = run_kernel(bf, [pad(x, xo), pad(w, wo), pad(b, bo)],
                            [((rows, dim), np.float32), ((rows, 2), np.float32)])
    x64 = x.astype(np.float64)
    mean = np.zeros((rows, 1)) if rms else x64.mean(1, keepdims=True)
    var = (x64 ** 2).mean(1, keepdims=True) if rms else x64.var(1, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5)
    xh = (x64 - mean) * rstd
    np.testing.assert_allclose(out, xh * w + b, rtol=1e-4, atol=1e-4)
    dxs = KernelSpec("norm_dx", "d", (*base, ("g", ("f32", go)), ("stats", so),
                                      ("out_dtype", "f32")))
    bd = rowwise.generate_norm_dx(dxs, caps, registry.scalar_rule)
    assert ("row in registers" in bd.variant) == (regs or bo % 8 != 0), bd.variant  # no b
    (dx,) = run_kernel(bd, [pad(x, xo), pad(w, wo), pad(gr, go), pad(stats, so)],
                       [((rows, dim), np.float32)])
    gw = gr * w.astype(np.float64)
    c1 = 0 if rms else gw.mean(1, keepdims=True)
    want = rstd * (gw - c1 - xh * (gw * xh).mean(1, keepdims=True))
    np.testing.assert_allclose(dx, want, rtol=1e-3, atol=1e-4)


def _epilogue_case(name, rows, dim, r):
    """(input entries, arrays, exprs, what the epilogue adds to dx) of one kind of input."""
    from alpha_jit import dtypes

    add = (("add", "f32", (), (("acc",), ("in", 0))),)
    as_add = (("cast", "f32", (("dtype", "f32"),), (("in", 0),)),
              ("add", "f32", (), (("acc",), ("e", 0))))
    rb = dtypes.f32_to_bf16(r)
    rbf = dtypes.bf16_to_f32(rb).astype(np.float64)
    bias = r[0]
    inner = r[:, 8:dim - 8]
    window = np.zeros((rows, dim))
    window[:, 8:dim - 8] = inner
    mask = (r > 0).astype(np.int32)
    iota = (("cast", "f32", (("dtype", "f32"),), (("iota", 1 if name == "iota1" else -1),)),
            ("add", "f32", (), (("acc",), ("e", 0))))
    return {
        "contiguous": ((("f32", (dim, 1), 0),), [r], add, r),
        "offset3": ((("f32", (dim, 1), 3),), [np.concatenate([np.ones(3, np.float32),
                                                               r.ravel()])], add, r),
        "transposed": ((("f32", (1, rows), 0),), [np.ascontiguousarray(r.T)], add, r),
        "bias": ((("f32", (0, 1), 0),), [bias], add, bias[None]),
        "bf16": ((("bf16", (dim, 1), 0),), [rb], add, rbf),
        "bf16_transposed": ((("bf16", (1, rows), 0),), [np.ascontiguousarray(rb.T)], add, rbf),
        "bf16_offset4": ((("bf16", (dim, 1), 4),), [np.concatenate([np.ones(4, np.uint16),
                                                                     rb.ravel()])], add, rbf),
        "f16": ((("f16", (dim, 1), 0),), [r.astype(np.float16)], add,
                r.astype(np.float16).astype(np.float64)),
        "windowed": ((("f32", (dim - 16, 1), -8, ((0, rows), (8, dim - 8))),),
                     [np.concatenate([inner.ravel(), np.zeros(8, np.float32)])], add, window),
        "bool": ((("bool", (dim, 1), 0),), [mask], as_add, mask),
        "iota1": ((), [], iota, np.arange(dim)[None].astype(np.float64)),
        "iota-1": ((), [], iota, np.arange(rows * dim).reshape(rows, dim).astype(np.float64)),
    }[name]


@pytest.mark.parametrize("name", ["contiguous", "offset3", "transposed", "bias", "bf16",
                                  "bf16_transposed", "bf16_offset4", "f16", "windowed", "bool",
                                  "iota1", "iota-1"])
def test_register_row_dx_epilogue_reads_every_kind_of_input(name):
    """The register-row dx finishes 8 adjacent elements at a time (`EpilogueStore.finish_run`):
    an epilogue input contiguous along the row and aligned is read as 16-byte vectors, any
    other (misaligned, transposed, f16, bool, windowed) one element at a time, and an iota
    sees each element's own index; every kind against numpy."""
    from alpha_jit.codegen_spirv.kernels import rowwise
    from alpha_jit.ir.ops import registry
    from alpha_jit.runtime.device import get_device
    from alpha_jit.runtime.testing import run_kernel

    caps = get_device().caps
    g_ = np.random.default_rng(2)
    rows, dim = 5, 2 * 8 * _row_lanes()
    x, gr, r = (g_.standard_normal((rows, dim)).astype(np.float32) for _ in range(3))
    w = g_.standard_normal(dim).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, rstd = x64.mean(1, keepdims=True), 1 / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    stats = np.concatenate([mean, rstd], 1).astype(np.float32)
    xh = (x64 - mean) * rstd
    gw = gr * w.astype(np.float64)
    dx = rstd * (gw - gw.mean(1, keepdims=True) - xh * (gw * xh).mean(1, keepdims=True))
    entries, arrays, exprs, extra = _epilogue_case(name, rows, dim, r)
    spec = KernelSpec("norm_dx", f"dx_{name}", (
        ("rows", rows), ("dim", dim), ("rms", False), ("x", ("f32", 0)), ("w", ("f32", 0)),
        ("g", ("f32", 0)), ("stats", 0), ("out_dtype", "f32"),
        ("epilogue", (entries, exprs, (("f32", len(exprs) - 1),)))))
    b = rowwise.generate_norm_dx(spec, caps, registry.scalar_rule)
    tools.validate(b.words, b.name)
    assert "row in registers" in b.variant, b.variant
    (got,) = run_kernel(b, [x, w, gr, stats, *arrays], [((rows, dim), np.float32)],
                        fill=0x7FC00000)
    np.testing.assert_allclose(got, dx + extra, rtol=1e-4, atol=1e-4)
