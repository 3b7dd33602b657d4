"""Batched strided matmul: odd shapes, transposed/broadcast operands, tilings, split grids."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.matmul import choose_config, generate_matmul, grid_plan

from .conftest import rel_l2, validate

rng = np.random.default_rng(7)


def mm_spec(B, M, N, K, a=(0, None, None, None), b=(0, None, None, None), dt="f32"):
    """Spec with a = (offset, sb, sm, sk), b = (offset, sb, sk, sn); None: contiguous."""
    ao, asb, asm, ask = a
    bo, bsb, bsk, bsn = b
    ask = 1 if ask is None else ask
    asm = K if asm is None else asm
    asb = M * K if asb is None else asb
    bsn = 1 if bsn is None else bsn
    bsk = N if bsk is None else bsk
    bsb = K * N if bsb is None else bsb
    return KernelSpec("matmul", f"matmul_{B}x{M}x{N}x{K}", (
        ("batch", B), ("m", M), ("n", N), ("k", K), ("a", (dt, ao, asb, asm, ask)),
        ("b", (dt, bo, bsb, bsk, bsn)), ("out_dtype", dt)))


def operands(s):
    """Random flat buffers just big enough for the spec's views, and their float64 views."""
    p = dict(s.params)
    B, M, N, K = p["batch"], p["m"], p["n"], p["k"]
    views, flats = [], []
    for key, shape in (("a", (B, M, K)), ("b", (B, K, N))):
        _, off, *strides = p[key]
        size = off + sum((d - 1) * st for d, st in zip(shape, strides, strict=True)) + 1
        flat = rng.standard_normal(size).astype(np.float32)
        f64 = flat.astype(np.float64)
        views.append(np.lib.stride_tricks.as_strided(
            f64[off:], shape, tuple(st * 8 for st in strides)))
        flats.append(flat)
    return flats, views[0] @ views[1]


def build(s, caps=None):
    b = generate_matmul(s, caps)
    validate(b.words, b.name)
    return b


def tagged(b, label):
    """`b` under a spec key of its own: the runtime caches pipelines by spec key, and the same
    spec generated for other caps must not reuse the pipeline of an earlier test."""
    spec = KernelSpec(b.spec.family, b.spec.name, (*b.spec.params, ("_test", label)))
    return dataclasses.replace(b, spec=spec)


def check(run_kernel, s, caps=None, label=None):
    p = dict(s.params)
    flats, want = operands(s)
    b = build(s, caps)
    (out,) = run_kernel(tagged(b, label) if label else b, flats,
                        [((p["batch"], p["m"], p["n"]), np.float32)])
    assert rel_l2(out, want) < 1e-5


@pytest.mark.parametrize("B,M,N,K", [(1, 1, 1, 1), (1, 5, 3, 8), (1, 17, 33, 65),
                                     (1, 128, 256, 64), (3, 20, 70, 16), (9, 260, 300, 37)])
def test_contiguous(run_kernel, B, M, N, K):
    check(run_kernel, mm_spec(B, M, N, K))


@pytest.mark.parametrize("B,M,N,K", [(2, 33, 19, 41), (8, 257, 270, 20)])
def test_transposed_both_with_offsets(run_kernel, B, M, N, K):
    # a stored (K, M) and b stored (N, K): k is the contiguous axis of b, the outer axis of a.
    check(run_kernel, mm_spec(B, M, N, K, a=(3, M * K, 1, M), b=(5, N * K, 1, K)))


def test_broadcast_batch_and_row(run_kernel):
    # sb = 0 shares b across the batch; a's batch stride is an odd, padded one.
    M, N, K = 9, 40, 23
    check(run_kernel, mm_spec(4, M, N, K, a=(1, M * K + 7, K, 1), b=(2, 0, N, 1)))


def test_zero_strides_inside(run_kernel):
    # Broadcast along m (sm = 0) and along n (sn = 0): outer products of repeated rows/columns.
    check(run_kernel, mm_spec(2, 6, 5, 19, a=(0, 19, 0, 1), b=(0, 19, 1, 0)))


