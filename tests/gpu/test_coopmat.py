"""GPU parity for the cooperative-matrix paths: runs only on a device that lists bf16/f16
16x16x16 cooperative matrices (the H200), skipped elsewhere (lavapipe, CI).

    ALPHA_JIT_DEVICE=0 pytest tests/gpu -q       # on the GPU machine

GEMM kernels of every spec feature (odd sizes, transposes, offsets, broadcast batches, f32
operands rounded on load, the column sums of b, 16-bit outputs) against float64 numpy of the
rounded operands, and whole bf16/f16 GPT steps (bias, GELU and residual epilogues, fused
attention) against the reference interpreter on the same graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from alpha_jit import dtypes
from alpha_jit.codegen_spirv import coopmat, tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import matmul_coopmat
from alpha_jit.codegen_spirv.kernels.matmul import generate_matmul
from alpha_jit.ir.ops import registry

rng = np.random.default_rng(11)


def _data(shape_flat: int, dt: str):
    """(array as stored on the device, its values as float64)."""
    x = rng.standard_normal(shape_flat).astype(np.float32)
    if dt == "bf16":
        bits = dtypes.f32_to_bf16(x)
        return bits, dtypes.bf16_to_f32(bits).astype(np.float64)
    if dt == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float64)
    return x, x.astype(np.float64)


def _spec(B, M, N, K, dt, a_t=False, b_t=False, a_off=0, b_off=0, bcast_b=False, extra=()):
    """a: (B, M, K), stored (K, M) per batch when a_t; b: (K, N), stored (N, K) when b_t."""
    a_dt = "f32" if ("a_round", "bf16") in extra else dt
    a = (a_dt, a_off, M * K, 1 if a_t else K, M if a_t else 1)
    b = (dt, b_off, 0 if bcast_b else K * N, 1 if b_t else N, K if b_t else 1)
    return KernelSpec("matmul", f"cm_{B}x{M}x{N}x{K}", (
        ("batch", B), ("m", M), ("n", N), ("k", K), ("a", a), ("b", b),
        ("out_dtype", "f32"), *extra))


def _operand(p, key, shape):
    dt, off, *strides = p[key]
    size = off + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)) + 1
    stored, f64 = _data(size, dt)
    view = np.lib.stride_tricks.as_strided(f64[off:], shape, tuple(s * 8 for s in strides))
    return stored, view


def _run(caps, spec, n_out=1):
    from alpha_jit.runtime.testing import run_kernel

    b = generate_matmul(spec, caps, registry.scalar_rule)
    ws = b.notes.get("workspace_bytes")
    tools.validate(b.words, b.name, caps.spirv_target_env())
    assert b.variant.startswith("coopmat"), b.variant
    p = dict(spec.params)
    B, M, N, K = p["batch"], p["m"], p["n"], p["k"]
    a_st, a = _operand(p, "a", (B, M, K))
    b_st, bb = _operand(p, "b", (B, K, N))
    # the K sums of the operand as loaded (before any rounding)
    sums = bb[0].sum(axis=0) if p.get("colsum_b") else a[0].sum(axis=1) \
        if p.get("rowsum_a") else None
    if p.get("a_round"):  # the kernel multiplies the bf16 rounding of f32 data
        a = dtypes.bf16_to_f32(dtypes.f32_to_bf16(a.astype(np.float32))).astype(np.float64)
    outs = [((B, M, N), np.float32)] \
        + ([((N if p.get("colsum_b") else M,), np.float32)] if n_out == 2 else []) \
        + ([((ws // 4,), np.float32)] if ws else [])
    got = run_kernel(b, [a_st, b_st], outs, fill=0x7FC00000)  # NaN: skipped elements show
    return got[:n_out], a @ bb, sums


def _rel(got, want):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("dt", ["bf16", "f16"])
@pytest.mark.parametrize("B,M,N,K", [(1, 16, 16, 16), (1, 200, 300, 70), (1, 257, 129, 1000),
                                     (3, 20, 70, 33), (1, 1024, 768, 768)])
def test_contiguous(caps, dt, B, M, N, K):
    if dt == "f16" and not coopmat.supported(caps, "f16"):
        pytest.skip("no f16 fragments")
    (got,), want, _ = _run(caps, _spec(B, M, N, K, dt))
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("a_t,b_t", [(True, False), (False, True), (True, True)])
def test_transposed_offsets_broadcast(caps, a_t, b_t):
    spec = _spec(4, 130, 77, 48, "bf16", a_t, b_t, a_off=5, b_off=9, bcast_b=True)
    (got,), want, _ = _run(caps, spec)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("side", ["b", "a"])
@pytest.mark.parametrize("split", [1, 2, 8])
def test_f32_operand_rounded_on_load_and_colsum(caps, split, side):
    # the weight-gradient shapes: a = X^T (K-major), b = dY with b's column sums; or (the
    # layout gemm_transpose gives it) a = dY^T, b = X with a's row sums; split-K slices
    extra = (("a_round", "bf16"), ("colsum_b" if side == "b" else "rowsum_a", True))
    if split > 1:
        extra += (("config", ("coopmat", 64, 64, 32, 32, 32, 32, split)),)
    spec = _spec(1, 96, 200, 2600, "bf16", a_t=True, extra=extra)
    (got, cs), want, sums = _run(caps, spec, n_out=2)
    assert _rel(got, want) < 1e-5
    assert _rel(cs, sums) < 1e-5


@pytest.mark.parametrize("split", [2, 4])
def test_split_k_batched_ragged(caps, split):
    cfg = ("coopmat", 128, 128, 32, 64, 32, 32, split)
    spec = _spec(3, 130, 70, 1000, "f16" if coopmat.supported(caps, "f16") else "bf16",
                 a_t=True, b_t=True, extra=(("config", cfg),))
    (got,), want, _ = _run(caps, spec)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "f16"])
@pytest.mark.parametrize("options", [dict(bias=True, n_embd=64), dict(
    bias=True, n_embd=64, norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2)])
def test_gpt_step_matches_reference(caps, precision, options):
    from tests.nn.test_gpt import one_step_parity

    one_step_parity(precision, options, 1e-2, sgd=True)


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_vector_staging_layouts(caps, a_t, b_t):
    # 16-byte staging in every layout pair (aligned offsets and sizes), batched, with the
    # column sums of a k-contiguous or an n-contiguous b
    for key in ("colsum_b", "rowsum_a"):
        spec = _spec(1, 128, 96, 520, "bf16", a_t, b_t, a_off=8, b_off=16, extra=((key, True),))
        (got, cs), want, sums = _run(caps, spec, n_out=2)
        assert _rel(got, want) < 1e-5
        assert _rel(cs, sums) < 1e-5, key
    spec = _spec(3, 64, 128, 96, "bf16", a_t, b_t, a_off=24, b_off=8)
    (got,), want, _ = _run(caps, spec)
    assert _rel(got, want) < 1e-5


def test_every_candidate_tiling(caps):
    # what the autotuner may pick: every tile, subgroup tile and split, on ragged edges
    from alpha_jit.codegen_spirv.kernels import matmul_coopmat

    base = _spec(1, 300, 520, 1040, "bf16", a_t=True, extra=(("colsum_b", True),))
    cands = matmul_coopmat.candidates(dict(base.params), caps)
    big = _spec(1, 2048, 2048, 64, "bf16")
    cands_big = matmul_coopmat.candidates(dict(big.params), caps)
    # a weight gradient's long K: 128 x 128 tiles split up to 8 ways, column sums in shared
    # registers across staging rounds, ragged M and N
    long_k = _spec(1, 136, 264, 4200, "bf16", a_t=True, extra=(("colsum_b", True),))
    cands_long = matmul_coopmat.candidates(dict(long_k.params), caps)
    # and the weight gradient as gemm_transpose writes it: a = dY^T, a's row sums
    long_a = _spec(1, 264, 136, 4200, "bf16", a_t=True, extra=(("rowsum_a", True),))
    cands_long_a = matmul_coopmat.candidates(dict(long_a.params), caps)
    assert any(c.split > 1 for c in cands) and any(c.tm * c.tn > 128 * 128 for c in cands_big)
    assert any((c.tm, c.tn, c.split) == (128, 128, 8) for c in cands_long)
    for spec, cs in ((base, cands), (big, cands_big), (long_k, cands_long),
                     (long_a, cands_long_a)):
        for cfg in cs:
            s = KernelSpec("matmul", spec.name, (*spec.params, ("config", cfg.to_param())))
            p = dict(spec.params)
            n_out = 2 if p.get("colsum_b") or p.get("rowsum_a") else 1
            got, want, sums = _run(caps, s, n_out=n_out)
            assert _rel(got[0], want) < 1e-5, cfg
            if n_out == 2:
                assert _rel(got[1], sums) < 1e-5, cfg


@pytest.mark.parametrize("config", [None, ("coopmat", 128, 128, 32, 64, 64, 32, 2),
                                    ("coopmat", 64, 64, 32, 32, 32, 32, 1)])
def test_tile_groups_on_tall_grids(caps, config, monkeypatch):
    """Tiles walked `_TILE_GROUP` rows at a time (here for any b, not only a large one), the
    last group shorter (2200 rows: 18 tiles of 128 or 35 of 64); ragged, batched, split-K.
    The output starts as NaN, so a tile no workgroup took shows."""
    from alpha_jit.codegen_spirv.kernels import matmul_coopmat as mc

    monkeypatch.setattr(mc, "_TILE_GROUP_MIN_B", 0)
    extra = (("config", config),) if config else ()
    spec = _spec(2, 2200, 300, 1100 if config else 64, "bf16", extra=extra)
    cfg = generate_matmul(spec, caps, registry.scalar_rule).notes["config"]
    assert mc.grouped(dict(spec.params), cfg, caps)
    (got,), want, _ = _run(caps, spec)
    assert _rel(got, want) < 1e-5


def test_direct_store_of_aligned_f32_outputs(caps):
    """A plain f32 output the tiles cover exactly leaves straight from the fragments (the LM
    head's logits); batched, b stored transposed; an overhanging grid keeps the scratch path.
    The output starts as NaN, so an element the direct stores missed shows."""
    for B, M, N, K, b_t in ((1, 256, 512, 96, False), (3, 128, 256, 64, True)):
        spec = _spec(B, M, N, K, "bf16", b_t=b_t)
        assert "direct store" in generate_matmul(spec, caps, registry.scalar_rule).variant
        (got,), want, _ = _run(caps, spec)
        assert _rel(got, want) < 1e-5
    ragged = generate_matmul(_spec(1, 200, 300, 70, "bf16"), caps, registry.scalar_rule)
    assert "direct store" not in ragged.variant


def _matmul_variants(fn, args, caps) -> list[str]:
    from alpha_jit.runtime.step_plan import plan_step

    plan = plan_step(fn.trace(*args).graph, caps, progress=False)
    return [k.variant for k in plan.kernels if k.family == "matmul"]


@pytest.mark.filterwarnings("ignore:invalid value", "ignore:overflow")
@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_fragment_store_epilogues_match_numpy(caps, precision):
    """GEMMs whose tiles cover the output exactly run their epilogue on the lanes' own
    elements and store each output as a fragment: bias (by column), a residual (by row and
    column), two outputs of different dtypes, inf and NaN in the data. Against numpy on
    the same rounded operands, and against the same program with the epilogue pass off
    (separate elementwise kernels)."""
    import alpha_jit as aj
    from alpha_jit.nn import functional as F

    if precision == "f16" and not coopmat.supported(caps, "f16"):
        pytest.skip("no f16 fragments")
    if matmul_coopmat.accumulator_map(caps) is None:
        pytest.skip("no probed accumulator layout")
    g = np.random.default_rng(5)
    x = g.standard_normal((2, 128, 96)).astype(np.float32)
    x[0, 3, 7], x[1, 100, 0] = np.inf, np.nan
    w = (g.standard_normal((256, 96)) * 0.2).astype(np.float32)
    b = g.standard_normal(256).astype(np.float32)
    r = g.standard_normal((2, 128, 256)).astype(np.float32)

    def make():
        @aj.compile(precision=precision)
        def f(x, w, b, r):
            h = F.linear(x, w, b)
            return h.astype(precision), h + r

        return f

    f = make()
    args = (x, w, b, r)
    got = [t.numpy() for t in f(*args)]
    variants = _matmul_variants(f, args, caps)
    assert any(v.endswith("fragment store") for v in variants), variants
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALPHA_JIT_DISABLE_PASSES", "gemm_epilogue")
        ref = [t.numpy() for t in make()(*args)]
    rnd = (lambda a: dtypes.bf16_to_f32(dtypes.f32_to_bf16(a))) if precision == "bf16" \
        else (lambda a: a.astype(np.float16).astype(np.float32))
    h = rnd(x).astype(np.float64) @ rnd(w).T.astype(np.float64) + b
    want = [h, h + r]
    if precision == "bf16":  # as stored: bf16 values, rounded to nearest even
        assert got[0].dtype == np.float32 and not (got[0].view(np.uint32) & 0xFFFF).any()
    else:
        assert got[0].dtype == np.float16
    for a, c, wnt in zip(got, ref, want, strict=True):
        a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
        # inf and NaN where the unfused program has them (the same scalar rules)
        assert np.array_equal(np.isnan(a), np.isnan(c))
        assert np.array_equal(a[np.isinf(c)], c[np.isinf(c)])
        assert np.isinf(a).any() and np.isnan(a).any()
        ok = np.isfinite(wnt) & np.isfinite(c)
        np.testing.assert_allclose(a[ok], wnt[ok], rtol=2e-2, atol=2e-2)
        # one f32 ulp of accumulation order may move a 16-bit rounding by one 16-bit ulp
        np.testing.assert_allclose(a[ok], c[ok], rtol=1e-2, atol=1e-3)


def test_fragment_store_places_every_element_and_rounds_to_nearest_even(caps):
    """One batched GEMM kernel through the fragment store (outputs start as NaN): a bias by
    column, one by row and a contiguous residual over (batch, m, n); outputs the f32 sum, its
    bf16 cast and the element's own linear index (iota). The bf16 output must be the nearest
    even rounding of the f32 output bit for bit (the fragment conversion itself truncates)."""
    from alpha_jit.runtime.testing import run_kernel

    if matmul_coopmat.accumulator_map(caps) is None:
        pytest.skip("no probed accumulator layout")
    B, M, N, K = 3, 128, 256, 64
    ins = (("f32", (0, 0, 1), 0), ("f32", (0, 1, 0), 0), ("bf16", (M * N, N, 1), 0))
    exprs = (("add", "f32", (), (("acc",), ("in", 0))), ("add", "f32", (), (("e", 0), ("in", 1))),
             ("add", "f32", (), (("e", 1), ("in", 2))),
             ("cast", "bf16", (("dtype", "bf16"),), (("e", 2),)),
             ("cast", "f32", (("dtype", "f32"),), (("iota", -1),)),
             ("mul", "f32", (), (("e", 4), ("const", 0.5, "f32"))))
    cfg = ("coopmat", 128, 128, 32, 64, 64, 32, 1)
    spec = _spec(B, M, N, K, "bf16", extra=(
        ("epilogue", (ins, exprs, (("f32", 2), ("bf16", 3), ("f32", 5)))), ("acc_dtype", "f32"),
        ("config", cfg)))
    binary = generate_matmul(spec, caps, registry.scalar_rule)
    assert binary.variant.endswith("fragment store"), binary.variant
    tools.validate(binary.words, binary.name, caps.spirv_target_env())
    p = dict(spec.params)
    a_st, a = _operand(p, "a", (B, M, K))
    b_st, b = _operand(p, "b", (B, K, N))
    bias_c, bias_r = (rng.standard_normal(s).astype(np.float32) for s in (N, M))
    res_st, res = _data(B * M * N, "bf16")
    shape = (B, M, N)
    f32, bits, index = run_kernel(binary, [a_st, b_st, bias_c, bias_r, res_st],
                                  [(shape, np.float32), (shape, np.uint16), (shape, np.float32)],
                                  fill=0x7FC00000)
    want = a @ b + bias_c + bias_r[:, None] + res.reshape(shape)
    assert _rel(f32, want) < 1e-5
    assert np.array_equal(bits, dtypes.f32_to_bf16(f32))  # nearest even, bit for bit
    assert np.array_equal(index, np.arange(B * M * N, dtype=np.float32).reshape(shape) * 0.5)


@pytest.mark.parametrize("M,N", [(256, 256), (200, 264)])
def test_vector_store_matches_element_stores_bit_for_bit(caps, M, N, monkeypatch):
    """The scratch path storing 8 adjacent elements per lane as 16-byte vectors (a GELU
    epilogue: bias by column and a bf16 residual read as vectors, a bias by row read one
    element at a time, then an f32 output, its bf16 cast and the element's index): batched,
    exactly tiled or overhanging in M and N (N a multiple of 8). Outputs start as NaN; every
    element is placed, the bf16 output is the nearest even rounding of the f32 one, and all
    three equal the element-by-element stores bit for bit."""
    from alpha_jit.runtime.testing import run_kernel

    B, K = 2, 64
    ins = (("f32", (0, 0, 1), 0), ("bf16", (M * N, N, 1), 0), ("f32", (0, 1, 0), 0))
    exprs = (("add", "f32", (), (("acc",), ("in", 0))), ("gelu", "f32", (), (("e", 0),)),
             ("add", "f32", (), (("e", 1), ("in", 1))),
             ("cast", "bf16", (("dtype", "bf16"),), (("e", 2),)),
             ("cast", "f32", (("dtype", "f32"),), (("iota", -1),)),
             ("mul", "f32", (), (("e", 4), ("const", 0.5, "f32"))),
             ("mul", "f32", (), (("e", 2), ("in", 2))))
    spec = _spec(B, M, N, K, "bf16", extra=(
        ("epilogue", (ins, exprs, (("f32", 2), ("bf16", 3), ("f32", 5), ("f32", 6)))),
        ("acc_dtype", "f32"), ("config", ("coopmat", 128, 128, 32, 64, 64, 32, 1))))
    p = dict(spec.params)
    a_st, a = _operand(p, "a", (B, M, K))
    b_st, bb = _operand(p, "b", (B, K, N))
    bias = rng.standard_normal(N).astype(np.float32)
    by_row = rng.standard_normal(M).astype(np.float32)
    res, res64 = _data(B * M * N, "bf16")
    shape = (B, M, N)
    outs = [(shape, np.float32), (shape, np.uint16), (shape, np.float32), (shape, np.float32)]
    got = {}
    for vectors in (True, False):
        monkeypatch.setattr(matmul_coopmat, "_VECTORS", vectors)
        binary = generate_matmul(spec, caps, registry.scalar_rule)
        assert binary.variant.endswith("vector store") == vectors, binary.variant
        tools.validate(binary.words, binary.name, caps.spirv_target_env())
        got[vectors] = run_kernel(binary, [a_st, b_st, bias, res, by_row], outs,
                                  fill=0x7FC00000)
    f32, bits, index, scaled = got[True]
    assert not np.isnan(f32).any() and np.isfinite(f32).all()
    h = a @ bb + bias  # GELU's tanh form (the op's default), then the bf16 residual
    gelu = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    assert _rel(f32, gelu + res64.reshape(shape)) < 1e-4
    assert np.array_equal(bits, dtypes.f32_to_bf16(f32))  # nearest even, bit for bit
    assert np.array_equal(scaled, f32 * by_row[:, None])  # the by-row input, element-wise
    assert np.array_equal(index, np.arange(B * M * N, dtype=np.float32).reshape(shape) * 0.5)
    for v, e in zip(got[True], got[False], strict=True):
        assert np.array_equal(v.view(np.uint8), e.view(np.uint8))
