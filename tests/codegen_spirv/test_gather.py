"""Gather (embedding lookup) and deterministic scatter-add (its gradient) against numpy.

The scatter's two variants (walk, segment) against an exact in-order f32 reference (np.add.at
on a float32 array adds in position order, as both variants do) and against each other bit for
bit: duplicates, one id everywhere, all distinct, V > N, N not a multiple of the sort chunk, odd
and wide D, f32 / f16 / bf16, out-of-range ids, split grids, a hot row through the CPU module
(unroll 4), inside compiled steps, the variant lowering picks for the H200 `small` and `gpt2`
shapes (two dispatches each), and on a CPU device llvmpipe's loop limit: a scatter whose worst
case (one id at every position) would pass it is refused by the plan, never summed short.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import scatter
from alpha_jit.codegen_spirv.kernels.gather import generate_gather, generate_scatter
from alpha_jit.dtypes import bf16_to_f32, f32_to_bf16
from alpha_jit.runtime import caps as caps_mod
from alpha_jit.runtime import get_device
from alpha_jit.runtime.step_plan import MemoryPlanError

from .conftest import rel_l2, validate

rng = np.random.default_rng(3)
H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


def gather_spec(V, D, N, t_off=0, i_off=0, dt="f32"):
    return KernelSpec("gather", f"gather_{V}x{D}", (
        ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("table_offset", t_off),
        ("ids_offset", i_off)))


def scatter_spec(V, D, N, s_off=0, i_off=0, dt="f32", variant=None, chunk=None, caps=None):
    """No variant: the spec as written before variants (the walk); "segment" with `chunk` (the
    default chunk for `caps` if None)."""
    extra = ()
    if variant == "walk":
        extra = (("variant", "walk"),)
    elif variant == "segment":
        extra = (("variant", "segment"), ("chunk", chunk or scatter.default_chunk(N, caps)))
    return KernelSpec("scatter", f"scatter_{V}x{D}", (
        ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("src_offset", s_off),
        ("ids_offset", i_off), *extra))


def build(gen, s, caps=None):
    b = gen(s, caps)
    validate(b.words, b.name)
    return b


def padded_ids(ids, i_off):
    """ids after i_off junk values (ids far out of range: reading them would be caught)."""
    return np.concatenate([np.full(i_off, 1 << 30, np.int32), ids.astype(np.int32)])


@pytest.mark.parametrize("V,D,N,t_off,i_off", [(1, 1, 1, 0, 0), (10, 5, 7, 3, 2),
                                               (50, 96, 40, 11, 5), (300, 300, 33, 0, 1)])
def test_gather(run_kernel, V, D, N, t_off, i_off):
    table = rng.standard_normal(t_off + V * D).astype(np.float32)
    ids = rng.integers(0, V, N)
    (out,) = run_kernel(build(generate_gather, gather_spec(V, D, N, t_off, i_off)),
                        [table, padded_ids(ids, i_off)], [((N, D), np.float32)])
    want = table[t_off:].astype(np.float64).reshape(V, D)[ids]
    assert rel_l2(out, want) < 1e-5


def test_gather_out_of_range_ids_write_nan(run_kernel):
    V, D = 6, 9
    table = rng.standard_normal(V * D).astype(np.float32)
    ids = np.array([0, -1, 5, 6, 1 << 30, 2], np.int32)
    (out,) = run_kernel(build(generate_gather, gather_spec(V, D, len(ids))), [table, ids],
                        [((len(ids), D), np.float32)])
    bad = (ids < 0) | (ids >= V)
    assert np.isnan(out[bad]).all()
    assert np.array_equal(out[~bad], table.reshape(V, D)[ids[~bad]])


@pytest.mark.parametrize("V,D,N,s_off,i_off", [(1, 1, 1, 0, 0), (7, 3, 40, 2, 3),
                                               (40, 70, 300, 5, 0), (500, 8, 257, 0, 4),
                                               (9, 1100, 50, 1, 1), (5, 512, 20, 0, 0)])
def test_scatter_repeated_ids(run_kernel, V, D, N, s_off, i_off):
    # Ids drawn from the lower half only (rows left untouched) and with many repeats.
    src = rng.standard_normal(s_off + N * D).astype(np.float32)
    ids = rng.integers(0, max(1, V // 2), N)
    want = exact_reference(V, D, ids, src[s_off:])
    b = build(generate_scatter, scatter_spec(V, D, N, s_off, i_off))
    args = [src, padded_ids(ids, i_off)]
    (out,) = run_kernel(b, args, [((V, D), np.float32)], fill=0x7FC00000)  # start from NaN
    assert out.tobytes() == want.tobytes()
    assert not out[V // 2 + 1:].any()  # rows no id names are written, as zeros
    (again,) = run_kernel(b, args, [((V, D), np.float32)])
    assert np.array_equal(out, again)  # deterministic: same bits every run


def test_split_grid_and_small_workgroups(run_kernel):
    caps = SimpleNamespace(max_workgroup_invocations=64, max_workgroup_count=(2, 3, 1))
    V, D, N = 20, 150, 30
    table = rng.standard_normal(V * D).astype(np.float32)
    ids = rng.integers(0, V, N)
    g = build(generate_gather, gather_spec(V, D, N), caps)
    s = build(generate_scatter, scatter_spec(V, D, N), caps)
    assert len(g.dispatches) > 1 and len(s.dispatches) > 1
    assert max(g.local_size[0] * g.local_size[1], s.local_size[0] * s.local_size[1]) <= 64
    (out,) = run_kernel(g, [table, ids.astype(np.int32)], [((N, D), np.float32)])
    assert rel_l2(out, table.reshape(V, D)[ids]) < 1e-5
    (grad,) = run_kernel(s, [out.reshape(-1), ids.astype(np.int32)], [((V, D), np.float32)])
    assert grad.tobytes() == exact_reference(V, D, ids, out).tobytes()


# ---- the segment variant -------------------------------------------------------------------
_STORE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # bf16 travels as bits


def _scatter(run_kernel, spec, src, ids, caps=None):
    """(out as stored, binary): the scatter of `src` (already in its storage dtype) by `ids`,
    its workspace (if any) an extra output; outputs start as NaN, so a skipped row shows."""
    p = dict(spec.params)
    b = build(generate_scatter, spec, caps)
    outs = [((p["rows"], p["dim"]), _STORE[p["dtype"]])]
    if scatter.workspace_words(spec.params):
        outs.append(((scatter.workspace_words(spec.params),), np.int32))
    res = run_kernel(b, [src, ids.astype(np.int32)], outs, fill=0x7FC07FC0)
    return res[0], b


def _as_f32(x, dt):
    return bf16_to_f32(x) if dt == "bf16" else np.asarray(x, np.float32)


def exact_reference(V, D, ids, src_f32, dt="f32"):
    """The scatter in f32, each row's sources added in position order (np.add.at on a float32
    array is unbuffered and in order: the kernels' sums, bit for bit), out-of-range ids
    dropped, stored as `dt` (bf16 as rounded bits, f16 rounded by numpy)."""
    out = np.zeros((V, D), np.float32)
    ok = (ids >= 0) & (ids < V)
    np.add.at(out, ids[ok], src_f32.reshape(-1, D)[ok])
    return f32_to_bf16(out) if dt == "bf16" else out.astype(_STORE[dt])


def _cpu_caps():
    """The device's caps where it is a CPU (lavapipe), else a CPU stand-in: the CPU module
    (unroll 4, a row per thread) and llvmpipe's loop limit apply."""
    caps = get_device().caps
    if caps.device_type == "cpu":
        return caps
    return SimpleNamespace(device_type="cpu", max_shared_memory=32768,  # lavapipe's limits
                           max_workgroup_invocations=1024, max_workgroup_count=(65535,) * 3,
                           max_workgroup_size=(1024,) * 3, subgroup_size=8)