def test_small_limits_and_split_grid(run_kernel):
    # Tiny device limits: fewer threads, less shared memory, grid split over several dispatches.
    caps = SimpleNamespace(max_workgroup_invocations=64, max_workgroup_size=(64, 64, 64),
                           max_shared_memory=2048, max_workgroup_count=(2, 3, 2))
    s = mm_spec(3, 70, 90, 37)
    cfg = choose_config(s, caps)
    assert cfg.threads <= 64 and cfg.shared_bytes() <= 2048
    b = build(s, caps)
    assert len(b.dispatches) > 1 and b.shared_bytes <= 2048
    check(run_kernel, s, caps)


def test_grid_plan_covers_everything():
    caps = SimpleNamespace(max_workgroup_count=(3, 65535, 2))
    plan = grid_plan((7, 1, 5), caps)
    seen = {(bx + x, by + y, bz + z) for (cx, cy, cz), (bx, by, bz) in plan
            for x in range(cx) for y in range(cy) for z in range(cz)}
    assert seen == {(x, 0, z) for x in range(7) for z in range(5)}
    assert all(c[0] <= 3 and c[2] <= 2 for c, _ in plan)
    assert grid_plan((0, 1, 1), None) == []


def test_default_tiles_fit_lavapipe_and_nvidia():
    s = mm_spec(1, 1024, 1024, 1024)
    for shared in (32768, 49152):
        caps = SimpleNamespace(max_workgroup_invocations=1024, max_workgroup_size=(1024,) * 3,
                               max_shared_memory=shared, subgroup_size=8)
        cfg = choose_config(s, caps)
        assert cfg.variant == "simt" and cfg.shared_bytes() <= shared and cfg.tm == 128
        assert generate_matmul(s, caps).shared_bytes <= shared


CPU = SimpleNamespace(device_type="cpu", max_workgroup_invocations=1024,
                      max_workgroup_size=(1024,) * 3, max_shared_memory=32768)


@pytest.mark.parametrize("B,M,N,K,a,b", [
    (1, 1, 1, 1, (0, None, None, None), (0, None, None, None)),
    (3, 37, 70, 200, (0, None, None, None), (0, None, None, None)),  # K over ragged chunks
    (2, 33, 19, 41, (3, 33 * 41, 1, 33), (5, 19 * 41, 1, 41)),      # both transposed
    (4, 9, 40, 23, (1, 9 * 23 + 7, 23, 1), (2, 0, 40, 1)),            # broadcast batch
    (2, 6, 5, 19, (0, 19, 0, 1), (0, 19, 1, 0)),                      # zero inner strides
    (1, 20, 70, 1031, (2, None, 1, 20), (0, None, None, None)),       # prime K, a transposed
    (2, 40, 24, 512, (0, None, None, None), (7, 512 * 24, 1, 512)),   # even chunks, b^T
])
def test_cpu_rows_variant(run_kernel, B, M, N, K, a, b):
    # The loop-free variant CPU devices get, on odd, strided and broadcast operands, with K
    # split over sequential dispatches wherever it exceeds one chunk.
    s = mm_spec(B, M, N, K, a=a, b=b)
    cfg = choose_config(s, CPU)
    assert cfg.variant == "rows" and cfg.shared_bytes() <= 16384
    check(run_kernel, s, CPU, label="cpu-rows")


def words(b):
    return len(b.words) // 4


