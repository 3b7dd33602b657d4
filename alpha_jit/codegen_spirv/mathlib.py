"""f32 sin, cos and erf as polynomials, the same on every driver.

Why: Vulkan bounds GLSL.std.450 Sin/Cos only to 2^-11 absolute error, and only on [-pi, pi];
outside that range a driver may return anything, and there is no erf at all (PyTorch's default
GELU needs one). sin/cos reduce by pi/2 in four parts of 8, 8, 8 and 24 bits (Cody-Waite:
each k * part is exact for |k| < 2^16, so the reduction is exact to ~1e-12 up to |x| = 1e5)
and use Cephes' minimax polynomials on [-pi/4, pi/4] (about 1 ulp). Beyond |x| = 1e5 a
reduction without a 2/pi bit table would be wrong, so the result is NaN: loud, never a quiet
wrong value (reduce such arguments first, e.g. positions times frequencies modulo 2 pi). erf
is a Taylor series near 0 and the Numerical Recipes erfc fit (fractional error < 1.2e-7)
elsewhere. NaN and inf give numpy's results (sin/cos of inf is NaN, erf(+-inf) = +-1).
"""

from __future__ import annotations

import math

from .dsl import KernelBuilder, Value

# pi/2 = sum of these (to 5e-17): 8-bit parts, so k * part is exact in f32 for |k| < 2^16
_PIO2 = (1.5703125, 0.000484466552734375, -6.407499313354492e-07, 9.92093629470503e-10)
SIN_COS_MAX = 1e5  # beyond: NaN (k would pass 2^16)
_SIN = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)
# 2/sqrt(pi) * (-1)^n / (n! (2n+1)): erf's Taylor coefficients of x^(2n+1)
_ERF_TAYLOR = tuple(2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))
                    for n in range(7))
_ERFC_NR = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
            -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _horner(x: Value, coeffs: tuple[float, ...]) -> Value:
    """c0 + x * (c1 + x * (...)), coefficients lowest first."""
    acc = x.kb.f32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def _finite(kb: KernelBuilder, x: Value) -> Value:
    return (kb.bitcast(x, "u32") & 0x7F800000) != 0x7F800000


def _nan(kb: KernelBuilder) -> Value:
    return kb.bitcast(kb.const(0x7FC00000, "u32"), "f32")


def sin_cos(kb: KernelBuilder, x: Value, which: str) -> Value:
    """sin(x) (which="sin") or cos(x) (which="cos") of an f32."""
    k = kb.glsl("RoundEven", "f32", x * (2.0 / math.pi))
    r = x
    for part in _PIO2:  # r in [-pi/4, pi/4]
        r = r - k * part
    r2 = r * r
    s = r + r * r2 * _horner(r2, _SIN)
    c = 1.0 - r2 * 0.5 + r2 * r2 * _horner(r2, _COS)
    # the quadrant, from k's low two bits (cos(x) = sin(x + pi/2): one quadrant on)
    q = kb.cast(kb.cast(k, "i32") & 3, "u32")
    if which == "cos":
        q = (q + 1) & 3
    swap = (q & 1) == 1
    v = kb.select(swap, c, s)
    v = kb.select(q >= 2, -v, v)
    # inf -> NaN, NaN stays NaN, and past the exact reduction NaN as well
    return kb.select(_finite(kb, x) & (kb.abs(x) <= SIN_COS_MAX), v, _nan(kb))


def erf(kb: KernelBuilder, x: Value) -> Value:
    """erf(x) of an f32."""
    ax = kb.abs(x)
    x2 = x * x
    small = x * _horner(x2, _ERF_TAYLOR)
    t = 1.0 / (ax * 0.5 + 1.0)
    erfc = t * kb.exp(_horner(t, _ERFC_NR) - x2)
    big = 1.0 - erfc
    big = kb.select(x < 0.0, -big, big)
    out = kb.select(ax < 0.5, small, big)
    is_nan = (kb.bitcast(x, "u32") & 0x7FFFFFFF) > 0x7F800000
    return kb.select(is_nan, x, out)
