"""The user-facing tensor API: tracer tensors and state tensors share one set of methods.

`Tensor` is a value inside a trace (a node of the graph). `StateTensor` is data that lives across
steps (parameters, optimizer moments, kept gradients): inside a trace it reads as a Tensor of its
current value; outside, `.numpy()` fetches it. Both get operators and methods from `TensorOps`,
which records ops through `trace.apply`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.dtypes import DType
from alpha_jit.errors import DTypeError, ShapeError, TraceError
from alpha_jit.ir import trace
from alpha_jit.tensor_reduce import ReduceMixin
from alpha_jit.tensor_shape import LayoutMixin, norm_axis


class TensorOps(ReduceMixin, LayoutMixin):
    """Operators and methods shared by traced and state tensors (PyTorch's names; numpy's
    `axis`/`keepdims`/`astype` too). Reductions are in `tensor_reduce.py`, shapes and indexing
    in `tensor_shape.py`."""

    shape: tuple
    dtype: DType
    # numpy defers to our reflected operators: `np.float32(2) * x` is x.__rmul__, not an
    # object array of per-element products
    __array_ufunc__ = None

    def _t(self) -> Tensor:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        """PyTorch's: the shape, or the size of one dimension."""
        if dim is None:
            return tuple(self.shape)
        return self.shape[norm_axis(dim, self.ndim, "size")]

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # arithmetic --------------------------------------------------------------------------
    def __add__(self, o: Any) -> Tensor:
        return _binary("add", self, o)

    def __radd__(self, o: Any) -> Tensor:
        return _binary("add", o, self)

    def __sub__(self, o: Any) -> Tensor:
        return _binary("sub", self, o)

    def __rsub__(self, o: Any) -> Tensor:
        return _binary("sub", o, self)

    def __mul__(self, o: Any) -> Tensor:
        return _binary("mul", self, o)

    def __rmul__(self, o: Any) -> Tensor:
        return _binary("mul", o, self)

    def __truediv__(self, o: Any) -> Tensor:
        return _binary("div", self, o, to_float=True)

    def __rtruediv__(self, o: Any) -> Tensor:
        return _binary("div", o, self, to_float=True)

    def __floordiv__(self, o: Any) -> Tensor:
        return _binary("floordiv", self, o)

    def __rfloordiv__(self, o: Any) -> Tensor:
        return _binary("floordiv", o, self)

    def __mod__(self, o: Any) -> Tensor:
        """Python's and PyTorch's remainder: the sign of the divisor, a - floor(a / b) * b."""
        return _binary("remainder", self, o)

    def __rmod__(self, o: Any) -> Tensor:
        return _binary("remainder", o, self)

    def __neg__(self) -> Tensor:
        return trace.apply("neg", [self])

    def __pos__(self) -> Tensor:
        return self._t()

    def __abs__(self) -> Tensor:
        return self.abs()

    def __pow__(self, exponent: Any) -> Tensor:
        if isinstance(exponent, int | np.integer) and not self.dtype.is_float \
                and 0 <= exponent <= 64:  # PyTorch: an integer power of an int stays int
            out, base, n = full((), 1, self.dtype), self._t(), int(exponent)
            while n:
                if n & 1:
                    out = out * base
                n >>= 1
                if n:
                    base = base * base
            return out.broadcast_to(self.shape) if out.shape != self.shape else out
        if isinstance(exponent, bool | int | float | np.number):
            t = self._t() if self.dtype.is_float else self.astype(dtypes.float32)
            if exponent == 2:
                return t * t
            return trace.apply("pow_scalar", [t], {"exponent": float(exponent)})
        return _binary("pow", self, exponent, to_float=True)

    def __rpow__(self, base: Any) -> Tensor:
        return _binary("pow", base, self, to_float=True)

    def __matmul__(self, o: Any) -> Tensor:
        return trace.apply("matmul", [self, o])

    def __rmatmul__(self, o: Any) -> Tensor:
        return trace.apply("matmul", [o, self])

    def __lt__(self, o: Any) -> Tensor:
        return _binary("lt", self, o)

    def __le__(self, o: Any) -> Tensor:
        return _binary("le", self, o)

    def __gt__(self, o: Any) -> Tensor:
        return _binary("gt", self, o)

    def __ge__(self, o: Any) -> Tensor:
        return _binary("ge", self, o)

    def eq(self, o: Any) -> Tensor:
        return _binary("eq", self, o)

    def ne(self, o: Any) -> Tensor:
        return _binary("ne", self, o)

    # == and != are elementwise like every comparison (PyTorch and numpy agree); Python's
    # identity meaning would turn `logits == m` into a constant False without a word.
    def __eq__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self.eq(o) if _is_operand(o) else NotImplemented

    def __ne__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self.ne(o) if _is_operand(o) else NotImplemented

    # masks are f32 1.0 / 0.0 (comparisons return them): &, |, ~ are logical on masks
    def __and__(self, o: Any) -> Tensor:
        return _logical(self, o, "&").ne(0.0) * _logical(o, self, "&").ne(0.0)

    __rand__ = __and__

    def __or__(self, o: Any) -> Tensor:
        return maximum(_logical(self, o, "|").ne(0.0), _logical(o, self, "|").ne(0.0))

    __ror__ = __or__

    def __invert__(self) -> Tensor:
        return _logical(self, None, "~").eq(0.0)

    def logical_and(self, o: Any) -> Tensor:
        return self & o

    def logical_or(self, o: Any) -> Tensor:
        return self | o

    def logical_not(self) -> Tensor:
        return ~self

    # identity hashing stays: parameters and state live in dicts and sets by identity
    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        raise TraceError("bool", "a traced tensor has no value while tracing; data-dependent "
                         "Python control flow cannot be compiled", trace.current().provenance()
                         .where() if trace.active() else None)

    # unary math ----------------------------------------------------------------------------
    def _unary(self, op: str) -> Tensor:
        t = self._t()
        return trace.apply(op, [t if t.dtype.is_float else t.astype(dtypes.float32)])

    def exp(self) -> Tensor:
        return self._unary("exp")

    def log(self) -> Tensor:
        return self._unary("log")

    def tanh(self) -> Tensor:
        return self._unary("tanh")

    def sqrt(self) -> Tensor:
        return self._unary("sqrt")

    def rsqrt(self) -> Tensor:
        return self._unary("rsqrt")

    def sin(self) -> Tensor:
        return self._unary("sin")

    def cos(self) -> Tensor:
        return self._unary("cos")

    def erf(self) -> Tensor:
        return self._unary("erf")

    def sigmoid(self) -> Tensor:
        # 1 / (1 + e^-x): e^-x overflows to inf for x < -88, giving 0, the right limit
        return 1.0 / (1.0 + self._unary("neg").exp())

    def abs(self) -> Tensor:
        return trace.apply("abs", [self])

    def relu(self) -> Tensor:
        return trace.apply("relu", [self])

    def floor(self) -> Tensor:
        return trace.apply("floor", [self])

    def square(self) -> Tensor:
        t = self._t()
        return t * t

    def clamp(self, min: Any = None, max: Any = None) -> Tensor:  # noqa: A002 - PyTorch's
        """PyTorch's clamp: min then max (so min > max gives max everywhere)."""
        if min is None and max is None:
            raise TraceError("clamp", "at least one of min and max must be given",
                             trace.current().provenance().where())
        t = self._t()
        if min is not None:
            t = maximum(t, min)
        if max is not None:
            t = minimum(t, max)
        return t

    clip = clamp

    def masked_fill(self, mask: Any, value: Any) -> Tensor:
        """`value` where `mask` is nonzero (a comparison's f32 mask, or any tensor); the
        result keeps this tensor's dtype (PyTorch: 0.5 into an int tensor is 0)."""
        if isinstance(value, bool | int | float | np.number):
            value = full((), value, self.dtype)
        return where(mask, as_tensor(value).astype(self.dtype), self)

    def softmax(self, dim: int = -1) -> Tensor:
        from alpha_jit.nn import functional as F

        return F.softmax(self, dim)

    def log_softmax(self, dim: int = -1) -> Tensor:
        from alpha_jit.nn import functional as F

        return F.log_softmax(self, dim)

    # dtypes --------------------------------------------------------------------------------
    def astype(self, dt: Any) -> Tensor:
        dt = dtypes.dtype(dt)
        return self._t() if dt == self.dtype else trace.apply("cast", [self], {"dtype": dt})

    def to(self, *args: Any, **kw: Any) -> Tensor:
        """PyTorch's `.to(dtype)`; devices are ignored (a compiled step runs on its device)."""
        dt = kw.get("dtype")
        for a in args:
            if isinstance(a, TensorOps):
                dt = a.dtype
            elif isinstance(a, DType):
                dt = a
            elif isinstance(a, str):
                with contextlib.suppress(TypeError):  # else a device name: "cuda", "cpu"
                    dt = dtypes.dtype(a)
        return self.astype(dt) if dt is not None else self._t()

    def type_as(self, other: TensorOps) -> Tensor:
        return self.astype(other.dtype)

    def float(self) -> Tensor:
        return self.astype(dtypes.float32)

    def half(self) -> Tensor:
        return self.astype(dtypes.float16)

    def bfloat16(self) -> Tensor:
        return self.astype(dtypes.bfloat16)

    def int(self) -> Tensor:
        return self.astype(dtypes.int32)

    def long(self) -> Tensor:
        """alpha_jit's integers are 32-bit: int64 is i32 here."""
        return self.astype(dtypes.int32)

    def bool(self) -> Tensor:
        """A mask: 1.0 where nonzero (alpha_jit has no bool dtype; masks are f32)."""
        return self.ne(0)

    # autograd ------------------------------------------------------------------------------
    def detach(self) -> Tensor:
        """The same values with no gradient flowing back through them."""
        return trace.apply("stop_gradient", [self])

    def contiguous(self) -> Tensor:
        return self._t()

    def clone(self) -> Tensor:
        return self._t()

    def item(self) -> Any:
        raise TraceError("item", "a traced tensor has no value while tracing; return it from "
                         "the compiled function and call float() on the result",
                         trace.current().provenance().where() if trace.active() else None)

    tolist = item

    def backward(self) -> None:
        from alpha_jit.ir.autodiff import backward

        backward(self._t())


