"""The abstract scalar emitter that op definitions write their elementwise rules against.

Why: an op's scalar rule is written once (`e.binary("add", a, b)`, `e.unary("exp", a)`, ...)
and run by two interpreters with the same method names: `ScalarEmitter` emits SPIR-V through the
kernel DSL, `NumpyScalarEmitter` computes with numpy, so the IR can check that a rule means the
same thing on the device as in the reference. Semantics both sides share:

- float values compute in f32 (f16/bf16 constants become f32), integers in i32;
- `div` on integers is floor division (numpy `//`); `max`/`min` are elementwise and, like
  numpy's maximum/minimum, return NaN when either operand is NaN (GLSL's FMax need not);
- `compare` returns bool; `cast(x, "f32"|"i32")` truncates toward zero and maps bool to 1/0.
"""

from __future__ import annotations

import numpy as np

from . import mathlib
from .dsl import KernelBuilder, Value

# "div_normal": a / b where b is known to be a normal finite number (or NaN, which the rule
# propagates anyway): the device's division without `ieee_div`'s special cases
BINARY_OPS = ("add", "sub", "mul", "div", "div_normal", "max", "min", "pow", "xor", "shr",
              "and")
UNARY_OPS = ("neg", "exp", "log", "tanh", "sqrt", "rsqrt", "abs", "floor", "sin", "cos", "erf")
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
# Storage dtypes compute in a wider type: every float in f32.
_COMPUTE = {"f32": "f32", "f16": "f32", "bf16": "f32", "i32": "i32", "bool": "bool",
            "u32": "u32"}


def compute_dtype(dtype: str) -> str:
    """The dtype a stored value is computed in ("f16"/"bf16" -> "f32")."""
    try:
        return _COMPUTE[str(dtype)]
    except KeyError:
        raise TypeError(f"no compute dtype for {dtype!r}") from None


def is_nan(kb: KernelBuilder, x: Value) -> Value:
    """NaN test on the bits: drivers may fold OpIsNan away when they assume no NaNs."""
    return (kb.bitcast(x, "u32") & 0x7FFFFFFF) > 0x7F800000


def _exact(v: Value) -> Value:
    """Mark a float result NoContraction: without it NVIDIA's compiler reassociates
    a - (a + c) into -c, which is wrong for a = ±inf (NaN) and differs from numpy's rounding."""
    if v.dtype == "f32":
        v.kb.m.emit("OpDecorate", v.id, "NoContraction")
    return v


def _bits_f32(kb: KernelBuilder, bits: int) -> Value:
    """An f32 constant given by its bits (NaN and inf, whatever the builder does with them)."""
    return kb.bitcast(kb.const(bits, "u32"), "f32")


def ieee_div(kb: KernelBuilder, a: Value, b: Value) -> Value:
    """a / b with IEEE results where Vulkan's precision rules leave division undefined
    (b = ±0 or ±inf; lavapipe folds x / 0.0 to 0): ±inf, ±0 or NaN as numpy gives."""
    sign = (kb.bitcast(a, "u32") ^ kb.bitcast(b, "u32")) & 0x80000000
    a_mag = kb.bitcast(a, "u32") & 0x7FFFFFFF
    b_mag = kb.bitcast(b, "u32") & 0x7FFFFFFF
    inf = kb.bitcast(sign | 0x7F800000, "f32")
    zero = kb.bitcast(sign, "f32")
    nan = _bits_f32(kb, 0x7FC00000)
    by_zero = kb.select((a_mag == 0) | (a_mag > 0x7F800000), nan, inf)  # 0/0, NaN/0: NaN
    by_inf = kb.select(a_mag >= 0x7F800000, nan, zero)  # inf/inf, NaN/inf: NaN
    r = kb.select(b_mag == 0, by_zero, kb.select(b_mag == 0x7F800000, by_inf, a / b))
    return kb.select(b_mag > 0x7F800000, b, r)  # x / NaN


def nan_minmax(kb: KernelBuilder, op: str, a: Value, b: Value) -> Value:
    """Elementwise max/min with numpy's NaN rule: NaN if either operand is NaN."""
    m = kb.fmax(a, b) if op == "max" else kb.fmin(a, b)
    if a.dtype != "f32":
        return m
    return kb.select(is_nan(kb, a), a, kb.select(is_nan(kb, b), b, m))


