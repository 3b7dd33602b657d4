"""Elementwise ops: one scalar rule each, fused by lowering into one kernel per region.

Each op has a numpy reference (used by the reference interpreter), a VJP written with the tensor
API, and a `scalar` rule written against the abstract scalar emitter that kernel generators pass
in (`binary`, `unary`, `compare`, `select`, `cast`, `const`). Comparisons return f32 masks
(1.0 / 0.0) so they compose with arithmetic without a bool dtype.
"""

from __future__ import annotations

import math

import numpy as np

from alpha_jit.ir.ops.registry import OpDef, register
from alpha_jit.ir.ops.rules import F32, elementwise_infer, same_dtype
from alpha_jit.tensor import sum_to, where

GELU_C = math.sqrt(2.0 / math.pi)
SQRT1_2 = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _binary(name: str, ref, vjp, scalar, float_only: bool = False) -> None:
    register(OpDef(name, "elementwise", elementwise_infer(name, float_only), ref, vjp, scalar))


def _unary(name: str, ref, vjp, scalar) -> None:
    register(OpDef(name, "elementwise", elementwise_infer(name, True), ref, vjp, scalar))


def _bin(opname: str):
    return lambda e, attrs, a, b: e.binary(opname, a, b)


def _un(opname: str):
    return lambda e, attrs, a: e.unary(opname, a)


# ---- binary arithmetic ------------------------------------------------------------------------
_binary("add", lambda a, attrs: a[0] + a[1],
        lambda g, args, out, attrs: [sum_to(g, args[0].shape), sum_to(g, args[1].shape)],
        _bin("add"))
_binary("sub", lambda a, attrs: a[0] - a[1],
        lambda g, args, out, attrs: [sum_to(g, args[0].shape), sum_to(-g, args[1].shape)],
        _bin("sub"))
_binary("mul", lambda a, attrs: a[0] * a[1],
        lambda g, args, out, attrs: [sum_to(g * args[1], args[0].shape),
                                     sum_to(g * args[0], args[1].shape)],
        _bin("mul"))
_binary("div", lambda a, attrs: a[0] / a[1],
        lambda g, args, out, attrs: [sum_to(g / args[1], args[0].shape),
                                     sum_to(-g * out / args[1], args[1].shape)],
        _bin("div"), float_only=True)
_binary("maximum", lambda a, attrs: np.maximum(a[0], a[1]),
        lambda g, args, out, attrs: [sum_to(g * (args[0] >= args[1]), args[0].shape),
                                     sum_to(g * (args[0] < args[1]), args[1].shape)],
        _bin("max"))
_binary("minimum", lambda a, attrs: np.minimum(a[0], a[1]),
        lambda g, args, out, attrs: [sum_to(g * (args[0] <= args[1]), args[0].shape),
                                     sum_to(g * (args[0] > args[1]), args[1].shape)],
        _bin("min"))

# ---- comparisons: f32 masks, no gradient ---------------------------------------------------------
_CMP = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
        "eq": np.equal, "ne": np.not_equal}
for _name, _fn in _CMP.items():
    register(OpDef(
        _name, "elementwise", elementwise_infer(_name, out_dtype=F32),
        (lambda fn: lambda a, attrs: fn(a[0], a[1]).astype(np.float32))(_fn),
        lambda g, args, out, attrs: [None, None],
        (lambda nm: lambda e, attrs, a, b: e.cast(e.compare(nm, a, b), "f32"))(_name)))

# ---- unary math -------------------------------------------------------------------------------
# neg and abs are defined on integers too
_binary("neg", lambda a, attrs: -a[0], lambda g, args, out, attrs: [-g], _un("neg"))
_unary("exp", lambda a, attrs: np.exp(a[0]), lambda g, args, out, attrs: [g * out], _un("exp"))
_unary("log", lambda a, attrs: np.log(a[0]), lambda g, args, out, attrs: [g / args[0]],
       _un("log"))
_unary("tanh", lambda a, attrs: np.tanh(a[0]),
       lambda g, args, out, attrs: [g * (1.0 - out * out)], _un("tanh"))