class Tensor(TensorOps):
    """A value inside a trace: a node id plus its static shape and dtype."""

    __slots__ = ("node", "shape", "dtype")

    def __init__(self, node: int, shape: tuple, dtype: DType):
        self.node, self.shape, self.dtype = node, tuple(shape), dtype

    def _t(self) -> Tensor:
        return self

    def __repr__(self) -> str:
        return f"Tensor(%{self.node}, {self.dtype}{list(self.shape)})"

    def __float__(self) -> float:
        raise TraceError("float", "a traced tensor has no value while tracing; return it from "
                         "the compiled function and read it afterwards",
                         trace.current().provenance().where() if trace.active() else None)


_state_keys = itertools.count(1)


class StateTensor(TensorOps):
    """Data that lives on the device across steps and is read/written in place by steps."""

    def __init__(self, data: np.ndarray, name: str = "state", dtype: Any = None):
        dt = dtypes.dtype(dtype if dtype is not None else data.dtype)
        self.dtype = dt
        self.shape = tuple(data.shape)
        self.state_key = next(_state_keys)
        self.state_name = name
        # np.array, not ascontiguousarray, which would turn a 0-d scalar into shape (1,)
        self._host: np.ndarray | None = np.array(data, dtype=dt.np_storage, order="C")
        self._device: Any = None  # runtime residency record (alpha_jit.runtime.state)

    def _t(self) -> Tensor:
        ctx = trace.current()
        node = ctx.read_state(self)
        return Tensor(node, self.shape, self.dtype)

    def numpy(self) -> np.ndarray:
        """The current value (waits for the GPU if a step is still writing it)."""
        if self._device is not None:
            return self._device.read()
        assert self._host is not None
        return self._host.copy()

    def assign(self, value: Any) -> None:
        """Outside a trace: replace the data. Inside: record a write back at step end."""
        if trace.active() is not None:
            t = as_tensor(value)
            trace.current().write_state(self, t.node)
            return
        arr = np.asarray(value, dtype=self.dtype.np_storage)
        if arr.shape != self.shape:
            raise ShapeError("assign", f"{self.state_name} has shape {self.shape}, value has "
                             f"{arr.shape}")
        if self._device is not None:
            self._device.write(arr)
        else:
            self._host = np.array(arr, order="C")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state_name}, {self.dtype}{list(self.shape)})"