def test_cpu_rows_module_size_is_bounded_in_k():
    # Unrolling K whole made 300k-word modules at K = 512 (minutes in the driver's compile for
    # a GPT step): a chunk of K per dispatch keeps every module small, whatever K is.
    sizes = {}
    for k in (128, 1024, 8192):
        b = build(mm_spec(1, 512, 512, k), CPU)
        sizes[k] = words(b)
        assert sizes[k] < 20_000, sizes
        cfg = b.notes["config"]
        assert cfg.variant == "rows" and len(b.dispatches) == -(-k // cfg.bk)
    assert sizes[8192] <= 1.05 * sizes[128], sizes  # independent of K
    ragged = build(mm_spec(1, 512, 512, 1031), CPU)
    assert words(ragged) < 1.5 * sizes[1024]


def test_cpu_rows_inf_in_the_last_k_of_a_ragged_split(run_kernel):
    # Steps past the end of K read the last k again and zero both factors: inf * 0 must not
    # turn a column that holds inf into NaN.
    B, M, N, K = 1, 16, 24, 67
    s = mm_spec(B, M, N, K)
    cfg = choose_config(s, CPU)
    assert cfg.bk < K and K % cfg.bk, cfg  # several chunks, the last one short
    a = np.abs(rng.standard_normal(M * K)).astype(np.float32) + 0.5
    b = rng.standard_normal(K * N).astype(np.float32)
    b[(K - 1) * N + 3] = np.inf
    b[(K - 1) * N + 5] = -np.inf
    want = a.astype(np.float64).reshape(M, K) @ b.astype(np.float64).reshape(K, N)
    (out,) = run_kernel(tagged(build(s, CPU), "cpu-rows-inf"), [a, b],
                        [((B, M, N), np.float32)])
    assert np.array_equal(np.isinf(out[0]), np.isinf(want)) and not np.isnan(out).any()
    fin = np.isfinite(want)
    assert rel_l2(out[0][fin], want[fin]) < 1e-5


def test_cpu_rows_narrow_output_never_splits_k():
    # Partial sums between K chunks live in the output: a bf16/f16 output would round each.
    assert choose_config(mm_spec(1, 64, 64, 24, dt="bf16"), CPU).variant == "rows"
    long_k = choose_config(mm_spec(1, 64, 64, 4096, dt="bf16"), CPU)
    assert long_k.variant == "simt"



@pytest.mark.parametrize("variant", ["simt", "rows"])
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("rounded", [False, True])
def test_k_sums_of_either_operand(run_kernel, variant, side, rounded):
    """("colsum_b", True) / ("rowsum_a", True): the sums over K of the operand as loaded
    (before rounding to bf16), beside the product of the rounded operands; ragged tiles, K
    over several chunks (rows variant), the summed operand stored transposed (as dY^T is)."""
    from alpha_jit import dtypes
    from alpha_jit.codegen_spirv.kernels.matmul import MatmulConfig

    M, N, K = 45, 29, 111
    a, b = ((0, None, 1, M), (0, None, None, None)) if side == "a" else \
        ((0, None, None, None), (0, None, 1, K))
    base = mm_spec(1, M, N, K, a=a, b=b)
    extra = (("rowsum_a" if side == "a" else "colsum_b", True),)
    if rounded:
        extra += ((f"{side}_round", "bf16"),)
    cfg = choose_config(base, CPU) if variant == "rows" else MatmulConfig("simt", 32, 32, 16)
    s = KernelSpec("matmul", f"ksum_{side}", (*base.params, *extra, ("config", cfg.to_param())))
    flats, _ = operands(s)
    p = dict(s.params)
    views = []
    for key, shape in (("a", (M, K)), ("b", (K, N))):
        _, off, _sb, s0, s1 = p[key]
        f64 = flats[0 if key == "a" else 1].astype(np.float64)
        views.append(np.lib.stride_tricks.as_strided(f64[off:], shape, (s0 * 8, s1 * 8)))
    raw = views[0 if side == "a" else 1]
    sums = raw.sum(axis=1 if side == "a" else 0)
    if rounded:  # the product multiplies the bf16 rounding, the sums add the values as loaded
        r = dtypes.bf16_to_f32(dtypes.f32_to_bf16(raw.astype(np.float32))).astype(np.float64)
        views[0 if side == "a" else 1] = r
    want = views[0] @ views[1]
    built = build(s, CPU if variant == "rows" else None)
    assert built.notes["config"].variant == variant
    out, got = run_kernel(tagged(built, f"ksum-{variant}"), flats,
                          [((1, M, N), np.float32), ((M if side == "a" else N,), np.float32)])
    assert rel_l2(out[0], want) < 1e-5
    np.testing.assert_allclose(got, sums, rtol=1e-5, atol=1e-4)


def test_coopmat_variants_validate_for_the_h200(monkeypatch):
    """Every cooperative-matrix tiling the autotuner may pick for the H200 (whole and split-K)
    of every GEMM of a bf16 GPT step (bias, GELU and cast epilogues, column sums, operands
    rounded on load) and of an f16 batched GEMM is a valid SPIR-V 1.6 module for its target
    environment; the GPU parity tests (tests/gpu) run them."""
    from pathlib import Path

    from alpha_jit import nn
    from alpha_jit.codegen_spirv import tools
    from alpha_jit.codegen_spirv.kernels import matmul_coopmat
    from alpha_jit.ir.ops import registry
    from alpha_jit.runtime import caps as caps_mod
    from alpha_jit.runtime.step_plan import plan_step
    from tests.e2e.util import lm_step

    monkeypatch.setenv("ALPHA_JIT_AUTOTUNE", "0")  # not this machine's tuned choices
    h200 = caps_mod.load(Path(__file__).resolve().parents[1] / "data" / "h200-caps.json")
    nn.manual_seed(0)
    model = nn.GPT(nn.GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=64,
                                bias=True))
    step = lm_step(model, nn.optim.AdamW(model.parameters(), lr=1e-3), "bf16")
    x = rng.integers(0, 64, (16, 32)).astype(np.int32)
    plan = plan_step(step.trace(x, x).graph, h200, progress=False)
    specs = [k.spec for k in plan.lowered.kernels if k.spec.family == "matmul"]
    specs.append(mm_spec(2, 130, 70, 1000, dt="f16"))
    specs.append(mm_spec(1, 4200, 136, 64, dt="bf16"))  # tall: tiles walked in row groups
    for key in ("colsum_b", "rowsum_a"):  # ... split over K, with K sums
        tall = dict(mm_spec(1, 4200, 264, 4200, dt="bf16").params)
        specs.append(KernelSpec("matmul", f"tall_{key}", (*tall.items(), (key, True))))
    monkeypatch.setattr(matmul_coopmat, "_TILE_GROUP_MIN_B", 0)  # for this small b too
    # b's column sums (a weight gradient written x^T @ dY: gemm_transpose off) of an f32
    # operand rounded on load (a dY the graph keeps in f32), split too
    cs = dict(mm_spec(1, 136, 264, 4200, dt="bf16").params)
    cs["b"] = ("f32", *cs["b"][1:])
    specs.append(KernelSpec("matmul", "cs", (*cs.items(), ("b_round", "bf16"),
                                             ("colsum_b", True))))
    # a's row sums (dY^T @ x, as gemm_transpose writes it): GPUs sum bias gradients as column
    # strips, but a CPU device's plan, and these kernels, still fuse them
    rs = dict(mm_spec(1, 264, 136, 4200, dt="bf16").params)
    specs.append(KernelSpec("matmul", "rs", (*rs.items(), ("rowsum_a", True))))
    features, variants = set(), set()
    for s in specs:
        params = tuple(kv for kv in s.params if kv[0] != "config")
        for cfg in matmul_coopmat.candidates(dict(params), h200):
            b = generate_matmul(KernelSpec("matmul", s.name, (*params,
                                                              ("config", cfg.to_param()))),
                                h200, registry.scalar_rule)
            assert b.variant.startswith("coopmat") and b.notes["required_subgroup_size"] == 32
            assert ("workspace_bytes" in b.notes) == (cfg.split > 1)
            tools.validate(b.words, b.name, h200.spirv_target_env())
            features |= {key for key, _ in params} | ({"split"} if cfg.split > 1 else set())
            variants.add(b.variant)
    assert {"epilogue", "colsum_b", "rowsum_a", "b_round", "split"} <= features
    assert any(v.endswith("direct store") for v in variants)  # plain f32 outputs
    # affine epilogues (bias, residual, casts) on the lanes' elements, stored as fragments
    assert any(v.endswith("fragment store") for v in variants)