_unary("sqrt", lambda a, attrs: np.sqrt(a[0]),
       lambda g, args, out, attrs: [g * 0.5 / out], _un("sqrt"))
_unary("rsqrt", lambda a, attrs: 1.0 / np.sqrt(a[0]),
       lambda g, args, out, attrs: [g * -0.5 * out * out * out], _un("rsqrt"))
_binary("abs", lambda a, attrs: np.abs(a[0]),
       lambda g, args, out, attrs: [g * ((args[0] > 0.0) - (args[0] < 0.0))], _un("abs"))
_unary("relu", lambda a, attrs: np.maximum(a[0], 0),
       lambda g, args, out, attrs: [g * (args[0] > 0.0)],
       lambda e, attrs, a: e.binary("max", a, e.const(0.0, "f32")))
# NaN past |x| = 1e5, where the kernels' exact argument reduction ends (codegen_spirv/mathlib)
_unary("sin", lambda a, attrs: _bounded_np(np.sin, a[0]),
       lambda g, args, out, attrs: [g * args[0].cos()], _un("sin"))
_unary("cos", lambda a, attrs: _bounded_np(np.cos, a[0]),
       lambda g, args, out, attrs: [-g * args[0].sin()], _un("cos"))
# erf'(x) = 2/sqrt(pi) exp(-x^2)
_unary("erf", lambda a, attrs: _erf(a[0]),
       lambda g, args, out, attrs: [g * (2.0 / math.sqrt(math.pi)) * (-args[0] * args[0]).exp()],
       _un("erf"))
# floor and floor division are flat: no gradient (PyTorch: zero); integers stay integers
register(OpDef("floor", "elementwise", elementwise_infer("floor"),
               lambda a, attrs: np.floor(a[0]).astype(a[0].dtype),
               lambda g, args, out, attrs: [None], _un("floor")))


def _two_prod(e, x, y, p):
    """The rounding error of p = x * y, exactly (Dekker: no fma needed; every op is
    NoContraction through the emitter)."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    mul, sub, add = (lambda u, v, op=op: e.binary(op, u, v) for op in ("mul", "sub", "add"))

    def split(v):
        t = mul(c(4097.0), v)
        hi = sub(t, sub(t, v))
        return hi, sub(v, hi)

    xh, xl = split(x)
    yh, yl = split(y)
    return add(add(add(sub(mul(xh, yh), p), mul(xh, yl)), mul(xl, yh)), mul(xl, yl))


def _scale64(e, x):
    """x * 2^(64 j) and j for x >= 0: a finite nonzero x lands in [2^-32, 2^32] (two steps
    cover f32 from 2^-149 to 2^128); 0, inf and NaN stay out of that range."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    j = c(0.0)
    for _ in range(2):
        up, down = e.compare("lt", x, c(2.0 ** -32)), e.compare("gt", x, c(2.0 ** 32))
        x = e.binary("mul", x, e.select(up, c(2.0 ** 64), e.select(down, c(2.0 ** -64), c(1.0))))
        j = e.binary("add", j, e.select(up, c(1.0), e.select(down, c(-1.0), c(0.0))))
    return x, j


def _residual(e, a, b, q):
    """a - q b, exact where q is within an ulp of a / b and no step under- or overflows
    (a - q b rounded is then exact: Sterbenz for a - RN(q b), and the rest fits 24 bits)."""
    p = e.binary("mul", q, b)
    return e.binary("sub", e.binary("sub", a, p), _two_prod(e, q, b, p))


# x + x * _ULP_STEP is the next float above a positive normal x, x - x * _ULP_STEP the one
# below: x * _ULP_STEP lies strictly between half an ulp and an ulp (just over, at 2^k)
_ULP_STEP = 2.0 ** -24 + 2.0 ** -46


def _divisor(e, b):
    """What `_div_rn` needs of a divisor, built once for several divisions by it: b, |b|
    scaled into [2^-32, 2^32] (B = |b| 2^(64 jb)), jb, and an approximate 1 / B."""
    B, jb = _scale64(e, e.unary("abs", b))
    return b, B, jb, e.binary("div", e.const(1.0, "f32"), B)