def _check_segment(run_kernel, V, D, N, ids, dt="f32", s_off=0, i_off=0, chunk=None,
                   caps=None):
    """The segment variant: equal to np.add.at in float64 (within the storage rounding) and
    bit-identical to the walk; two dispatches, pass 0 over ceil(N / C) chunks."""
    x = rng.standard_normal(s_off + N * D).astype(np.float32)
    src = f32_to_bf16(x) if dt == "bf16" else x.astype(_STORE[dt])
    want = exact_reference(V, D, ids, _as_f32(src, dt)[s_off:], dt)
    seg = scatter_spec(V, D, N, s_off, i_off, dt, "segment", chunk, caps)
    got, b = _scatter(run_kernel, seg, src, padded_ids(ids, i_off), caps)
    walked, _ = _scatter(run_kernel, scatter_spec(V, D, N, s_off, i_off, dt), src,
                         padded_ids(ids, i_off), caps)
    if dt == "f16":  # the device's f32 -> f16 conversion may round otherwise than numpy's
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=2**-10, atol=2**-24)
    else:
        assert got.tobytes() == want.tobytes()  # the in-order f32 sums, bit for bit
    assert got.tobytes() == walked.tobytes()  # the same sums in the same order: the same bits
    assert "problem" not in b.notes
    C = dict(seg.params)["chunk"]
    if caps is None:
        assert len(b.dispatches) == 2
        assert b.dispatches[0].groups == (-(-N // C), 1, 1)
    return got


@pytest.mark.parametrize("V,D,N,hi,chunk", [
    (40, 70, 3000, 8, None),  # many duplicates: ids from a fifth of the rows
    (300, 24, 1500, 300, 64),  # N not a multiple of the chunk, 24 chunks
    (9, 1101, 200, 9, 16),  # D odd and wider than a workgroup
    (5000, 8, 300, 5000, None),  # V larger than N: most rows are empty
])
def test_segment_scatter_random_ids(run_kernel, V, D, N, hi, chunk):
    _check_segment(run_kernel, V, D, N, rng.integers(0, hi, N), s_off=3, i_off=2, chunk=chunk)


def test_segment_scatter_one_id_everywhere(run_kernel):
    # one row takes every position: runs as long as the chunks, across all of them
    got = _check_segment(run_kernel, 6, 33, 2500, np.full(2500, 4), chunk=256)
    assert not np.delete(got, 4, axis=0).any()


def test_segment_scatter_all_distinct(run_kernel):
    V, N = 2100, 2048
    _check_segment(run_kernel, V, 16, N, rng.permutation(V)[:N], chunk=512)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_segment_scatter_16bit_sources(run_kernel, dt):
    _check_segment(run_kernel, 50, 40, 1200, rng.integers(0, 12, 1200), dt=dt, s_off=1,
                   chunk=128)


def test_segment_scatter_drops_out_of_range_ids_as_the_walk_does(run_kernel):
    # an id outside [0, V) adds to no row in either variant (ids from outside a step)
    V, N = 7, 600
    ids = rng.integers(0, V, N)
    ids[::5] = rng.choice([-1, V, 1 << 30, (1 << 31) - 1, -(1 << 31)], len(ids[::5]))
    _check_segment(run_kernel, V, 10, N, ids, chunk=64)


def test_segment_scatter_nan_and_inf_as_the_walk(run_kernel):
    V, D, N = 6, 5, 300
    x = rng.standard_normal(N * D).astype(np.float32)
    x[[7, 40, 41, 333]] = [np.nan, np.inf, -np.inf, np.inf]
    ids = rng.integers(0, V, N)
    got, _ = _scatter(run_kernel, scatter_spec(V, D, N, variant="segment", chunk=64), x, ids)
    walked, _ = _scatter(run_kernel, scatter_spec(V, D, N), x, ids)
    assert got.tobytes() == walked.tobytes()
    want = np.zeros((V, D))
    np.add.at(want, ids, x.reshape(N, D).astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])


def test_segment_scatter_split_grid_and_small_workgroups(run_kernel):
    caps = SimpleNamespace(max_workgroup_invocations=64, max_workgroup_count=(2, 3, 1))
    V, D, N = 20, 150, 700
    seg = scatter_spec(V, D, N, variant="segment", chunk=32, caps=caps)
    b = build(generate_scatter, seg, caps)
    # 22 chunks and 20 x 5 row blocks in grids of at most 2 x 3 workgroups
    assert len(b.dispatches) > 2 and b.local_size[0] * b.local_size[1] <= 64
    _check_segment(run_kernel, V, D, N, rng.integers(0, V, N), chunk=32, caps=caps)


def test_variant_choice_and_dispatches_for_the_gpt_shapes():
    """Lowering's choice: the walk for a tiny N, the segment variant (2 dispatches: the sort,
    then the sums) for the H200 `small` and `gpt2` embedding gradients; valid modules."""
    h200 = caps_mod.load(H200)
    assert scatter.choose(64, 32, 64, h200) == (("variant", "walk"),)
    assert scatter.choose(5000, 32, 200, h200)[0] == ("variant", "walk")
    for V, D, N, chunks in [(256, 384, 64 * 256, 16), (50304, 768, 8 * 1024, 8)]:
        extra = scatter.choose(V, D, N, h200)
        assert extra == (("variant", "segment"), ("chunk", 1024))
        spec = scatter_spec(V, D, N, variant="segment", caps=h200)
        assert spec.params[-2:] == extra
        b = generate_scatter(spec, h200)
        tools.validate(b.words, b.name, h200.spirv_target_env())
        assert len(b.dispatches) == 2 and b.dispatches[0].groups == (chunks, 1, 1)
        assert scatter.workspace_words(spec.params) == 2 * chunks * 1024
        assert b.shared_bytes <= h200.max_shared_memory and b.bindings[-1].name == "work"


def _embedding_grad(table, ids, wt):
    """An Embedding's weight gradient from a compiled step, and the step's binaries."""
    emb = nn.Embedding(*table.shape, _weight=table.copy())

    @aj.compile
    def step(i, w):
        loss = (emb(i) * w).sum()
        loss.backward()
        return loss

    step(ids, wt)
    (exe,) = [e for es in step.cache.values() for e in es]
    return emb.weight.grad.numpy(), exe


def test_both_variants_inside_a_step_give_the_same_bits(monkeypatch):
    """Lowering picks the segment variant for N = 1500 (its workspace a temporary of the plan);
    the walk, forced, gives the same gradient bit for bit."""
    V, D = 300, 24
    table = rng.standard_normal((V, D)).astype(np.float32)
    ids = rng.integers(0, 40, (3, 500)).astype(np.int32)
    wt = rng.standard_normal((3, 500, D)).astype(np.float32)
    seg, exe = _embedding_grad(table, ids, wt)
    assert any(b.variant.startswith("segment") for b in exe.binaries)
    for b in exe.binaries:
        tools.validate(b.words, b.name)
    monkeypatch.setattr(scatter, "WALK_MAX_N", 1 << 30)
    monkeypatch.setattr(scatter, "WALK_MAX_WORK", 1 << 60)
    walk, exe = _embedding_grad(table, ids, wt)
    assert any(b.variant == "walk" for b in exe.binaries)
    assert seg.tobytes() == exact_reference(V, D, ids.reshape(-1), wt.reshape(-1, D)).tobytes()
    assert seg.tobytes() == walk.tobytes()


# ---- CPU devices: the module llvmpipe runs, and its loop limit -----------------------------
def test_segment_scatter_cpu_module_with_a_hot_row(run_kernel):
    """The CPU module (a row per thread, 4 sources loaded ahead) with one id at 60% of the
    positions: its runs cross every chunk and most rounds of 4 (plus ragged ends)."""
    caps = _cpu_caps()
    V, D, N = 50, 40, 5000
    ids = rng.integers(0, V, N)
    ids[rng.random(N) < 0.6] = 7
    b = build(generate_scatter, scatter_spec(V, D, N, variant="segment", caps=caps), caps)
    assert b.variant.endswith("unroll 4") and "x1 rows" in b.variant
    _check_segment(run_kernel, V, D, N, ids, s_off=1, i_off=3, caps=caps)


def test_cpu_choice_follows_the_loop_bound(monkeypatch):
    """On a CPU device choose() takes the segment variant where its worst case (one row
    holding all N positions) fits llvmpipe's loop limit, else the walk where that fits, else
    the segment variant with its problem note (the plan refuses it)."""
    caps = _cpu_caps()
    for n in (100_000, 300_000):  # the walk's bound passes the limit at about 63K positions
        walk = generate_scatter(scatter_spec(4, 8, n, variant="walk"), caps)
        assert "after 65535 in all" in walk.notes["problem"]
    extra = scatter.choose(4, 8, 100_000, caps)
    assert extra[0] == ("variant", "segment")
    fits = generate_scatter(scatter_spec(4, 8, 100_000, variant="segment", caps=caps), caps)
    assert "problem" not in fits.notes and fits.notes["loop_passes"] < 65535
    assert scatter.choose(4, 8, 300_000, caps)[0] == ("variant", "segment")
    over = generate_scatter(scatter_spec(4, 8, 300_000, variant="segment", caps=caps), caps)
    assert over.name in over.notes["problem"] and "fewer positions" in over.notes["problem"]
    h200 = caps_mod.load(H200)
    gpu = generate_scatter(scatter_spec(4, 8, 300_000, variant="segment", caps=h200), h200)
    assert "problem" not in gpu.notes  # no loop limit off the CPU
    # the fallback order, with the bounds forced
    monkeypatch.setattr(scatter, "_fits_loop_limit",
                        lambda r, d, n, variant, c: variant[0][1] == "walk")
    assert scatter.choose(4, 8, 5000, caps) == (("variant", "walk"),)
    monkeypatch.setattr(scatter, "_fits_loop_limit", lambda *a: False)
    assert scatter.choose(4, 8, 5000, caps)[0] == ("variant", "segment")


def test_degenerate_shapes_pick_the_walk():
    """No rows (V = 0) or a bad chunk: no segment layout (it divided by zero), the walk."""
    for caps in (_cpu_caps(), caps_mod.load(H200), None):
        assert scatter.segment_layout(0, 8, 2000, 1024, caps) is None
        assert scatter.segment_layout(4, 8, 2000, 0, caps) is None
        assert scatter.choose(0, 8, 2000, caps) == (("variant", "walk"),)
    b = build(generate_scatter, scatter_spec(0, 8, 2000, variant="walk"))
    assert b.dispatches == ()  # nothing to write


def test_a_hot_run_over_the_loop_limit_is_refused_not_summed_short():
    """On a CPU device an Embedding gradient of 300000 positions (one id everywhere once
    came out as 260048) is refused before anything runs, naming the scatter kernel."""
    if get_device().caps.device_type != "cpu":
        pytest.skip("llvmpipe's loop limit: CPU devices only")
    N = 300_000
    with pytest.raises(MemoryPlanError, match=r"kernel \d+ \(scatter_\w+, .*after 65535 in all"):
        _embedding_grad(np.zeros((4, 8), np.float32), np.ones((1, N), np.int32),
                        np.ones((1, N, 8), np.float32))