def test_tile_order_takes_every_tile_once():
    """`tile_order` (the coopmat GEMM's walk over its tiles in groups of rows) maps the
    launch order onto every tile exactly once, the last group shorter, and keeps
    consecutive workgroups within one group of rows."""
    from alpha_jit.codegen_spirv.kernels.matmul_coopmat import tile_order

    for nx, ny, group in ((393, 64, 16), (6, 18, 16), (1, 35, 16), (7, 33, 8), (3, 17, 16)):
        tiles = [tile_order(lin, nx, ny, group) for lin in range(nx * ny)]
        assert sorted(tiles) == [(r, c) for r in range(ny) for c in range(nx)]
        for lin, (r, _) in enumerate(tiles):
            assert r // group == lin // (group * nx)
    # a group walks down its rows first: the first `group` launches share one column
    assert [tile_order(lin, 393, 64, 16) for lin in range(3)] == [(0, 0), (1, 0), (2, 0)]


def test_only_a_large_b_walks_tiles_in_groups():
    """The LM head's forward (b: 77 MB of weights) is walked in groups on the H200; a layer's
    GEMM (b of a few MB, which ran 2-4% slower so) and a short grid are not."""
    from pathlib import Path

    from alpha_jit.codegen_spirv.kernels import matmul_coopmat as mc
    from alpha_jit.codegen_spirv.kernels.matmul import MatmulConfig
    from alpha_jit.runtime import caps as caps_mod

    h200 = caps_mod.load(Path(__file__).resolve().parents[1] / "data" / "h200-caps.json")
    cfg = MatmulConfig("coopmat", 128, 128, 64, 64, 32, 32, 1)
    assert mc.grouped(dict(mm_spec(1, 8192, 50304, 768, dt="bf16").params), cfg, h200)
    assert not mc.grouped(dict(mm_spec(1, 8192, 2304, 768, dt="bf16").params), cfg, h200)
    assert not mc.grouped(dict(mm_spec(1, 1024, 50304, 768, dt="bf16").params), cfg, h200)