def _div_rn(e, a, b, by=None):
    """a / b correctly rounded (IEEE, ties to even) for f32, from a division that may be a few
    ulp off (Vulkan allows OpFDiv 2.5 ulp; NVIDIA's is not correctly rounded). `by`: the
    `_divisor(e, b)` to reuse.

    Zeros, infinities, NaN and b = 0 are `e.binary("div")`'s (which spells those out). Other
    operands are scaled by powers of two into [2^-32, 2^32], where no product below under- or
    overflows; there q0 = A (1 / B), one Newton step with an exact residual gives q1 within an
    ulp of A / B, and the exact residual of q1 against half the gap to its neighbour decides
    the rounding (a quotient of two floats is never exactly halfway between two normal floats).
    Scaling back is exact, overflows to inf as IEEE does, and a subnormal result is rounded to
    the subnormal grid once, from the sign of the residual (no double rounding)."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    cmp, sel = e.compare, e.select
    add, sub, mul = (lambda u, v, op=op: e.binary(op, u, v) for op in ("add", "sub", "mul"))
    both = lambda x, y: sel(x, y, x)  # noqa: E731
    either = lambda x, y: sel(x, x, y)  # noqa: E731
    inside = lambda v: both(cmp("ge", v, c(2.0 ** -32)), cmp("le", v, c(2.0 ** 32)))  # noqa: E731
    b, B, jb, recip = by if by is not None else _divisor(e, b)
    A, ja = _scale64(e, e.unary("abs", a))
    regular = both(inside(A), inside(B))
    q0 = mul(A, recip)
    q1 = add(q0, mul(_residual(e, A, B, q0), recip))  # a few ulp moved; error ~2^-20 ulp
    r1 = _residual(e, A, B, q1)  # exact: A / B - q1 = r1 / B
    up, down = add(q1, mul(q1, c(_ULP_STEP))), sub(q1, mul(q1, c(_ULP_STEP)))
    half_up = mul(mul(sub(up, q1), c(0.5)), B)  # half the gap above q1, times B: exact
    half_down = mul(mul(sub(q1, down), c(0.5)), B)  # below 2^k the gap is half as wide
    go_up, go_down = cmp("gt", r1, half_up), cmp("lt", r1, e.unary("neg", half_down))
    q = sel(go_up, up, sel(go_down, down, q1))
    rq = sub(r1, mul(sub(q, q1), B))  # the sign of A / B - q (a subtraction keeps it)
    # a subnormal result: round q to the grid g that scales to 2^-149 (adding 2^23 g rounds
    # to g, ties to even); where q was exactly halfway, the residual says which way
    k = sub(jb, ja)  # the result is q 2^(64 k)
    km1, km2, km3 = (cmp("eq", k, c(v)) for v in (-1.0, -2.0, -3.0))
    g = sel(km1, c(2.0 ** -85), sel(km2, c(2.0 ** -21), c(2.0 ** 43)))
    top = mul(g, c(2.0 ** 23))  # 2^-126 once scaled
    tiny = both(either(km1, either(km2, km3)), cmp("lt", q, top))
    qg = sub(add(q, top), top)
    d = sub(qg, q)
    tie = cmp("eq", e.unary("abs", d), mul(g, c(0.5)))
    wrong = sel(cmp("gt", d, c(0.0)), cmp("lt", rq, c(0.0)), cmp("gt", rq, c(0.0)))
    qg = sel(both(tie, wrong), sub(q, d), qg)  # the other neighbour, as far from q
    m = sel(tiny, qg, q)
    for _ in range(4):  # k in [-4, 4]; each step is exact until one overflows (or gives 0)
        kup, kdown = cmp("gt", k, c(0.0)), cmp("lt", k, c(0.0))
        m = mul(m, sel(kup, c(2.0 ** 64), sel(kdown, c(2.0 ** -64), c(1.0))))
        k = sub(k, sel(kup, c(1.0), sel(kdown, c(-1.0), c(0.0))))
    against = sel(cmp("lt", a, c(0.0)), cmp("gt", b, c(0.0)), cmp("lt", b, c(0.0)))
    return sel(regular, sel(against, e.unary("neg", m), m), e.binary("div", a, b))


_FMOD_STEPS = 31  # then 8 bits of ea - eb each: ea - eb <= 253 = 7 + 8 * 31


def _fmod_scaled(e, a, b):
    """C's fmodf(a, b) for finite a and finite nonzero b with |a| >= |b|, exact (an fmod is
    always a float) and scaled: (fmod(a, b) s, s, 1 / s), where s (2^64, 1 or 2^-64) brings
    |b| into [2^-62, 2^100), so that the scaled fmod is never a denormal (a device that does
    not keep them would lose it; only the unscaled remainder itself may be one).

    No float division, so nothing rounds whatever the ratio (up to 2^277): on the integer
    significands |a| = ma 2^ea, |b| = mb 2^eb (below 2^24; denormals have no implicit bit),
    fmod = (ma 2^(ea - eb) mod mb) 2^eb, reduced in u32 8 bits of ea - eb at a time (r < mb,
    so r 2^8 fits). r 2^eb s is then exact: r times the unit of mb in |b| s, its ulp."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    u = lambda v: e.const(v, "u32")  # noqa: E731
    cmp, sel = e.compare, e.select
    add, sub, mul, div, band, shr = (lambda x, y, op=op: e.binary(op, x, y)
                                     for op in ("add", "sub", "mul", "div", "and", "shr"))
    ua, ub = band(e.bits(a), u(0x7FFFFFFF)), band(e.bits(b), u(0x7FFFFFFF))

    def significand(x):  # and the exponent field as a denormal's counts it (1, not 0)
        field = shr(x, u(23))
        normal = cmp("ne", field, u(0))
        return add(band(x, u(0x7FFFFF)), sel(normal, u(0x800000), u(0))), sel(normal, field, u(1))

    ma, ea = significand(ua)
    mb, eb = significand(ub)
    mb = sel(cmp("eq", mb, u(0)), u(1), mb)  # b = 0 (a NaN lane): no u32 / 0
    mod = lambda t: sub(t, mul(div(t, mb), mb))  # noqa: E731
    d = sub(ea, eb)  # other lanes (|a| < |b|: ea < eb) wrap around, and are not used
    r = mod(mul(mod(ma), shr(u(128), sub(u(7), band(d, u(7))))))  # d mod 8 first
    n = shr(d, u(3))
    for i in range(_FMOD_STEPS):
        r = mod(mul(r, sel(cmp("gt", n, u(i)), u(256), u(1))))
    ab = e.unary("abs", b)
    small, big = cmp("lt", ab, c(2.0 ** -60)), cmp("ge", ab, c(2.0 ** 100))
    s = sel(small, c(2.0 ** 64), sel(big, c(2.0 ** -64), c(1.0)))
    bs = mul(ab, s)
    unit = sub(add(bs, mul(bs, c(_ULP_STEP))), bs)  # the next float up, less |b| s: its ulp
    unit = sel(cmp("lt", ub, u(0x800000)), c(2.0 ** -85), unit)  # a denormal's 2^-149, scaled
    mag = mul(e.cast(r, "f32"), unit)
    fmod = sel(cmp("lt", a, c(0.0)), e.unary("neg", mag), mag)
    return fmod, s, sel(small, c(2.0 ** -64), sel(big, c(2.0 ** 64), c(1.0)))


