"""Float floor division and remainder stay exact on a device whose division is not correctly
rounded (Vulkan allows OpFDiv 2.5 ulp; NVIDIA's is off by one on large quotients).

lavapipe divides correctly rounded, so no test on it can see that bug: the scalar rules run here
on numpy through `InexactDivEmitter`, whose division is a few ulp off (seeded), and must still
give numpy's answers bit for bit, signed zeros included: on every pair, the special cases
(infinities, NaN, zeros) and the overflow ranges (|a| >= 2^127, |a / b| >= 2^128) with them.
`FlushingEmitter` stands in for a device that flushes denormals. The kernel side is run on the
device, and checked for the DenormPreserve execution mode that keeps denormals where the device
can.
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


_TINY = np.float32(np.finfo(np.float32).tiny)


def _flush(x):
    """Denormal f32 values to zeros of the same sign (other dtypes as they are)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        return x
    zero = (x.view(np.uint32) & np.uint32(0x80000000)).view(np.float32)
    return np.where(np.abs(x) < _TINY, zero, x).astype(np.float32)


class FlushingEmitter(InexactDivEmitter):
    """A device that does not keep f32 denormals (NVIDIA's, without DenormPreserve): float
    arithmetic and comparisons read denormal operands as zeros and flush denormal results;
    select and the bit pattern (`bits`) move values as they are."""

    def binary(self, op, a, b):
        return _flush(super().binary(op, _flush(a), _flush(b)))

    def unary(self, op, a):
        return _flush(super().unary(op, _flush(a)))

    def compare(self, op, a, b):
        return super().compare(op, _flush(a), _flush(b))


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