def test_deep_tiles_are_tuned_never_guessed():
    """The deep (bk 64) 128 x 128 tiles: in the tuner's short list where they fill the H200 and
    fit its shared memory, never the heuristic's choice (they lost at 4096^3), never deeper
    than K, and never with column sums (whose shared array would overflow 48 KiB)."""
    from pathlib import Path

    from alpha_jit.codegen_spirv.kernels import matmul_coopmat as mc
    from alpha_jit.runtime import caps as caps_mod

    h200 = caps_mod.load(Path(__file__).resolve().parents[1] / "data" / "h200-caps.json")
    limit = h200.max_shared_memory
    for m, n, k, colsum in ((16384, 1152, 384, False), (4096, 4096, 4096, False),
                            (8192, 768, 48, False), (1536, 384, 16384, True)):
        p = dict(mm_spec(1, m, n, k, dt="bf16").params)
        if colsum:
            p["colsum_b"] = True
        deep = [c for c in mc.candidates(p, h200) if c.bk == 64]
        assert all(c.bk <= k and mc.shared_bytes(c, "b" if colsum else None) <= limit
                   for c in deep)
        assert mc.choose(p, h200).bk < 64
        short = [c for c in mc.search(p, h200) if c.bk == 64]
        assert bool(short) == (k >= 64 and not colsum), (m, n, k, colsum)
        assert all((c.tm, c.tn, c.rn, c.split) == (128, 128, 32, 1) for c in short)