def _divmod_f32(e, a, b):
    """numpy's float floor division and remainder, bit for bit (signed zeros, infinities and
    NaN included): numpy's own steps (npy_divmodf) from an exact fmod,

        mod = fmod(a, b); div = (a - mod) / b     (fmod: NaN for a = +-inf, b = 0 or NaN)
        mod != 0 (NaN too) and its sign not b's: mod += b, div -= 1
        mod == 0: mod = +-0 with b's sign
        div != 0: floor(div), plus 1 where div - floor(div) > 0.5 (div is near an integer)
        div == 0: +-0 with the sign of a / b
        b == 0: a / b (+-inf or NaN), remainder NaN.

    fmod is a where |a| < |b|, else `_fmod_scaled`'s, and where it is scaled these steps are
    too (exactly: fmod + b is exact there, a multiple of b's ulp below |b|), so that a
    denormal fmod is never what a device that does not keep denormals decides on (normal a
    and b, normal answers). The division is `_div_rn`'s, correctly rounded whatever the
    device's (Vulkan allows OpFDiv 2.5 ulp; NVIDIA's is off by one on large quotients),
    overflowing to inf as numpy's does; a - mod never overflows (|mod| <= |a|, same sign).
    Where the device does not keep f32 denormals (`Capabilities.denorm_preserve_f32` false) a
    denormal a or b may be read as zero (1e-45 // -1 is then -0, not numpy's -1), and a
    denormal remainder may be flushed to zero."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    cmp, sel = e.compare, e.select
    add, sub, mul = (lambda x, y, op=op: e.binary(op, x, y) for op in ("add", "sub", "mul"))
    aa, ab = e.unary("abs", a), e.unary("abs", b)
    finite_a = cmp("lt", aa, c(math.inf))
    ok = sel(finite_a, cmp("gt", ab, c(0.0)), finite_a)  # finite a, nonzero b (not NaN)
    lesser = cmp("lt", aa, ab)  # fmod = a (b = +-inf too)
    fmod_s, s, unscale = _fmod_scaled(e, a, b)
    nan = c(math.nan)
    fmod = sel(ok, sel(lesser, a, mul(fmod_s, unscale)), nan)
    fmod_s = sel(ok, sel(lesser, a, fmod_s), nan)  # fmod's sign and zero, for the decisions
    b_neg = cmp("lt", b, c(0.0))
    nonzero = cmp("ne", fmod_s, c(0.0))
    moved = sel(nonzero, sel(b_neg, cmp("gt", fmod_s, c(0.0)), cmp("lt", fmod_s, c(0.0))),
                nonzero)
    r = sel(cmp("eq", fmod_s, c(0.0)), sel(b_neg, c(-0.0), c(0.0)), fmod)
    r = sel(moved, sel(lesser, add(a, b), mul(add(fmod_s, mul(b, s)), unscale)), r)
    # a - fmod scaled as fmod is where b is small (and a not too large for it): the same
    # ratio, without a denormal fmod (where |a| < |b|, a - a is +0 whatever the scale)
    small = cmp("lt", ab, c(2.0 ** -60))
    up = sel(small, cmp("lt", aa, c(2.0 ** 60)), small)
    sa = sel(up, c(2.0 ** 64), c(1.0))
    num = sub(mul(a, sa), sel(lesser, mul(a, sa), sel(up, fmod_s, fmod)))
    div = _div_rn(e, num, mul(b, sa))
    div = sel(moved, sub(div, c(1.0)), div)
    near = e.unary("floor", div)
    near = sel(cmp("gt", sub(div, near), c(0.5)), add(near, c(1.0)), near)
    a_by_b = e.binary("div", a, b)  # the sign of a zero quotient; b = 0's whole answer
    q = sel(cmp("ne", div, c(0.0)), near, mul(a_by_b, c(0.0)))
    return sel(cmp("eq", b, c(0.0)), a_by_b, q), r


def _floordiv_scalar(e, attrs, a, b):
    """numpy's a // b: integers floor-divide; floats take `_divmod_f32`, exact whatever the
    device's division. Where the device does not keep f32 denormals
    (`Capabilities.denorm_preserve_f32` false) denormal inputs may be flushed to zero first."""
    if a.dtype != "f32":
        return e.binary("div", a, b)  # integers: floor division already
    return _divmod_f32(e, a, b)[0]


def _remainder_scalar(e, attrs, a, b):
    if a.dtype != "f32":
        return e.binary("sub", a, e.binary("mul", e.binary("div", a, b), b))
    return _divmod_f32(e, a, b)[1]


register(OpDef("floordiv", "elementwise", elementwise_infer("floordiv"),
               lambda a, attrs: np.floor_divide(a[0], a[1]),
               lambda g, args, out, attrs: [None, None], _floordiv_scalar))
# Python's and PyTorch's remainder (the divisor's sign); d/db = -floor(a / b)
register(OpDef("remainder", "elementwise", elementwise_infer("remainder"),
               lambda a, attrs: np.remainder(a[0], a[1]),
               lambda g, args, out, attrs: [
                   sum_to(g, args[0].shape),
                   sum_to(-g * _floordiv(args[0], args[1]), args[1].shape)],
               _remainder_scalar))


def _floordiv(a, b):
    from alpha_jit.ir import trace

    return trace.apply("floordiv", [a, b])


def _bounded_np(fn, x: np.ndarray) -> np.ndarray:
    from alpha_jit.codegen_spirv.mathlib import SIN_COS_MAX

    with np.errstate(invalid="ignore"):
        return np.where(np.abs(x) <= SIN_COS_MAX, fn(x), np.nan).astype(x.dtype)


def _erf(x: np.ndarray) -> np.ndarray:
    from alpha_jit.codegen_spirv.scalar import erf_np

    return erf_np(x)


def _is_nan(e, x):
    """NaN test on the bits (a float NaN test may be folded away by a driver)."""
    return e.compare("gt", e.binary("and", e.bits(x), e.const(0x7FFFFFFF, "u32")),
                     e.const(0x7F800000, "u32"))


def _pow_scalar(e, attrs, a):
    """numpy's x ** c for a constant c. Integer exponents multiply (exact for negative x);
    others use GLSL Pow on |x|, which leaves 0, negatives and NaN undefined, so those are
    selected explicitly."""
    c = float(attrs["exponent"])
    if c == 0.0:
        return e.const(1.0, "f32")  # numpy: x ** 0 == 1 even for NaN
    if c == 0.5:
        return e.unary("sqrt", a)  # numpy's own fast path: (-inf) ** 0.5 is NaN, as sqrt
    if c.is_integer() and abs(c) <= 16:
        n, acc, base = int(abs(c)), None, a
        while n:  # exponentiation by squaring
            if n & 1:
                acc = base if acc is None else e.binary("mul", acc, base)
            n >>= 1
            if n:
                base = e.binary("mul", base, base)
        return acc if c > 0 else e.binary("div", e.const(1.0, "f32"), acc)
    zero = e.const(0.0, "f32")
    r = e.binary("pow", e.unary("abs", a), e.const(c, "f32"))
    r = e.select(e.compare("eq", a, zero), e.const(0.0 if c > 0 else math.inf, "f32"), r)
    r = e.select(e.compare("lt", a, zero), e.const(math.nan, "f32"), r)
    # (-inf) ** c is inf (c > 0) or 0, not NaN
    r = e.select(e.compare("eq", a, e.const(-math.inf, "f32")),
                 e.const(math.inf if c > 0 else 0.0, "f32"), r)
    return e.select(_is_nan(e, a), a, r)


_unary("pow_scalar", lambda a, attrs: np.power(a[0], attrs["exponent"]),
       lambda g, args, out, attrs: [g * attrs["exponent"] *
                                    args[0] ** (attrs["exponent"] - 1.0)],
       _pow_scalar)


def _pow_tensor(e, attrs, a, b):
    """numpy's a ** b for tensors: GLSL Pow on |a|, then the cases Pow leaves undefined (a <= 0,
    NaN) and the ones IEEE fixes (x ** 0 = 1, 1 ** y = 1, (-1) ** +-inf = 1) spelled out."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    cmp = e.compare
    mag = e.binary("pow", e.unary("abs", a), b)
    at0 = e.select(cmp("gt", b, c(0.0)), c(0.0), e.select(cmp("lt", b, c(0.0)), c(math.inf),
                                                          c(1.0)))
    mag = e.select(cmp("eq", a, c(0.0)), at0, mag)
    is_int = cmp("eq", e.unary("floor", b), b)
    odd = cmp("ne", e.binary("mul", e.unary("floor", e.binary("mul", b, c(0.5))), c(2.0)), b)
    neg = e.select(is_int, e.select(odd, e.unary("neg", mag), mag), c(math.nan))
    r = e.select(cmp("lt", a, c(0.0)), neg, mag)
    r = e.select(_is_nan(e, a), a, e.select(_is_nan(e, b), b, r))
    unit_inf = cmp("eq", e.unary("abs", a), c(1.0))
    unit_inf = e.select(cmp("eq", e.unary("abs", b), c(math.inf)), unit_inf, cmp("eq", a, c(1.0)))
    r = e.select(unit_inf, c(1.0), r)
    return e.select(cmp("eq", b, c(0.0)), c(1.0), r)


