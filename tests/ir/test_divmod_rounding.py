"""Float floor division and remainder stay exact on a device whose division is not correctly
rounded (Vulkan allows OpFDiv 2.5 ulp; NVIDIA's is off by one on large quotients).

lavapipe divides correctly rounded, so no test on it can see that bug: the scalar rules run here
on numpy through `InexactDivEmitter`, whose division is a few ulp off (seeded), and must still
give numpy's answers bit for bit, signed zeros included. The kernel side is checked for the
DenormPreserve execution mode that keeps denormals where the device can.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.dsl import KernelBuilder
from alpha_jit.codegen_spirv.scalar import NumpyScalarEmitter, ScalarEmitter
from alpha_jit.ir.ops.elementwise import _div_rn, _divmod_f32
from alpha_jit.runtime.caps import Capabilities

F32_MAX = float(np.finfo(np.float32).max)


class InexactDivEmitter(NumpyScalarEmitter):
    """numpy's scalar rules, but f32 division returns the correctly rounded quotient moved by
    -ulps..+ulps ulp (pseudo-random, seeded), as a device's OpFDiv may. Zero, inf and NaN
    quotients stay as they are (devices get those exact, and `ieee_div` spells out b = 0)."""

    def __init__(self, seed: int, ulps: int = 2):
        self.rng = np.random.default_rng(seed)
        self.ulps = ulps

    def binary(self, op, a, b):
        out = super().binary(op, a, b)
        if op != "div" or out.dtype != np.float32:
            return out
        bits = np.atleast_1d(out).view(np.uint32).astype(np.int64)
        mag = bits & 0x7FFFFFFF
        moved = np.clip(mag + self.rng.integers(-self.ulps, self.ulps + 1, bits.shape),
                        1, 0x7F7FFFFF)  # stays finite, nonzero, same sign
        bits = np.where((mag > 0) & (mag < 0x7F800000), (bits & 0x80000000) | moved, bits)
        return bits.astype(np.uint32).view(np.float32).reshape(np.shape(out))


def _same_bits(got, want) -> np.ndarray:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))


def _assert_bits(got, want, a, b, what: str) -> None:
    ok = _same_bits(got, want)
    bad = np.nonzero(~ok)[0]
    assert not bad.size, f"{what}: {bad.size} of {ok.size} differ, e.g. " + ", ".join(
        f"{a[i]!r} / {b[i]!r}: {got[i]!r} vs {want[i]!r}" for i in bad[:5])


def _random_bits(rng, n: int) -> np.ndarray:
    """f32 values with uniformly random bits: every exponent, denormals, inf and NaN."""
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def _near_midpoints(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose quotient lies within 2^-17 ulp of halfway between two floats: there a
    few-ulp division plus one correction step still rounds the wrong way."""
    m = rng.integers(2**23, 2**24, n).astype(np.float64)
    bm = rng.integers(2**23, 2**24, n).astype(np.float64)
    mid, b = (m + 0.5) * 2.0 ** -23, bm * 2.0 ** -23
    a = (mid * b).astype(np.float32)
    keep = np.abs(a.astype(np.float64) / b - mid) < 2.0 ** -40
    scale = (2.0 ** rng.integers(-60, 60, int(keep.sum()))).astype(np.float32)
    return a[keep] * scale, b[keep].astype(np.float32)


def _edge_values() -> np.ndarray:
    return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, -3e-39,
                     1.1754944e-38, 2.0 ** -126, F32_MAX, -F32_MAX, 1.0, -1.0, 0.1, 7.0, -2.5,
                     3.0, 1e8, -1e8, 1e30, 16777217.0, 2.0 ** 24, 3818160384.0, 3e38, 1e35],
                    np.float32)