def test_store_paths_on_the_h200():
    """How GEMM outputs leave on the H200 (probed accumulator layout, 32 lanes): a plain f32
    output the tiles cover exactly straight from the fragments; an epilogue reading
    residuals (by row and column) on exact tiles as fragments; everything else (no inputs
    but by column, GELU, overhanging tiles, K sums) through the shared scratch as 16-byte
    vectors where the rows are a multiple of 8 elements and the outputs bf16 or f32 (one K
    slice), else element by element."""
    from pathlib import Path

    from alpha_jit.codegen_spirv.kernels import matmul_coopmat as mc
    from alpha_jit.codegen_spirv.kernels.matmul import MatmulConfig
    from alpha_jit.runtime import caps as caps_mod

    h200 = caps_mod.load(Path(__file__).resolve().parents[1] / "data" / "h200-caps.json")
    assert mc.accumulator_map(h200) is not None
    cfg = MatmulConfig("coopmat", 128, 128, 32, 64, 64, 32, 1)
    base = {**dict(mm_spec(1, 256, 512, 64, dt="bf16").params), "out_dtype": "f32"}
    bias = (("f32", (0, 0, 1), 0),)
    residual = (("f32", (0, 512, 1), 0),)

    def ep(then: str, ins: tuple = bias) -> dict:  # acc + input, then one op, stored as bf16
        exprs = (("add", "f32", (), (("acc",), ("in", 0))), (then, "f32", (), (("e", 0),)))
        return {**base, "epilogue": (ins, exprs, (("bf16", 1),))}

    assert mc.store_path(cfg, base, h200) == "direct"
    assert mc.store_path(cfg, {**base, "out_dtype": "bf16"}, h200) == "vectors"
    assert (mc.epilogue_kind(ep("cast")), mc.store_path(cfg, ep("cast"), h200)) \
        == ("bias", "vectors")
    assert (mc.epilogue_kind(ep("cast", residual)), mc.store_path(cfg, ep("cast", residual),
                                                                   h200)) \
        == ("affine", "fragments")
    assert mc.store_path(cfg, ep("gelu"), h200) == "vectors"
    assert mc.epilogue_kind(ep("gelu")) == "other"
    assert mc.store_path(cfg, {**ep("cast", residual), "n": 520}, h200) == "vectors"
    assert mc.store_path(cfg, {**ep("cast"), "n": 516}, h200) == "scratch"  # rows off 8
    assert mc.store_path(cfg, {**base, "colsum_b": True}, h200) == "vectors"
    assert mc.store_path(dataclasses.replace(cfg, split=2), base, h200) == "scratch"
    assert mc.store_path(cfg, {**base, "out_dtype": "f16"}, None) == "scratch"
    unprobed = dataclasses.replace(h200, fragment_layouts=())
    assert mc.store_path(cfg, ep("cast", residual), unprobed) == "vectors"
    assert mc.store_path(dataclasses.replace(cfg, lanes=64), ep("cast"), h200) == "scratch"
    as_bool = {**ep("cast"), "epilogue": (bias, ep("cast")["epilogue"][1], (("bool", 1),))}
    assert mc.epilogue_kind(as_bool) == "other"


def test_tuner_short_list_on_the_h200():
    """The short list stays short (each candidate is a driver compile in every cold build) and
    keeps what won on the H200: the largest filling tile, 128 x 128 with 64 x 64 and the deep
    64 x 32 per subgroup, split-K for small grids and long K; tiles under 128 x 128 only where
    M or N is at most 64 or nothing else applies."""
    from pathlib import Path

    from alpha_jit.codegen_spirv.kernels import matmul_coopmat as mc
    from alpha_jit.runtime import caps as caps_mod

    h200 = caps_mod.load(Path(__file__).resolve().parents[1] / "data" / "h200-caps.json")
    shapes = {(8192, 2304, 768): 3, (8192, 768, 3072): 4, (768, 3072, 8192): 4,
              (384, 384, 16384): 4, (384, 1536, 16384): 3, (8192, 50304, 768): 3,
              (64, 4096, 512): 3, (256, 256, 256): 1}
    for (m, n, k), count in shapes.items():
        p = dict(mm_spec(1, m, n, k, dt="bf16").params)
        short, every = mc.search(p, h200), mc.candidates(p, h200)
        assert len(short) == count and len(set(short)) == count, (m, n, k, short)
        assert all(c in every for c in short)
        tiles = {(c.tm, c.tn) for c in short}
        assert (256, 128) not in tiles
        if min(m, n) > 64 and (m, n) != (256, 256):
            assert all(c.tm * c.tn >= 128 * 128 for c in short), (m, n, k)
        if k >= 2048 and m * n < 128 * 128 * 128:  # long K on a grid that does not fill
            assert any(c.split > 1 and (c.tm, c.tn) == (128, 128) for c in short)
    big = dict(mm_spec(1, 8192, 2304, 768, dt="bf16").params)
    assert (128, 256) in {(c.tm, c.tn) for c in mc.search(big, h200)}