def as_tensor(x: Any) -> Tensor:
    """A traced Tensor for a tensor, a Python/numpy number, or a numpy array (captured as a
    constant of the step: its value when traced, uploaded once)."""
    if isinstance(x, Tensor):
        return x
    ctx = trace.active()
    if ctx is None:
        raise TraceError("trace", f"alpha_jit ops run only inside a function decorated with "
                         f"@alpha_jit.compile, and this one was called on a "
                         f"{type(x).__name__} outside it. Wrap the call, e.g. "
                         "`@aj.compile\ndef f(x): return model(x)`, and pass numpy arrays as "
                         "the compiled function's arguments", trace.user_where())
    if isinstance(x, TensorOps):
        return x._t()
    if isinstance(x, bool | int | float | np.number):
        dt = dtypes.int32 if isinstance(x, bool | int | np.integer) else dtypes.float32
        return full((), x, dt)
    if isinstance(x, np.ndarray | list | tuple):
        from alpha_jit.creation import constant

        return constant(x)
    raise TraceError("trace", f"cannot use a {type(x).__name__} as a tensor inside a compiled "
                     "step (pass numpy arrays as arguments of the compiled function)",
                     ctx.provenance().where())


def _is_operand(o: Any) -> bool:
    """What an elementwise comparison accepts: tensors, Python/numpy scalars, numpy arrays."""
    return isinstance(o, TensorOps | bool | int | float | np.number | np.ndarray)