def _order_key(kb: KernelBuilder, x: Value) -> Value:
    """An i32 whose signed order is the float order, with every NaN above +inf."""
    b = kb.select(is_nan(kb, x), kb.const(0x7FC00000, "i32"), kb.bitcast(x, "i32"))
    return kb.select(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats order backwards


def subgroup_max(kb: KernelBuilder, x: Value) -> Value:
    """Subgroup max of f32 that returns NaN if any lane holds NaN (FMax drops NaNs)."""
    k = kb.subgroup_reduce("max", _order_key(kb, x))
    return kb.bitcast(kb.select(k < 0, k ^ 0x7FFFFFFF, k), "f32")  # the key map is its inverse


class ScalarEmitter:
    """Scalar rules -> SPIR-V values, through a `KernelBuilder`."""

    def __init__(self, kb: KernelBuilder):
        self.kb = kb
        self._zeros: dict[int, float] = {}  # value id -> the ±0.0 constant it holds

    def const(self, value: object, dtype: str) -> Value:
        v = self.kb.const(value, compute_dtype(dtype))
        if v.dtype == "f32" and float(value) == 0.0:  # type: ignore[arg-type]
            self._zeros[v.id] = float(value)  # type: ignore[arg-type]
        return v

    def _times_zero(self, x: Value, zero: Value) -> Value:
        """x * ±0.0 spelled out: drivers fold it to 0 (lavapipe does, whatever the execution
        mode says), but NaN * 0 and inf * 0 are NaN."""
        kb = self.kb
        signed = kb.bitcast((kb.bitcast(x, "u32") ^ kb.bitcast(zero, "u32")) & 0x80000000,
                            "f32")
        finite = (kb.bitcast(x, "u32") & 0x7F800000) != 0x7F800000
        return kb.select(finite, signed, _bits_f32(kb, 0x7FC00000))

    def binary(self, op: str, a: Value, b: Value) -> Value:
        kb = self.kb
        if a.dtype != b.dtype:
            raise TypeError(f"binary {op}: dtype mismatch {a.dtype} vs {b.dtype}")
        if op == "add":
            return _exact(a + b)
        if op == "sub":
            return _exact(a - b)
        if op == "mul":
            zero = next((c for c in (a, b) if self._zeros.get(c.id) is not None), None)
            if zero is not None and a.dtype == "f32":
                return self._times_zero(b if zero is a else a, zero)
            return _exact(a * b)
        if op == "div":
            return ieee_div(kb, a, b) if a.dtype == "f32" else kb.floordiv(a, b)
        if op == "div_normal":
            if a.dtype != "f32":
                raise TypeError("div_normal is defined for f32 only")
            return a / b
        if op in ("max", "min"):
            return nan_minmax(kb, op, a, b)
        if op == "pow":
            if a.dtype != "f32":
                raise TypeError("pow is defined for f32 only")
            return kb.pow(a, b)
        if op in ("xor", "shr", "and"):  # bit ops (RNG, float classification); shr: logical
            if a.dtype == "f32":
                raise TypeError(f"{op} is defined for integers only")
            return a ^ b if op == "xor" else (a >> b if op == "shr" else a & b)
        raise ValueError(f"unknown binary op {op!r}; known: {BINARY_OPS}")

    def unary(self, op: str, a: Value) -> Value:
        kb = self.kb
        if op == "neg":
            return -a
        if op == "abs":
            return kb.abs(a)
        if op == "floor" and a.dtype != "f32":
            return a  # integers are their own floor
        if a.dtype != "f32":
            raise TypeError(f"unary {op} is defined for f32 only, got {a.dtype}")
        if op == "exp":
            return kb.exp(a)
        if op == "tanh":
            return self._tanh(a)
        if op == "floor":
            return kb.floor(a)
        if op in ("sin", "cos"):
            return mathlib.sin_cos(kb, a, op)
        if op == "erf":
            return mathlib.erf(kb, a)
        if op not in ("log", "sqrt", "rsqrt"):
            raise ValueError(f"unknown unary op {op!r}; known: {UNARY_OPS}")
        # GLSL leaves these undefined at 0, below 0 and at NaN; numpy's values are spelled out
        if op == "log":
            r = kb.select(a == 0.0, _bits_f32(kb, 0xFF800000), kb.log(a))  # log(±0) = -inf
        elif op == "sqrt":
            r = kb.sqrt(a)
        else:
            r = kb.select(a == 0.0, 1.0 / a, kb.inversesqrt(a))  # 1/sqrt(±0) = ±inf
        return kb.select(a < 0.0, _bits_f32(kb, 0x7FC00000), kb.select(is_nan(kb, a), a, r))

    def _tanh(self, x: Value) -> Value:
        # GLSL Tanh is (e^2x-1)/(e^2x+1) on several drivers: inaccurate near 0 and NaN beyond
        # |x|~44. 1 - 2/(e^2|x|+1) is exact for large |x|; a Taylor polynomial covers |x|<0.3.
        kb = self.kb
        ax = kb.abs(x)
        big = 1.0 - 2.0 / (kb.exp(nan_minmax(kb, "min", ax, kb.f32(20.0)) * 2.0) + 1.0)
        x2 = x * x
        small = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315
                                                                + x2 * (62.0 / 2835)))))
        signed = kb.select(x < 0.0, -big, big)
        return kb.select(ax < 0.3, small, signed)

    def compare(self, op: str, a: Value, b: Value) -> Value:
        if op not in COMPARE_OPS:
            raise ValueError(f"unknown comparison {op!r}; known: {COMPARE_OPS}")
        return self.kb.compare(op, a, b)

    def select(self, cond: Value, a: Value, b: Value) -> Value:
        return self.kb.select(cond, a, b)

    def cast(self, a: Value, dtype: str) -> Value:
        return self.kb.cast(a, compute_dtype(dtype))

    def bits(self, a: Value) -> Value:
        """The u32 bit pattern of an f32 (integer tests no float optimisation can fold)."""
        return self.kb.bitcast(a, "u32")