def _pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The torch_api test's generator (wider), huge and tiny ratios, random bits and every
    pair of edge values."""
    rng = np.random.default_rng(seed)
    n = 20000
    e = _edge_values()
    ea, eb = (x.ravel() for x in np.meshgrid(e, e))
    a = [np.array([-0.001, -1, 1e-45, 1e8, 1e35, 0.1, 1e35, 3], np.float32), ea,
         (rng.normal(size=n) * 10.0 ** rng.integers(-3, 9, n)).astype(np.float32),
         (rng.normal(size=n) * 10.0 ** rng.integers(-37, 38, n)).astype(np.float32),
         _random_bits(rng, n)]
    b = [np.array([1e5, 1e8, -1, 0.1, 7, 3e38, -1, 0], np.float32), eb,
         (rng.normal(size=n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32),
         (rng.normal(size=n) * 10.0 ** rng.integers(-37, 38, n)).astype(np.float32),
         _random_bits(rng, n)]
    return np.concatenate(a), np.concatenate(b)


def test_the_inexact_division_is_inexact():
    """The stand-in must really be off, or the tests below prove nothing."""
    rng = np.random.default_rng(0)
    a, b = _random_bits(rng, 10000), _random_bits(rng, 10000)
    with np.errstate(all="ignore"):
        want = np.divide(a, b)
    got = InexactDivEmitter(0).binary("div", a, b)
    finite = np.isfinite(want) & (want != 0)
    assert (~_same_bits(got, want))[finite].mean() > 0.7


@pytest.mark.parametrize("seed", [0, 1])
def test_correctly_rounded_division_from_an_inexact_one(seed):
    rng = np.random.default_rng(100 + seed)
    n = 50000
    # subnormal quotients near halfway between two denormals: rounded once, not twice
    bs = (rng.integers(2**23, 2**24, n) * 2.0 ** (rng.integers(0, 30, n) - 23)).astype(np.float32)
    sub = ((rng.integers(1, 2**23, n) + 0.5 + rng.integers(-2, 3, n) * 2.0 ** -20)
           * 2.0 ** -149 * bs).astype(np.float32)
    # quotients next to f32's largest value, on either side of overflowing
    bo = (rng.integers(2**23, 2**24, n) * 2.0 ** -53).astype(np.float32)
    over = (F32_MAX * bo.astype(np.float64) * (1 + rng.integers(-8, 9, n) * 2.0 ** -26))
    mid_a, mid_b = _near_midpoints(rng, 2_000_000)
    assert mid_a.size > 10
    e = _edge_values()
    ea, eb = (x.ravel() for x in np.meshgrid(e, e))
    a = np.concatenate([_random_bits(rng, n), sub, -sub, over.astype(np.float32), mid_a, ea])
    b = np.concatenate([_random_bits(rng, n), bs, bs, -bo, mid_b, eb])
    got = _div_rn(InexactDivEmitter(seed), a, b)
    with np.errstate(all="ignore"):
        _assert_bits(got, np.divide(a, b), a, b, "a / b")


def _known_gaps(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Where `_divmod_f32` differs from numpy whatever the division (with an exact one too):
    (quotient and remainder both differ, only the remainder differs). Not what this file tests.

    - |a| >= 2^127: a - q b can overflow;
    - |a / b| >= 2^128: the quotient is numpy's inf, but the remainder is NaN (numpy: fmod);
    - the special cases: inf // 0 is NaN (numpy: inf), NaN // inf is 0 or -1 (numpy: NaN),
      +-0 // inf has a zero of the wrong sign."""
    finite = np.isfinite(a) & np.isfinite(b) & (b != 0)
    with np.errstate(all="ignore"):
        ratio = np.abs(a.astype(np.float64) / b.astype(np.float64))
    both = finite & (np.abs(a) >= 2.0 ** 127)
    both |= np.isinf(a) & (b == 0)
    both |= np.isnan(a) & np.isinf(b)
    both |= (a == 0) & np.isinf(b)
    return both, both | (finite & (ratio >= 2.0 ** 128))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_division_and_remainder_match_numpy_through_an_inexact_division(seed):
    a, b = _pairs(seed)
    with np.errstate(all="ignore"):
        want_q, want_r = np.floor_divide(a, b), np.remainder(a, b)
    gap_q, gap_r = _known_gaps(a, b)
    assert (~gap_r).sum() > 0.9 * a.size
    for em in (NumpyScalarEmitter(), InexactDivEmitter(seed)):
        q, r = _divmod_f32(em, a, b)
        name = type(em).__name__
        _assert_bits(q[~gap_q], want_q[~gap_q], a[~gap_q], b[~gap_q], f"{name}: a // b")
        _assert_bits(r[~gap_r], want_r[~gap_r], a[~gap_r], b[~gap_r], f"{name}: a % b")


def test_the_h200_counterexamples():
    """The torch_api test's pairs past |a / b| = 2^24 (where the H200 was 1 ulp off), through
    a division 1 ulp off, and 1e-45 // -1 (-1 where denormals are kept)."""
    rng = np.random.default_rng(3)
    a = (rng.normal(size=500) * 10.0 ** rng.integers(-3, 9, 500)).astype(np.float32)
    b = (rng.normal(size=500) * 10.0 ** rng.integers(-3, 4, 500)).astype(np.float32)
    big = np.abs(a.astype(np.float64) / b) > 2.0 ** 24
    a, b = np.append(a[big], np.float32(1e-45)), np.append(b[big], np.float32(-1))
    for seed in range(4):
        q, r = _divmod_f32(InexactDivEmitter(seed, ulps=1), a, b)
        _assert_bits(q, np.floor_divide(a, b), a, b, "a // b")
        _assert_bits(r, np.remainder(a, b), a, b, "a % b")
    assert np.floor_divide(a[-1], b[-1]) == -1.0


def _divmod_kernel(caps) -> bytes:
    kb = KernelBuilder("divmod", 64, caps)
    a, b = kb.buffer("a", "f32", writable=False), kb.buffer("b", "f32", writable=False)
    q_out, r_out = kb.buffer("q", "f32", writable=True), kb.buffer("r", "f32", writable=True)
    i = kb.global_id(0)
    q, r = _divmod_f32(ScalarEmitter(kb), a.load(i), b.load(i))
    q_out.store(i, q)
    r_out.store(i, r)
    return kb.finish()


@pytest.mark.parametrize("denorm", [False, True])
def test_kernels_keep_denormals_where_the_device_can(denorm):
    caps = SimpleNamespace(inf_nan_preserve_f32=True, denorm_preserve_f32=denorm)
    words = _divmod_kernel(caps)
    tools.validate(words, "divmod", target_env="vulkan1.2")
    text = tools.disassemble(words, "divmod")
    assert ("DenormPreserve 32" in text) == denorm
    assert "SignedZeroInfNanPreserve 32" in text


def test_denorm_preserve_is_a_capability_defaulting_to_false():
    field = Capabilities.__dataclass_fields__["denorm_preserve_f32"]
    assert field.default is False