def _pow_vjp(g, args, out, attrs):
    """PyTorch's: d/da = b a^(b-1) (0 where b == 0), d/db = out log(a) (0 where a == 0 and
    b >= 0)."""
    from alpha_jit.ir import trace

    a, b = args
    da = where(b.eq(0.0), 0.0, b * trace.apply("pow", [a, b - 1.0]))
    db = where(a.eq(0.0) * (b >= 0.0), 0.0, out * a.log())
    return [sum_to(g * da, a.shape), sum_to(g * db, b.shape)]


_binary("pow", lambda a, attrs: np.power(a[0], a[1]), _pow_vjp, _pow_tensor, float_only=True)


# ---- GELU: exact (erf, PyTorch's default) or the tanh form (GPT-2's) ---------------------------
def _exact(attrs) -> bool:
    """attrs["approximate"]: "none" (erf) or "tanh"; nodes from before the attribute are tanh."""
    return attrs.get("approximate", "tanh") == "none"


def _gelu_ref(a, attrs):
    x = a[0]
    if _exact(attrs):
        from alpha_jit.codegen_spirv.scalar import erf_np

        return 0.5 * x * (1.0 + erf_np(x * np.float32(SQRT1_2)))
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x ** 3)))


def _gelu_scalar(e, attrs, x):
    c = lambda v: e.const(v, "f32")  # noqa: E731
    mul, add = (lambda a, b: e.binary("mul", a, b)), (lambda a, b: e.binary("add", a, b))
    if _exact(attrs):
        return mul(mul(c(0.5), x), add(c(1.0), e.unary("erf", mul(x, c(SQRT1_2)))))
    # x * 0.5 (1 + tanh u) through one exp and one division: a third of a full tanh's
    # instructions (no small-|u| branch); exactly x where tanh saturates to 1, and x q (tiny,
    # then 0 once q underflows) where it saturates to -1
    return mul(x, _gelu_halves(e, x)[0])


