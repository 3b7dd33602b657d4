"""Gather (embedding lookup) and deterministic scatter-add (its gradient) against numpy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.gather import generate_gather, generate_scatter

from .conftest import rel_l2, validate

rng = np.random.default_rng(3)


def gather_spec(V, D, N, t_off=0, i_off=0, dt="f32"):
    return KernelSpec("gather", f"gather_{V}x{D}", (
        ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("table_offset", t_off),
        ("ids_offset", i_off)))


def scatter_spec(V, D, N, s_off=0, i_off=0, dt="f32"):
    return KernelSpec("scatter", f"scatter_{V}x{D}", (
        ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("src_offset", s_off),
        ("ids_offset", i_off)))


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
    want = np.zeros((V, D))
    np.add.at(want, ids, src[s_off:].astype(np.float64).reshape(N, D))
    b = build(generate_scatter, scatter_spec(V, D, N, s_off, i_off))
    args = [src, padded_ids(ids, i_off)]
    (out,) = run_kernel(b, args, [((V, D), np.float32)], fill=0x7FC00000)  # start from NaN
    assert rel_l2(out, want) < 1e-5
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
    want = np.zeros((V, D))
    np.add.at(want, ids, out.astype(np.float64))
    assert rel_l2(grad, want) < 1e-5