def _edge_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Pairs where `_divmod_f32` once differed from numpy: |a| >= 2^127 (a - q b overflowed:
    f32 max // 3.8e9 was -inf), |a / b| >= 2^128 (the remainder was NaN), near 2^128, and the
    special cases (inf // 0 was NaN, NaN // +-inf 0 or -1, NaN % -inf -inf, +-0 // +-inf a
    zero of the wrong sign)."""
    inf, nan, m = np.inf, np.nan, F32_MAX
    pairs = [
        # |a| >= 2^127
        (m, 3.8e9), (-m, 3.8e9), (m, -3.8e9), (-m, -3.8e9), (2.0 ** 127, 3.0), (-2.0 ** 127, 7.0),
        (3e38, 1e30), (m, 0.7), (-m, 1.5), (3.3e38, 2.9e38), (-3.3e38, 2.9e38), (m, -1e38),
        (m, 1.0), (m, -1.0), (m, m), (m, -m), (-m, 3e38), (2.0 ** 127, 2.0 ** 127 - 2.0 ** 103),
        # |a / b| >= 2^128 (numpy: an infinite quotient and fmod's remainder)
        (m, 1e-45), (m, -3e-45), (-3e38, 1e-40), (1e30, 1e-20), (1.0, 1e-45), (-1.0, 7e-45),
        (m, 0.5), (-m, 0.5), (2.0 ** 127, 0.5), (1e38, 3e-45), (-1e38, -7e-45), (m, 1.1e-38),
        (3e-7, 1e-45), (-5.0, 3e-44), (m, np.nextafter(np.float32(1), np.float32(0))),
        (m, -np.nextafter(np.float32(1), np.float32(0))), (m, 0.99999),
        # special cases
        (inf, 0.0), (-inf, 0.0), (inf, -0.0), (-inf, -0.0), (nan, 0.0), (nan, -0.0),
        (nan, inf), (nan, -inf), (-nan, inf), (0.0, inf), (-0.0, inf), (0.0, -inf),
        (-0.0, -inf), (inf, inf), (-inf, inf), (inf, -inf), (inf, 1.0), (-inf, -1.0),
        (inf, nan), (1.0, nan), (0.0, 0.0), (-0.0, 0.0), (1.0, 0.0), (-1.0, -0.0),
        (1e-45, inf), (-1e-45, inf), (1.0, -inf), (-1.0, inf), (m, inf), (-m, -inf)]
    a, b = np.array(pairs, np.float32).T
    return a, b


def _exponent_range(rng, n: int, lo: int, hi: int) -> np.ndarray:
    """Random signs and significands, exponent fields in [lo, hi] (0: denormals)."""
    bits = rng.integers(0, 2**23, n) | (rng.integers(lo, hi + 1, n) << 23) | \
        (rng.integers(0, 2, n) << 31)
    return bits.astype(np.uint32).view(np.float32)


def _pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The torch_api test's generator (wider), huge and tiny ratios, random bits, every pair
    of edge values, the edge pairs, and random pairs with |a| >= 2^127 or |a / b| >= 2^128."""
    rng = np.random.default_rng(seed)
    n = 20000
    e = _edge_values()
    ea, eb = (x.ravel() for x in np.meshgrid(e, e))
    a2, b2 = _edge_pairs()
    a = [np.array([-0.001, -1, 1e-45, 1e8, 1e35, 0.1, 1e35, 3], np.float32), ea, a2,
         (rng.normal(size=n) * 10.0 ** rng.integers(-3, 9, n)).astype(np.float32),
         (rng.normal(size=n) * 10.0 ** rng.integers(-37, 38, n)).astype(np.float32),
         _random_bits(rng, n), _exponent_range(rng, n, 254, 254),
         _exponent_range(rng, n, 128, 254)]
    b = [np.array([1e5, 1e8, -1, 0.1, 7, 3e38, -1, 0], np.float32), eb, b2,
         (rng.normal(size=n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32),
         (rng.normal(size=n) * 10.0 ** rng.integers(-37, 38, n)).astype(np.float32),
         _random_bits(rng, n), _exponent_range(rng, n, 0, 254),
         _exponent_range(rng, n, 0, 126)]
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_division_and_remainder_match_numpy_through_an_inexact_division(seed):
    a, b = _pairs(seed)
    finite = np.isfinite(a) & np.isfinite(b) & (b != 0)
    with np.errstate(all="ignore"):
        want_q, want_r = np.floor_divide(a, b), np.remainder(a, b)
        huge = finite & (np.abs(a.astype(np.float64) / b.astype(np.float64)) >= 2.0 ** 128)
    assert (finite & (np.abs(a) >= 2.0 ** 127)).sum() > 10000 and huge.sum() > 10000
    for em in (NumpyScalarEmitter(), InexactDivEmitter(seed)):
        with np.errstate(all="raise"):  # nothing of numpy's floating-point state is used
            q, r = _divmod_f32(em, a, b)
        name = type(em).__name__
        _assert_bits(q, want_q, a, b, f"{name}: a // b")
        _assert_bits(r, want_r, a, b, f"{name}: a % b")


_NAN = float("nan")
# numpy's answers, spelled out (signs of zeros and infinities included): a, b, a // b, a % b
_SPECIAL = [
    (np.inf, 0.0, np.inf, _NAN), (-np.inf, 0.0, -np.inf, _NAN),
    (np.inf, -0.0, -np.inf, _NAN), (-np.inf, -0.0, np.inf, _NAN), (_NAN, 0.0, _NAN, _NAN),
    (1.0, 0.0, np.inf, _NAN), (-1.0, 0.0, -np.inf, _NAN), (0.0, 0.0, _NAN, _NAN),
    (_NAN, np.inf, _NAN, _NAN), (_NAN, -np.inf, _NAN, _NAN), (np.inf, np.inf, _NAN, _NAN),
    (np.inf, 1.0, _NAN, _NAN), (1.0, _NAN, _NAN, _NAN),
    (0.0, np.inf, 0.0, 0.0), (-0.0, np.inf, -0.0, 0.0),
    (0.0, -np.inf, -0.0, -0.0), (-0.0, -np.inf, 0.0, -0.0),
    (1.0, np.inf, 0.0, 1.0), (-1.0, np.inf, -1.0, np.inf), (1.0, -np.inf, -1.0, -np.inf),
    (-1.0, -np.inf, 0.0, -1.0), (-1e-45, np.inf, -1.0, np.inf),
    # |a| >= 2^127 (f32 max // 3.8e9 was -inf), |a / b| >= 2^128 (the remainder was NaN)
    (F32_MAX, 3.8e9, 8.954799e28, 7.1692544e8), (-F32_MAX, 3.8e9, -8.954799e28, 3.0830746e9),
    (F32_MAX, 1e-45, np.inf, 0.0), (F32_MAX, -1e-45, -np.inf, -0.0),
    (-3e38, 1e-40, -np.inf, 3.262e-42), (1.0, 4e-45, np.inf, 3e-45),
    (-F32_MAX, 0.7, -np.inf, 0.583138), (F32_MAX, -0.7, -np.inf, -0.583138),
    (3e38, -1.1e-38, -np.inf, -2.905682e-39), (F32_MAX, 0.5, np.inf, 0.0)]


def test_special_cases_and_overflow_ranges_give_numpy_s_exact_answers():
    a, b, want_q, want_r = (np.array(x, np.float32) for x in zip(*_SPECIAL, strict=True))
    with np.errstate(all="ignore"):
        _assert_bits(np.floor_divide(a, b), want_q, a, b, "numpy: a // b")
        _assert_bits(np.remainder(a, b), want_r, a, b, "numpy: a % b")
    for em in (NumpyScalarEmitter(), InexactDivEmitter(0), InexactDivEmitter(1, ulps=1)):
        q, r = _divmod_f32(em, a, b)
        _assert_bits(q, want_q, a, b, f"{type(em).__name__}: a // b")
        _assert_bits(r, want_r, a, b, f"{type(em).__name__}: a % b")


@pytest.mark.parametrize("ulps", [0, 2])
def test_normal_operands_and_answers_survive_a_device_flushing_denormals(ulps):
    """Where the device does not keep denormals, normal a and b with normal numpy answers
    still match (a denormal fmod, as with b below 2^-102, is decided on scaled by 2^64);
    denormal operands or answers are left out (`_divmod_f32` documents those)."""
    rng = np.random.default_rng(9)
    n = 50000
    a0 = np.array([-9.291013e19, 0.004363525, 1.0092059e-17], np.float32)
    b0 = np.array([6.743552e-38, -6.059249e-38, -2.4280853e-38], np.float32)
    a1, b1 = _pairs(4)
    a = np.concatenate([a0, a1, _exponent_range(rng, n, 1, 60), _exponent_range(rng, n, 1, 254)])
    b = np.concatenate([b0, b1, _exponent_range(rng, n, 1, 40), _exponent_range(rng, n, 1, 30)])
    with np.errstate(all="ignore"):
        want_q, want_r = np.floor_divide(a, b), np.remainder(a, b)
    sub = lambda x: (x != 0) & (np.abs(x) < _TINY)  # noqa: E731
    keep = ~(sub(a) | sub(b) | sub(want_q) | sub(want_r))
    assert keep[:a0.size].all() and keep.sum() > 0.9 * a.size
    a, b, want_q, want_r = (x[keep] for x in (a, b, want_q, want_r))
    q, r = _divmod_f32(FlushingEmitter(ulps, ulps=ulps), a, b)
    _assert_bits(q, want_q, a, b, "a // b")
    _assert_bits(r, want_r, a, b, "a % b")


def test_the_kernel_matches_numpy_on_the_device():
    """The kernels themselves (lavapipe in CI): every edge pair and pair of edge values, and
    random ones in the overflow ranges. Where the device does not keep denormals (NVIDIA)
    denormal inputs and results are left out, as `_divmod_f32` documents."""
    import alpha_jit as aj
    from alpha_jit.runtime.device import get_device

    rng = np.random.default_rng(7)
    e = _edge_values()
    ea, eb = (x.ravel() for x in np.meshgrid(e, e))
    a2, b2 = _edge_pairs()
    a = np.concatenate([ea, a2, _random_bits(rng, 4000), _exponent_range(rng, 2000, 254, 254),
                        _exponent_range(rng, 2000, 128, 254)])
    b = np.concatenate([eb, b2, _random_bits(rng, 4000), _exponent_range(rng, 2000, 1, 254),
                        _exponent_range(rng, 2000, 0, 126)])
    with np.errstate(all="ignore"):
        want_q, want_r = np.floor_divide(a, b), np.remainder(a, b)
    if not get_device().caps.denorm_preserve_f32:
        sub = lambda x: (x != 0) & (np.abs(x) < _TINY)  # noqa: E731
        keep = ~(sub(a) | sub(b) | sub(want_r))
        a, b, want_q, want_r = (x[keep] for x in (a, b, want_q, want_r))
    q, r = aj.compile(lambda a, b: (a // b, a % b))(a, b)
    _assert_bits(q.numpy(), want_q, a, b, "device: a // b")
    _assert_bits(r.numpy(), want_r, a, b, "device: a % b")


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