_NP = {"f32": np.float32, "i32": np.int32, "bool": np.bool_, "u32": np.uint32}
_NP_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
              "min": np.minimum, "pow": np.power, "xor": np.bitwise_xor,
              "shr": np.right_shift, "and": np.bitwise_and}
_NP_UNARY = {"neg": np.negative, "exp": np.exp, "log": np.log, "tanh": np.tanh,
             "sqrt": np.sqrt, "abs": np.abs, "rsqrt": lambda x: 1 / np.sqrt(x),
             "floor": np.floor, "sin": lambda x: _bounded(np.sin, x),
             "cos": lambda x: _bounded(np.cos, x), "erf": None}
_NP_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
               "eq": np.equal, "ne": np.not_equal}


class NumpyScalarEmitter:
    """The same methods on numpy arrays, computing in the arrays' dtype (f32 / i32 / bool)."""

    def const(self, value: object, dtype: str) -> np.ndarray:
        return np.asarray(value, dtype=_NP[compute_dtype(dtype)])

    def binary(self, op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype:
            raise TypeError(f"binary {op}: dtype mismatch {a.dtype} vs {b.dtype}")
        with np.errstate(all="ignore"):
            if op == "div_normal" and a.dtype.kind != "f":
                raise TypeError("div_normal is defined for f32 only")
            if op in ("div", "div_normal"):
                out = np.divide(a, b) if a.dtype.kind == "f" else np.floor_divide(a, b)
            elif op in _NP_BINARY:
                out = _NP_BINARY[op](a, b)
            else:
                raise ValueError(f"unknown binary op {op!r}; known: {BINARY_OPS}")
        return np.asarray(out).astype(a.dtype, copy=False)

    def unary(self, op: str, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if op not in _NP_UNARY:
            raise ValueError(f"unknown unary op {op!r}; known: {UNARY_OPS}")
        with np.errstate(all="ignore"):
            fn = _NP_UNARY[op] or erf_np
            return np.asarray(fn(a)).astype(a.dtype, copy=False)

    def compare(self, op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if op not in _NP_COMPARE:
            raise ValueError(f"unknown comparison {op!r}; known: {COMPARE_OPS}")
        return np.asarray(_NP_COMPARE[op](a, b))

    def select(self, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(np.where(cond, a, b)).astype(np.asarray(a).dtype, copy=False)

    def bits(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32).reshape(np.shape(a)).view(np.uint32)

    def cast(self, a: np.ndarray, dtype: str) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(a).astype(_NP[compute_dtype(dtype)])


def erf_np(x: np.ndarray) -> np.ndarray:
    """erf for numpy (which has none), exact to f32: math.erf per element in float64."""
    import math

    x = np.asarray(x)
    out = np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)) if x.size else \
        x.astype(np.float64)
    return out.astype(x.dtype if x.dtype.kind == "f" else np.float64)


def _bounded(fn: object, x: np.ndarray) -> np.ndarray:
    """sin/cos as the kernels compute them: NaN past `mathlib.SIN_COS_MAX`."""
    return np.where(np.abs(x) <= mathlib.SIN_COS_MAX, fn(x), np.nan)  # type: ignore[operator]