def _like(o: Any, ref: TensorOps) -> Any:
    """A Python number adopts the dtype of the tensor it meets (2 * x stays f32), except that a
    float meeting an integer tensor stays f32 (PyTorch's promotion: i32 * 0.5 is f32)."""
    if isinstance(o, bool | int | float | np.number):
        if not ref.dtype.is_float and isinstance(o, float | np.floating):
            return full((), o, dtypes.float32)
        return full((), o, ref.dtype)
    return o


def _binary(op: str, a: Any, b: Any, to_float: bool = False) -> Tensor:
    """An elementwise binary op with PyTorch's promotion: numbers adopt the tensor's dtype,
    integer and float tensors meet in the float type (`trace._autocast`), and `to_float`
    ops (true division, pow) turn two integer operands into f32."""
    ref = a if isinstance(a, TensorOps) else b
    ta, tb = as_tensor(_like(a, ref)), as_tensor(_like(b, ref))
    if to_float and not ta.dtype.is_float and not tb.dtype.is_float:
        ta, tb = ta.astype(dtypes.float32), tb.astype(dtypes.float32)
    return trace.apply(op, [ta, tb])


def _logical(x: Any, other: Any, op: str) -> Tensor:
    """An operand of &, |, ~: masks and numbers; integer tensors are refused (PyTorch's & on
    integers is bitwise, which alpha_jit does not have: refusing beats a different answer)."""
    t = as_tensor(_like(x, other) if isinstance(other, TensorOps) else x)
    if not t.dtype.is_float:
        raise DTypeError(op, f"{op} is logical on masks here (1.0 / 0.0, as comparisons "
                         f"return); bitwise {op} on integer tensors ({t.dtype}{list(t.shape)}) "
                         "is not supported", trace.current().provenance().where())
    return t


def full(shape: Sequence[int], value: float, dtype: Any = dtypes.float32) -> Tensor:
    dt = dtypes.dtype(dtype)
    value = int(value) if not dt.is_float else float(value)
    return trace.leaf("full", {"value": value, "shape": tuple(shape)}, tuple(shape), dt)


def iota(shape: Sequence[int], axis: int) -> Tensor:
    """i32 tensor whose value is the index along `axis` (-1: the row-major linear index)."""
    return trace.leaf("iota", {"shape": tuple(shape), "axis": axis}, tuple(shape),
                      dtypes.int32)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """`a` where `cond` is nonzero, else `b` (broadcast; numbers adopt the other's dtype)."""
    num = (bool, int, float, np.number)
    if isinstance(a, num) and isinstance(b, num):
        ints = all(isinstance(v, int | np.integer) for v in (a, b))
        # two numbers: i32 for two ints (PyTorch: int64), else f32
        ref: Any = as_tensor(cond).astype(dtypes.int32 if ints else dtypes.float32)
    else:
        ref = as_tensor(b) if isinstance(a, num) else as_tensor(a)
    ta, tb = as_tensor(_like(a, ref)), as_tensor(_like(b, ref))
    if ta.dtype != tb.dtype:  # PyTorch's promotion: integer and float meet in the float
        wide = ta.dtype if ta.dtype.is_float else tb.dtype
        ta, tb = ta.astype(wide), tb.astype(wide)
    return trace.apply("where", [cond, ta, tb])


def maximum(a: Any, b: Any) -> Tensor:
    return _binary("maximum", a, b)


def minimum(a: Any, b: Any) -> Tensor:
    return _binary("minimum", a, b)


def sum_to(g: Tensor, shape: tuple) -> Tensor:
    """Sum a broadcast result back to `shape` (the VJP of numpy broadcasting)."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    t = g
    if lead > 0:
        t = t.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if axes:
        t = t.sum(axis=axes, keepdims=True)
    return t.reshape(shape) if t.shape != shape else t


def pad(x: Any, pads: Sequence[tuple[int, int]]) -> Tensor:
    """Zero padding: pads[d] = (before, after) elements on axis d."""
    return trace.apply("pad", [x], {"pads": tuple((int(b), int(e)) for b, e in pads)})


def zeros_like(x: TensorOps) -> Tensor:
    return full(x.shape, 0.0, x.dtype)


from alpha_jit.tensor_shape import cat as concat  # noqa: E402, F401  (the old name)
