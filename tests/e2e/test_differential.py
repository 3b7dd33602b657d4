"""Randomized differential test: random programs compiled against numpy and the interpreter.

Each program from `tests/e2e/random_programs.py` runs three ways: compiled on the device, in the
reference interpreter over its traced graph, and as independent numpy source. Every returned
value must agree in shape, dtype and values (NaN where NaN, the same infinities, finite values
to f32 round-off). A failure prints the program as a pytest function to paste into a test.
`ALPHA_JIT_DIFF_PROGRAMS` (default 500) and `ALPHA_JIT_DIFF_SEED` scale and move the search.
"""

from __future__ import annotations

import os

import numpy as np

from alpha_jit import dtypes
from alpha_jit.ir import interpreter
from tests.e2e.random_programs import Program, build_aj, random_program, run_numpy

N_PROGRAMS = int(os.environ.get("ALPHA_JIT_DIFF_PROGRAMS", "500"))
SEED = int(os.environ.get("ALPHA_JIT_DIFF_SEED", "20261123"))
RTOL = 2e-4


def mismatch(got: np.ndarray, want: np.ndarray, what: str) -> str | None:
    """Why `got` is not `want` (None when they agree)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    if got.dtype != want.dtype:
        return f"{what}: dtype {got.dtype}, expected {want.dtype}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(w)):
        i = np.argwhere(np.isnan(g) != np.isnan(w))[0]
        return f"{what}: NaN differs at {tuple(i)}: got {g[tuple(i)]}, expected {w[tuple(i)]}"
    inf = np.isinf(g) | np.isinf(w)
    if not np.array_equal(g[inf], w[inf]):
        i = np.argwhere(inf & (g != w))[0]
        return f"{what}: infinity differs at {tuple(i)}: got {g[tuple(i)]}, " \
               f"expected {w[tuple(i)]}"
    fin = np.isfinite(w)
    if fin.any():
        scale = 1.0 + float(np.abs(w[fin]).max())
        err = np.abs(g[fin] - w[fin]) - RTOL * np.abs(w[fin])
        if (err > 1e-5 * scale).any():
            k = int(np.argmax(err))
            return f"{what}: value {g[fin][k]!r} vs expected {w[fin][k]!r} " \
                   f"(max |expected| {scale - 1:.3g})"
    return None


def check(prog: Program) -> str | None:
    args = prog.input_arrays()
    want = run_numpy(prog)
    fn = build_aj(prog)
    got = fn(*[a.copy() for a in args])
    traced = fn.last_traced
    interp, _ = interpreter.run(traced.graph, traced.leaves(args, {}, {}))
    if len(got) != len(want):
        return f"{len(got)} values returned, expected {len(want)}"
    for i, (g, w, r) in enumerate(zip(got, want, interp, strict=True)):
        w_dt = dtypes.dtype(w.dtype).name
        if tuple(g.shape) != w.shape or g.dtype.name != w_dt:
            return f"value {i}: handle says {g.dtype}{list(g.shape)}, expected " \
                   f"{w_dt}{list(w.shape)}"
        why = mismatch(g.numpy(), w, f"value {i} vs numpy") or \
            mismatch(g.numpy(), r, f"value {i} vs interpreter")
        if why:
            return why
    return None


def test_random_programs_agree_with_numpy_and_the_interpreter():
    failures = []
    for k in range(N_PROGRAMS):
        prog = random_program(SEED + k)
        try:
            why = check(prog)
        except Exception as e:  # an error on a valid program is a failure too
            why = f"raised {type(e).__name__}: {e}"
        if why:
            failures.append(f"# {why}\n{prog.as_test()}")
    assert not failures, f"{len(failures)} of {N_PROGRAMS} random programs disagree " \
        f"(seed {SEED}); the first:\n\n" + "\n\n".join(failures[:3])
