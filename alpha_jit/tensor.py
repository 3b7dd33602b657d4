"""The user-facing tensor API: tracer tensors and state tensors share one set of methods.

`Tensor` is a value inside a trace (a node of the graph). `StateTensor` is data that lives across
steps (parameters, optimizer moments, kept gradients): inside a trace it reads as a Tensor of its
current value; outside, `.numpy()` fetches it. Both get operators and methods from `TensorOps`,
which records ops through `trace.apply`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.dtypes import DType
from alpha_jit.errors import DTypeError, ShapeError, TraceError
from alpha_jit.ir import trace


def _norm_axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(op, f"axis {axis} is out of range for a tensor of rank {ndim}",
                         trace.current().provenance().where())
    return axis % max(ndim, 1)


def _merge_adjacent(shape: tuple, axes: list[int]) -> tuple[tuple, list[int]] | None:
    """`shape` with each run of adjacent reduced axes merged into one, and the merged axes'
    new indices; None when no two reduced axes are adjacent."""
    ax = set(axes)
    if not any(a + 1 in ax for a in ax):
        return None
    out: list[int] = []
    new_axes: list[int] = []
    d = 0
    while d < len(shape):
        if d in ax:
            size = 1
            while d < len(shape) and d in ax:
                size *= shape[d]
                d += 1
            new_axes.append(len(out))
            out.append(size)
        else:
            out.append(shape[d])
            d += 1
    return tuple(out), new_axes


class TensorOps:
    """Operators and methods shared by traced and state tensors."""

    shape: tuple
    dtype: DType

    def _t(self) -> Tensor:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    # arithmetic --------------------------------------------------------------------------
    def __add__(self, o: Any) -> Tensor:
        return trace.apply("add", [self, _like(o, self)])

    def __radd__(self, o: Any) -> Tensor:
        return trace.apply("add", [_like(o, self), self])

    def __sub__(self, o: Any) -> Tensor:
        return trace.apply("sub", [self, _like(o, self)])

    def __rsub__(self, o: Any) -> Tensor:
        return trace.apply("sub", [_like(o, self), self])

    def __mul__(self, o: Any) -> Tensor:
        return trace.apply("mul", [self, _like(o, self)])

    def __rmul__(self, o: Any) -> Tensor:
        return trace.apply("mul", [_like(o, self), self])

    def __truediv__(self, o: Any) -> Tensor:
        return trace.apply("div", [self, _like(o, self)])

    def __rtruediv__(self, o: Any) -> Tensor:
        return trace.apply("div", [_like(o, self), self])

    def __neg__(self) -> Tensor:
        return trace.apply("neg", [self])

    def __pow__(self, exponent: float) -> Tensor:
        if not isinstance(exponent, int | float):
            raise TraceError("pow", "only a constant Python number exponent is supported",
                             trace.current().provenance().where())
        if exponent == 2:
            return self * self
        return trace.apply("pow_scalar", [self], {"exponent": float(exponent)})

    def __matmul__(self, o: Any) -> Tensor:
        return trace.apply("matmul", [self, o])

    def __rmatmul__(self, o: Any) -> Tensor:
        return trace.apply("matmul", [o, self])

    def __lt__(self, o: Any) -> Tensor:
        return trace.apply("lt", [self, _like(o, self)])

    def __le__(self, o: Any) -> Tensor:
        return trace.apply("le", [self, _like(o, self)])

    def __gt__(self, o: Any) -> Tensor:
        return trace.apply("gt", [self, _like(o, self)])

    def __ge__(self, o: Any) -> Tensor:
        return trace.apply("ge", [self, _like(o, self)])

    def eq(self, o: Any) -> Tensor:
        return trace.apply("eq", [self, _like(o, self)])

    def ne(self, o: Any) -> Tensor:
        return trace.apply("ne", [self, _like(o, self)])

    # == and != are elementwise like every comparison (PyTorch and numpy agree); Python's
    # identity meaning would turn `logits == m` into a constant False without a word.
    def __eq__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self.eq(o) if _is_operand(o) else NotImplemented

    def __ne__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self.ne(o) if _is_operand(o) else NotImplemented

    # identity hashing stays: parameters and state live in dicts and sets by identity
    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        raise TraceError("bool", "a traced tensor has no value while tracing; data-dependent "
                         "Python control flow cannot be compiled", trace.current().provenance()
                         .where() if trace.active() else None)

    # unary math ----------------------------------------------------------------------------
    def exp(self) -> Tensor:
        return trace.apply("exp", [self])

    def log(self) -> Tensor:
        return trace.apply("log", [self])

    def tanh(self) -> Tensor:
        return trace.apply("tanh", [self])

    def sqrt(self) -> Tensor:
        return trace.apply("sqrt", [self])

    def rsqrt(self) -> Tensor:
        return trace.apply("rsqrt", [self])

    def abs(self) -> Tensor:
        return trace.apply("abs", [self])

    def relu(self) -> Tensor:
        return trace.apply("relu", [self])

    def astype(self, dt: Any) -> Tensor:
        dt = dtypes.dtype(dt)
        return self._t() if dt == self.dtype else trace.apply("cast", [self], {"dtype": dt})

    # reductions ----------------------------------------------------------------------------
    def _reduce(self, op: str, axis: int | Sequence[int] | None, keepdims: bool) -> Tensor:
        t = self._t()
        if axis is None:
            out = trace.apply(op, [t.reshape(-1)], {"axis": 0, "keepdims": False})
            return out.reshape(*([1] * t.ndim)) if keepdims else out
        axes = [axis] if isinstance(axis, int) else list(axis)
        axes = sorted({_norm_axis(a, t.ndim, op) for a in axes}, reverse=True)
        if op != "logsumexp" and len(axes) > 1:
            merged = _merge_adjacent(t.shape, axes)
            if merged is not None:  # adjacent axes as one: one reduction kernel, not a chain
                shape, new_axes = merged
                out = t.reshape(*shape)._reduce(op, new_axes, False)
                kept = [1 if d in axes else s for d, s in enumerate(t.shape)]
                return out.reshape(*kept) if keepdims else out
        for a in axes:  # highest axis first so the remaining indices stay valid
            t = trace.apply(op, [t], {"axis": a, "keepdims": keepdims})
        return t

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return self._reduce("sum", axis, keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return self._reduce("mean", axis, keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return self._reduce("max", axis, keepdims)

    def logsumexp(self, axis: int = -1, keepdims: bool = False) -> Tensor:
        return self._reduce("logsumexp", axis, keepdims)

    # layout --------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        out = trace.apply("reshape", [self], {"shape": tuple(int(s) for s in shape)})
        return self._t() if out.shape == self.shape else out

    def transpose(self, *perm: int) -> Tensor:
        if len(perm) == 1 and isinstance(perm[0], tuple | list):
            perm = tuple(perm[0])
        if not perm:
            perm = tuple(reversed(range(self.ndim)))
        return trace.apply("transpose", [self], {"perm": tuple(perm)})

    @property
    def T(self) -> Tensor:  # noqa: N802 - numpy's name
        return self.transpose()

    def swap_last(self) -> Tensor:
        """Transpose of the last two axes (a view, no copy)."""
        perm = list(range(self.ndim))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.transpose(*perm)

    def __getitem__(self, index: Any) -> Tensor:
        """Basic indexing: integers and step-1 slices (a view; no copy)."""
        if not isinstance(index, tuple):
            index = (index,)
        t = self._t()
        if len(index) > t.ndim:
            raise ShapeError("getitem", f"{len(index)} indices for a tensor of shape {t.shape}",
                             trace.current().provenance().where())
        starts, stops, keep = [], [], []
        for d, size in enumerate(t.shape):
            ix = index[d] if d < len(index) else slice(None)
            if isinstance(ix, int | np.integer):
                i = int(ix) + size if ix < 0 else int(ix)
                if not 0 <= i < size:
                    raise ShapeError("getitem", f"index {ix} is out of range for axis {d} of "
                                     f"shape {t.shape}", trace.current().provenance().where())
                starts.append(i)
                stops.append(i + 1)
            elif isinstance(ix, slice) and ix.step in (None, 1):
                a, b, _ = ix.indices(size)
                starts.append(a)
                stops.append(max(a, b))
                keep.append(d)
            else:
                raise TraceError("getitem", f"only integers and step-1 slices are supported, "
                                 f"got {ix!r}", trace.current().provenance().where())
        out = t
        if starts != [0] * t.ndim or stops != list(t.shape):
            out = trace.apply("slice", [t], {"starts": tuple(starts), "stops": tuple(stops)})
        if len(keep) != t.ndim:
            out = out.reshape(tuple(out.shape[d] for d in keep))
        return out

    def broadcast_to(self, shape: Sequence[int]) -> Tensor:
        shape = tuple(shape)
        return self._t() if shape == self.shape else trace.apply(
            "broadcast_to", [self], {"shape": shape})

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
    if isinstance(x, Tensor):
        return x
    if isinstance(x, TensorOps):
        return x._t()
    if isinstance(x, bool | int | float | np.number):
        dt = dtypes.int32 if isinstance(x, bool | int | np.integer) else dtypes.float32
        return full((), x, dt)
    raise TraceError("trace", f"cannot use a {type(x).__name__} as a tensor inside a compiled "
                     "step (numpy arrays must be passed as arguments)",
                     trace.current().provenance().where() if trace.active() else None)


def _is_operand(o: Any) -> bool:
    """What an elementwise comparison accepts: tensors and Python/numpy scalars."""
    return isinstance(o, TensorOps | bool | int | float | np.number)


def _like(o: Any, ref: TensorOps) -> Any:
    """A Python number adopts the dtype of the tensor it meets (2 * x stays f32)."""
    if isinstance(o, bool | int | float | np.number):
        return full((), o, ref.dtype)
    return o


def full(shape: Sequence[int], value: float, dtype: Any = dtypes.float32) -> Tensor:
    dt = dtypes.dtype(dtype)
    value = int(value) if not dt.is_float else float(value)
    return trace.leaf("full", {"value": value, "shape": tuple(shape)}, tuple(shape), dt)


def iota(shape: Sequence[int], axis: int) -> Tensor:
    """i32 tensor whose value is the index along `axis` (-1: the row-major linear index)."""
    return trace.leaf("iota", {"shape": tuple(shape), "axis": axis}, tuple(shape),
                      dtypes.int32)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    a_t = as_tensor(a) if not isinstance(a, int | float) else None
    b_t = as_tensor(b) if not isinstance(b, int | float) else None
    ref = a_t if a_t is not None else b_t
    if ref is None:
        raise DTypeError("where", "at least one of the branches must be a tensor")
    return trace.apply("where", [cond, _like(a, ref), _like(b, ref)])


def maximum(a: Any, b: Any) -> Tensor:
    ta = as_tensor(a) if isinstance(a, TensorOps) else None
    ref = ta if ta is not None else as_tensor(b)
    return trace.apply("maximum", [_like(a, ref), _like(b, ref)])


def minimum(a: Any, b: Any) -> Tensor:
    ta = as_tensor(a) if isinstance(a, TensorOps) else None
    ref = ta if ta is not None else as_tensor(b)
    return trace.apply("minimum", [_like(a, ref), _like(b, ref)])


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


def concat(xs: Sequence[Any], axis: int = -1) -> Tensor:
    """Concatenation along `axis`, as a sum of zero-padded parts (one fused kernel)."""
    ts = [as_tensor(x) for x in xs]
    ax = axis % ts[0].ndim
    total = sum(t.shape[ax] for t in ts)
    out, at = None, 0
    for t in ts:
        pads = [(0, 0)] * t.ndim
        pads[ax] = (at, total - at - t.shape[ax])
        at += t.shape[ax]
        part = pad(t, pads)
        out = part if out is None else out + part
    assert out is not None
    return out


def zeros_like(x: TensorOps) -> Tensor:
    return full(x.shape, 0.0, x.dtype)