def _gelu_halves(e, x):
    """(0.5 (1 + tanh u), 0.5 (1 - tanh u)) of GELU's tanh form, u = sqrt(2/pi) (x + 0.044715
    x^3), as 1 / (1 + q) and q / (1 + q) with q = e^-2|u| <= 1: no overflow, and neither
    half is a difference of nearly equal numbers (1 + tanh u is one for u < 0)."""
    c = lambda v: e.const(v, "f32")  # noqa: E731
    mul, add = (lambda a, b: e.binary("mul", a, b)), (lambda a, b: e.binary("add", a, b))
    u = mul(c(GELU_C), add(x, mul(c(0.044715), mul(mul(x, x), x))))
    q = e.unary("exp", mul(c(-2.0), e.unary("abs", u)))
    # 1 + q is in [1, 2] (or NaN where x is, and x's NaN reaches the result through the
    # final product): the plain division; ieee_div's special cases cost about 3% of a GELU GEMM
    # (8192 x 3072 x 768 with its bias and two bf16 outputs, H200)
    big = e.binary("div_normal", c(1.0), add(c(1.0), q))
    small = mul(q, big)
    up = e.compare("ge", u, c(0.0))
    return e.select(up, big, small), e.select(up, small, big)


def _gelu_grad_ref(a, attrs):
    x, g = a
    if _exact(attrs):
        from alpha_jit.codegen_spirv.scalar import erf_np

        cdf = 0.5 * (1.0 + erf_np(x * np.float32(SQRT1_2)))
        return g * (cdf + x * np.exp(-0.5 * x * x) * np.float32(INV_SQRT_2PI))
    t = np.tanh(GELU_C * (x + 0.044715 * x ** 3))
    dt = (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return g * (0.5 * (1.0 + t) + 0.5 * x * dt)


def _gelu_grad_scalar(e, attrs, x, g):
    c = lambda v: e.const(v, "f32")  # noqa: E731
    mul, add = (lambda a, b: e.binary("mul", a, b)), (lambda a, b: e.binary("add", a, b))
    x2 = mul(x, x)
    if _exact(attrs):
        cdf = mul(c(0.5), add(c(1.0), e.unary("erf", mul(x, c(SQRT1_2)))))
        pdf = mul(e.unary("exp", mul(c(-0.5), x2)), c(INV_SQRT_2PI))
        return mul(g, add(cdf, mul(x, pdf)))
    # with s, r the halves (1 + t = 2s, 1 - t^2 = 4 s r): the tanh form's derivative
    # s + 2 C x (s r) (1 + 3 * 0.044715 x^2), without a tanh or a cancellation; s r first, so
    # a huge negative x gives 0 (s = 0) as the reference does, not 0 * inf
    s, r = _gelu_halves(e, x)
    slope = mul(mul(mul(c(2 * GELU_C), x), mul(s, r)), add(c(1.0), mul(c(3 * 0.044715), x2)))
    return mul(g, add(s, slope))


def _gelu_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    return [trace.apply("gelu_grad", [args[0], g], dict(attrs))]


_unary("gelu", _gelu_ref, _gelu_vjp, _gelu_scalar)
register(OpDef("gelu_grad", "elementwise", elementwise_infer("gelu_grad", True),
               _gelu_grad_ref, None, _gelu_grad_scalar))


# ---- select, cast, copy -----------------------------------------------------------------------
def _where_infer(shapes, dts, attrs):
    from alpha_jit.ir.ops.rules import broadcast_shapes

    dt = same_dtype("where", shapes[1:], dts[1:])
    return broadcast_shapes("where", shapes), dt


register(OpDef(
    "where", "elementwise", _where_infer,
    lambda a, attrs: np.where(a[0] != 0, a[1], a[2]),
    lambda g, args, out, attrs: [None, sum_to(where(args[0], g, 0.0), args[1].shape),
                                 sum_to(where(args[0], 0.0, g), args[2].shape)],
    lambda e, attrs, c, a, b: e.select(e.compare("ne", e.cast(c, "f32"), e.const(0.0, "f32")),
                                       a, b),
    nondiff_args=(0,)))


def _cast_infer(shapes, dts, attrs):
    from alpha_jit import dtypes

    return shapes[0], dtypes.dtype(attrs["dtype"])


def _cast_vjp(g, args, out, attrs):
    return [g.astype(args[0].dtype) if args[0].dtype.is_float else None]


register(OpDef("cast", "elementwise", _cast_infer,
               lambda a, attrs: a[0].astype(_np_of(attrs["dtype"])), _cast_vjp,
               lambda e, attrs, a: e.cast(a, str(attrs["dtype"]))))


def _np_of(dt) -> np.dtype:
    from alpha_jit import dtypes

    return dtypes.to_numpy(dtypes.dtype(dt))


register(OpDef("copy", "elementwise", lambda s, d, attrs: (s[0], d[0]),
               lambda a, attrs: np.array(a[0], copy=True), lambda g, args, out, attrs: [g],
               lambda e, attrs, a: a))
# x.detach(): the same values, no gradient back through them
register(OpDef("stop_gradient", "elementwise", lambda s, d, attrs: (s[0], d[0]),
               lambda a, attrs: np.array(a[0], copy=True), lambda g, args, out, attrs: [None],
               lambda e, attrs, a: a))


# ---- float classification: integer bit tests, which fast-math folding cannot remove ----------
def _isfinite_scalar(e, attrs, x):
    exp_mask = e.const(0x7F800000, "u32")
    return e.cast(e.compare("ne", e.binary("and", e.bits(x), exp_mask), exp_mask), "f32")


register(OpDef("isfinite", "elementwise", elementwise_infer("isfinite", True, F32),
               lambda a, attrs: np.isfinite(a[0]).astype(np.float32),
               lambda g, args, out, attrs: [None], _isfinite_scalar))
