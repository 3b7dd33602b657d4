"""Reductions on tensors: PyTorch's `dim`/`keepdim` and numpy's `axis`/`keepdims`.

Why a file of its own: the IR has four single-axis reductions (`sum`, `mean`, `max`,
`logsumexp`); everything a user calls (min, argmax, var, std, several dims at once, the
`(values, indices)` pair of `max(dim)`) is built here from them, so each stays one reduction
kernel (adjacent dims are merged first) with its gradient from the ops' rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import TraceError
from alpha_jit.ir import trace
from alpha_jit.tensor_shape import norm_axis

if TYPE_CHECKING:
    from alpha_jit.tensor import Tensor

Dims = int | Sequence[int] | None


class ValuesIndices(NamedTuple):
    """What `x.max(dim)` / `x.min(dim)` return, as `torch.return_types.max` does."""

    values: Any
    indices: Any


def _where() -> str | None:
    return trace.current().provenance().where() if trace.active() else None


def _resolve(op: str, dim: Any, axis: Any, keepdim: Any, keepdims: Any) -> tuple[Any, bool]:
    """One dims value and one keep flag from PyTorch's and numpy's spellings."""
    if dim is not None and axis is not None:
        raise TraceError(op, "give either dim= (PyTorch) or axis= (numpy), not both", _where())
    return (dim if axis is None else axis), bool(keepdim or keepdims)


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


def _int_max(t: Tensor, dim: Dims, keepdim: bool) -> Tensor:
    """Exact max of i32 values: the max kernel is f32 (exact to 2^24), so the high and low
    16 bits are reduced in turn (the low half among the elements with the highest high)."""
    from alpha_jit.tensor import where

    hi = t // 65536
    lo = t - hi * 65536  # in [0, 65536)
    m_hi = hi.astype(dtypes.float32)._reduce("max", dim, True).astype(dtypes.int32)
    cand = where(hi.eq(m_hi), lo, -1)
    m_lo = cand.astype(dtypes.float32)._reduce("max", dim, True).astype(dtypes.int32)
    out = m_hi * 65536 + m_lo
    if keepdim:
        return out
    if dim is None:
        return out.reshape(())
    axes = {norm_axis(a, t.ndim, "max") for a in ([dim] if isinstance(
        dim, int | np.integer) else dim)}
    return out.reshape(*[s for i, s in enumerate(t.shape) if i not in axes])


class ReduceMixin:
    """Reductions (mixed into `TensorOps`)."""

    shape: tuple
    dtype: Any

    def _t(self) -> Tensor:
        raise NotImplementedError

    def _reduce(self, op: str, axis: Dims, keepdims: bool) -> Tensor:
        t = self._t()
        if axis is not None and not isinstance(axis, int | np.integer) and not list(axis):
            axis = None  # PyTorch: dim=() reduces everything
        if t.ndim == 0:  # a 0-d tensor reduces to itself over dim 0 or -1
            for a in [] if axis is None else ([axis] if isinstance(
                    axis, int | np.integer) else list(axis)):
                norm_axis(a, 1, op)
            return t
        if axis is None:
            out = trace.apply(op, [t.reshape(-1)], {"axis": 0, "keepdims": False})
            return out.reshape(*([1] * t.ndim)) if keepdims else out
        axes = [int(axis)] if isinstance(axis, int | np.integer) else [int(a) for a in axis]
        axes = sorted({norm_axis(a, t.ndim, op) for a in axes}, reverse=True)
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

    def sum(self, dim: Dims = None, keepdim: bool = False, dtype: Any = None, *,
            axis: Dims = None, keepdims: bool = False) -> Tensor:
        d, keep = _resolve("sum", dim, axis, keepdim, keepdims)
        t = self._t() if dtype is None else self._t().astype(dtype)
        return t._reduce("sum", d, keep)

    def mean(self, dim: Dims = None, keepdim: bool = False, dtype: Any = None, *,
             axis: Dims = None, keepdims: bool = False) -> Tensor:
        d, keep = _resolve("mean", dim, axis, keepdim, keepdims)
        t = self._t() if dtype is None else self._t().astype(dtype)
        return t._reduce("mean", d, keep)

    def logsumexp(self, dim: Dims = -1, keepdim: bool = False, *, axis: Dims = None,
                  keepdims: bool = False) -> Tensor:
        d, keep = (axis, keepdims or keepdim) if axis is not None else (dim, keepdim)
        return self._t()._reduce("logsumexp", d, keep)

    def amax(self, dim: Dims = None, keepdim: bool = False) -> Tensor:
        """The largest values (NaN if any is NaN), no indices."""
        t = self._t()
        if not t.dtype.is_float:
            return _int_max(t, dim, keepdim)
        return t._reduce("max", dim, keepdim)

    def amin(self, dim: Dims = None, keepdim: bool = False) -> Tensor:
        t = self._t()
        if not t.dtype.is_float:  # -1 - x reverses i32 order without overflow (-INT_MIN)
            return -1 - (-1 - t).amax(dim, keepdim)
        return -((-t).amax(dim, keepdim))

    def max(self, dim: Any = None, keepdim: bool = False, *, axis: Dims = None,
            keepdims: bool = False) -> Any:
        """PyTorch's max: of everything, `(values, indices)` along `dim`, or elementwise with
        another tensor. numpy's `axis=` gives the values alone."""
        return self._minmax("max", dim, keepdim, axis, keepdims)

    def min(self, dim: Any = None, keepdim: bool = False, *, axis: Dims = None,
            keepdims: bool = False) -> Any:
        return self._minmax("min", dim, keepdim, axis, keepdims)

    def _minmax(self, op: str, dim: Any, keepdim: bool, axis: Dims, keepdims: bool) -> Any:
        from alpha_jit.tensor import TensorOps, maximum, minimum

        if isinstance(dim, TensorOps):  # torch.max(a, b): elementwise
            return (maximum if op == "max" else minimum)(self, dim)
        values = self.amax if op == "max" else self.amin
        if axis is not None or dim is None:  # numpy's spelling, or everything: the values
            return values(axis, keepdim or keepdims)
        if not isinstance(dim, int | np.integer):
            raise TraceError(op, f"{op}(dim) takes one dimension, got {dim!r}; use amax/amin "
                             "for several", _where())
        from alpha_jit.tensor import iota, where

        t = self._t()
        d = norm_axis(dim, t.ndim, op)
        idx = (self.argmax if op == "max" else self.argmin)(d, True)
        # the values picked at the indices, so the gradient goes to that one element (as
        # PyTorch's max(dim)), not shared among ties
        if not t.dtype.is_float:  # no gradient to route; the sum kernel would round i32
            return ValuesIndices(values(d, keepdim), idx if keepdim else idx.reshape(*(
                s for i, s in enumerate(t.shape) if i != d)))
        picked = where(iota(t.shape, d).eq(idx), t, 0)._reduce("sum", d, keepdim)
        return ValuesIndices(picked, idx if keepdim else idx.reshape(*(
            s for i, s in enumerate(t.shape) if i != d)))

    def argmax(self, dim: int | None = None, keepdim: bool = False) -> Tensor:
        """Index (i32) of the first largest value; NaN counts as largest, as in PyTorch."""
        return self._argbest(dim, keepdim, largest=True)

    def argmin(self, dim: int | None = None, keepdim: bool = False) -> Tensor:
        return self._argbest(dim, keepdim, largest=False)

    def _argbest(self, dim: int | None, keepdim: bool, largest: bool) -> Tensor:
        from alpha_jit.tensor import iota

        t = self._t()
        if dim is None:  # PyTorch: the index into the flattened tensor
            flat = t.reshape(-1)._argbest(0, False, largest)
            return flat.reshape(*([1] * t.ndim)) if keepdim else flat
        d = norm_axis(dim, t.ndim, "argmax" if largest else "argmin")
        x = t if largest else (-t if t.dtype.is_float else -1 - t)  # i32: no -INT_MIN
        if t.dtype.is_float:
            hit = x.eq(x._reduce("max", d, True)) | x.ne(x)  # NaN: x != x
        else:
            hit = x.eq(_int_max(x, d, True))
        n = t.shape[d]
        if n >= 1 << 24:
            raise TraceError("argmax", f"dimension of size {n} is too long for exact f32 "
                             "indices", _where())
        # the first hit has the largest n - index
        rev = (n - iota(t.shape, d)).astype(dtypes.float32)
        first = (hit * rev)._reduce("max", d, keepdim)
        return (n - first).astype(dtypes.int32)

    def var(self, dim: Dims = None, unbiased: bool | None = None, keepdim: bool = False, *,
            correction: float | None = None, axis: Dims = None, keepdims: bool = False,
            ddof: float | None = None) -> Tensor:
        """PyTorch's variance: `correction` (default 1, Bessel's) is subtracted from the
        count; `unbiased=False` or numpy's `ddof=0` give the population variance."""
        d, keep = _resolve("var", dim, axis, keepdim, keepdims)
        given = [c for c in (correction, ddof) if c is not None]
        if unbiased is not None:
            given.append(1 if unbiased else 0)
        if len(given) > 1:
            raise TraceError("var", "give one of correction=, unbiased= and ddof=", _where())
        c = float(given[0]) if given else 1.0
        t = self._t()
        if not t.dtype.is_float:
            t = t.astype(dtypes.float32)
        axes = range(t.ndim) if d is None else ([d] if isinstance(d, int | np.integer) else d)
        n = math.prod(t.shape[norm_axis(a, t.ndim, "var")] for a in axes)
        centred = t - t._reduce("mean", d, True)
        # n - c <= 0 divides by zero: inf (or NaN for 0 / 0), as PyTorch gives
        return (centred * centred)._reduce("sum", d, keep) / float(max(n - c, 0.0))

    def std(self, dim: Dims = None, unbiased: bool | None = None, keepdim: bool = False, *,
            correction: float | None = None, axis: Dims = None, keepdims: bool = False,
            ddof: float | None = None) -> Tensor:
        return self.var(dim, unbiased, keepdim, correction=correction, axis=axis,
                        keepdims=keepdims, ddof=ddof).sqrt()
