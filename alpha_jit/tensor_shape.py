"""Shapes and indexing on tensors, with PyTorch's names and semantics.

Why a file of its own: these are the methods a ported model leans on most (`view`, `permute`,
`transpose(d0, d1)`, `x[:, None, ::2]`, `split`, `cat`), and every one of them reduces to four
IR ops (`reshape`, `transpose` as a permutation, `slice`, `broadcast_to`) plus `gather_rows`
for steps and integer-array indices, so fusion sees views, not copies. `TensorOps` mixes this in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from alpha_jit.errors import ShapeError, TraceError
from alpha_jit.ir import trace

if TYPE_CHECKING:
    from alpha_jit.tensor import Tensor


def _where() -> str | None:
    return trace.current().provenance().where() if trace.active() else None


def norm_axis(axis: int, ndim: int, op: str) -> int:
    """A dimension index in [0, ndim), from PyTorch's [-ndim, ndim)."""
    if not isinstance(axis, int | np.integer):
        raise ShapeError(op, f"dimension must be an int, got {axis!r}", _where())
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(op, f"dimension {axis} is out of range for a tensor of rank {ndim}",
                         _where())
    return int(axis) % max(ndim, 1)


def _dims(args: tuple) -> tuple:
    """`f(1, 2)` and `f((1, 2))` / `f([1, 2])` alike, as PyTorch accepts both."""
    if len(args) == 1 and isinstance(args[0], tuple | list):
        return tuple(args[0])
    return tuple(args)


def _t(x: Any) -> Tensor:
    from alpha_jit.tensor import as_tensor

    return as_tensor(x)


class LayoutMixin:
    """Views and indexing (mixed into `TensorOps`)."""

    shape: tuple

    def _t(self) -> Tensor:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # reshapes ------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> Tensor:
        shape = _dims(shape)
        out = trace.apply("reshape", [self], {"shape": tuple(int(s) for s in shape)})
        return self._t() if out.shape == self.shape else out

    def view(self, *shape: Any) -> Tensor:
        """PyTorch's view: a reshape (every reshape here is a view or a fused copy)."""
        if len(shape) == 1 and not isinstance(shape[0], int | np.integer | tuple | list):
            raise TraceError("view", f"view({shape[0]!r}) reinterprets bits, which alpha_jit "
                             "does not support; use .to(dtype) to convert values", _where())
        return self.reshape(*shape)

    def view_as(self, other: Any) -> Tensor:
        return self.reshape(other.shape)

    def reshape_as(self, other: Any) -> Tensor:
        return self.reshape(other.shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        if self.ndim == 0:
            return self.reshape(1)
        a, b = (norm_axis(d, self.ndim, "flatten") for d in (start_dim, end_dim))
        if a > b:
            raise ShapeError("flatten", f"start_dim {start_dim} comes after end_dim {end_dim} "
                             f"for shape {self.shape}", _where())
        merged = math.prod(self.shape[a:b + 1])
        return self.reshape(*self.shape[:a], merged, *self.shape[b + 1:])

    def unflatten(self, dim: int, sizes: Sequence[int]) -> Tensor:
        d = norm_axis(dim, self.ndim, "unflatten")
        return self.reshape(*self.shape[:d], *sizes, *self.shape[d + 1:])

    def squeeze(self, dim: int | Sequence[int] | None = None) -> Tensor:
        """Drop size-1 dimensions (all, or those of `dim` that are size 1: PyTorch leaves a
        named dimension of another size alone)."""
        if dim is None:
            dims = set(range(self.ndim))
        else:
            dims = {norm_axis(d, self.ndim, "squeeze")
                    for d in ([dim] if isinstance(dim, int | np.integer) else dim)}
        return self.reshape(*[s for i, s in enumerate(self.shape)
                              if not (i in dims and s == 1)])

    def unsqueeze(self, dim: int) -> Tensor:
        d = norm_axis(dim, self.ndim + 1, "unsqueeze")
        return self.reshape(*self.shape[:d], 1, *self.shape[d:])

    # permutations --------------------------------------------------------------------------
    def permute(self, *dims: Any) -> Tensor:
        dims = _dims(dims)
        if len(dims) != self.ndim:
            raise ShapeError("permute", f"{len(dims)} dimensions given for a tensor of shape "
                             f"{self.shape}", _where())
        perm = tuple(norm_axis(d, self.ndim, "permute") for d in dims)
        if perm == tuple(range(self.ndim)):
            return self._t()
        return trace.apply("transpose", [self], {"perm": perm})

    def transpose(self, *dims: int) -> Tensor:
        """PyTorch's transpose(d0, d1): swap two dimensions. With no arguments, all of them
        reversed (numpy's, as `.T`). For any other permutation use `permute`."""
        if not dims:
            return self.permute(*reversed(range(self.ndim)))
        if len(dims) != 2 or not all(isinstance(d, int | np.integer) for d in dims):
            raise TraceError("transpose", f"transpose{dims!r}: transpose swaps two dimensions "
                             "as in PyTorch (transpose(d0, d1)); for a full permutation use "
                             f".permute{dims if len(dims) > 1 else dims[0]!r}", _where())
        a, b = (norm_axis(d, self.ndim, "transpose") for d in dims)
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(*perm)

    swapaxes = swapdims = transpose

    def t(self) -> Tensor:
        if self.ndim > 2:
            raise ShapeError("t", f"t() expects a tensor of at most 2 dimensions, got "
                             f"{self.shape}; use transpose(d0, d1)", _where())
        return self.transpose() if self.ndim == 2 else self._t()

    @property
    def T(self) -> Tensor:  # noqa: N802 - numpy's and PyTorch's name
        return self.transpose()

    @property
    def mT(self) -> Tensor:  # noqa: N802 - PyTorch's name
        return self.swap_last()

    def swap_last(self) -> Tensor:
        """Transpose of the last two axes (a view, no copy)."""
        return self.transpose(-2, -1)

    # broadcasting --------------------------------------------------------------------------
    def broadcast_to(self, shape: Sequence[int]) -> Tensor:
        shape = tuple(int(s) for s in shape)
        return self._t() if shape == self.shape else trace.apply(
            "broadcast_to", [self], {"shape": shape})

    def expand(self, *sizes: Any) -> Tensor:
        """PyTorch's expand: -1 keeps a dimension's size; new dimensions go in front."""
        sizes = _dims(sizes)
        lead = len(sizes) - self.ndim
        if lead < 0:
            raise ShapeError("expand", f"expand{sizes} has fewer dimensions than the tensor "
                             f"{self.shape}", _where())
        shape = tuple(self.shape[i - lead] if s == -1 and i >= lead else int(s)
                      for i, s in enumerate(sizes))
        return self.broadcast_to(shape)

    def expand_as(self, other: Any) -> Tensor:
        return self.broadcast_to(other.shape)

    def repeat(self, *sizes: Any) -> Tensor:
        """PyTorch's repeat (numpy's tile): each dimension `r` times over."""
        reps = _dims(sizes)
        if len(reps) < self.ndim:
            raise ShapeError("repeat", f"repeat{reps} needs at least {self.ndim} sizes for "
                             f"shape {self.shape}", _where())
        shape = (1,) * (len(reps) - self.ndim) + tuple(self.shape)
        inter = [d for s in shape for d in (1, s)]
        wide = [d for r, s in zip(reps, shape, strict=True) for d in (r, s)]
        out = self.reshape(*inter).broadcast_to(wide)
        return out.reshape(*[r * s for r, s in zip(reps, shape, strict=True)])

    # pieces --------------------------------------------------------------------------------
    def narrow(self, dim: int, start: int, length: int) -> Tensor:
        d = norm_axis(dim, self.ndim, "narrow")
        size = self.shape[d]
        a = start + size if start < 0 else start
        if not (0 <= a <= size and 0 <= length and a + length <= size):
            raise ShapeError("narrow", f"start {start} and length {length} do not fit "
                             f"dimension {dim} of shape {self.shape}", _where())
        idx: list[Any] = [slice(None)] * self.ndim
        idx[d] = slice(a, a + length)
        return self[tuple(idx)]

    def split(self, split_size_or_sections: int | Sequence[int], dim: int = 0) -> tuple:
        d = norm_axis(dim, self.ndim, "split")
        n = self.shape[d]
        if isinstance(split_size_or_sections, int | np.integer):
            step = int(split_size_or_sections)
            if step <= 0:
                raise ShapeError("split", f"split size must be positive, got {step}", _where())
            sizes = [min(step, n - a) for a in range(0, n, step)] or [0]
        else:
            sizes = [int(s) for s in split_size_or_sections]
            if sum(sizes) != n:
                raise ShapeError("split", f"sections {sizes} sum to {sum(sizes)}, but "
                                 f"dimension {dim} of {self.shape} has {n}", _where())
        out, at = [], 0
        for s in sizes:
            out.append(self.narrow(d, at, s))
            at += s
        return tuple(out)

    def chunk(self, chunks: int, dim: int = 0) -> tuple:
        """PyTorch's chunk: pieces of ceil(n / chunks) (so possibly fewer than `chunks`)."""
        if chunks <= 0:
            raise ShapeError("chunk", f"chunks must be positive, got {chunks}", _where())
        n = self.shape[norm_axis(dim, self.ndim, "chunk")]
        return self.split(max(1, -(-n // chunks)), dim)

    def unbind(self, dim: int = 0) -> tuple:
        d = norm_axis(dim, self.ndim, "unbind")
        return tuple(self.select(d, i) for i in range(self.shape[d]))

    def select(self, dim: int, index: int) -> Tensor:
        d = norm_axis(dim, self.ndim, "select")
        idx: list[Any] = [slice(None)] * self.ndim
        idx[d] = index
        return self[tuple(idx)]

    def tril(self, diagonal: int = 0) -> Tensor:
        from alpha_jit.creation import band

        return band(self._t(), diagonal, lower=True)

    def triu(self, diagonal: int = 0) -> Tensor:
        from alpha_jit.creation import band

        return band(self._t(), diagonal, lower=False)

    # indexing ------------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> Tensor:
        """PyTorch/numpy indexing: ints (negative too), slices (any positive step), None,
        `...`, and one integer array (a list, numpy array or traced i32 tensor: a gather)."""
        return _index(self._t(), index)

    def __setitem__(self, index: Any, value: Any) -> None:
        raise TraceError("setitem", "a traced step has no in-place writes; build the new "
                         "tensor instead, e.g. x = aj.where(mask, value, x) or "
                         "x.masked_fill(mask, value)", _where())

    def __iter__(self) -> Any:
        if not self.shape:
            raise TypeError("iteration over a 0-d tensor")
        return iter(self.unbind(0))


def _is_array_index(ix: Any) -> bool:
    from alpha_jit.tensor import TensorOps

    return isinstance(ix, list | np.ndarray | TensorOps)


def _index(t: Tensor, index: Any) -> Tensor:
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for ix in items if ix is Ellipsis) > 1:
        raise ShapeError("getitem", "an index can only have a single ellipsis ('...')",
                         _where())
    used = sum(1 for ix in items if ix is not None and ix is not Ellipsis)
    if used > t.ndim:
        raise ShapeError("getitem", f"{used} indices for a tensor of shape {t.shape}", _where())
    if any(ix is Ellipsis for ix in items):
        at = next(i for i, ix in enumerate(items) if ix is Ellipsis)
        items[at:at + 1] = [slice(None)] * (t.ndim - used)
    else:
        items += [slice(None)] * (t.ndim - used)
    advanced = [i for i, ix in enumerate(items) if _is_array_index(ix)]
    if len(advanced) > 1:
        raise TraceError("getitem", "only one integer-array index per indexing expression is "
                         "supported; index one dimension at a time", _where())
    if advanced:
        ints = [i for i, ix in enumerate(items) if isinstance(ix, int | np.integer)]
        span = sorted(ints + advanced)
        if span and span[-1] - span[0] + 1 != len(span):  # numpy moves such results first
            raise TraceError("getitem", "an integer index separated from an integer-array "
                             "index by a slice is not supported (numpy and PyTorch move the "
                             "result dimensions first); index in two steps", _where())

    # basic pass: slices and ints become one `slice` view; steps and arrays come after
    starts, stops, out_dims, steps = [], [], [], {}
    array_dim: tuple[int, Any] | None = None
    d = 0
    for ix in items:
        if ix is None:
            out_dims.append(None)
            continue
        size = t.shape[d]
        if isinstance(ix, bool) or (isinstance(ix, np.ndarray) and ix.dtype == np.bool_
                                    and ix.ndim != 1):
            raise TraceError("getitem", f"boolean-mask indexing gives a data-dependent shape; "
                             f"use aj.where(mask, x, 0) or x.masked_fill(~mask, 0) on axis {d}",
                             _where())
        if isinstance(ix, int | np.integer):
            i = int(ix) + size if ix < 0 else int(ix)
            if not 0 <= i < size:
                raise ShapeError("getitem", f"index {ix} is out of range for dimension {d} "
                                 f"of shape {t.shape}", _where())
            starts.append(i)
            stops.append(i + 1)
        elif isinstance(ix, slice):
            a, b, s = ix.indices(size)
            if s <= 0:
                raise TraceError("getitem", f"step {s} in {ix!r}: negative and zero steps are "
                                 "not supported (as in PyTorch); use .flip-free arithmetic or "
                                 "an integer-array index", _where())
            b = max(a, b)
            starts.append(a)
            stops.append(b)
            if s > 1:
                steps[len(out_dims)] = (s, len(range(a, b, s)))
            out_dims.append(d)
        else:
            starts.append(0)
            stops.append(size)
            array_dim = (len(out_dims), ix)
            out_dims.append(d)
        d += 1
    out = t
    if starts != [0] * t.ndim or stops != list(t.shape):
        out = trace.apply("slice", [t], {"starts": tuple(starts), "stops": tuple(stops)})
    kept = [out.shape[dd] for dd in out_dims if dd is not None]
    if 0 in out.shape:
        raise ShapeError("getitem", f"{index!r} selects nothing from shape {t.shape}: empty "
                         "tensors are not supported", _where())
    if len(kept) != out.ndim:
        out = out.reshape(*kept)
    # positions among the kept dimensions (None axes are inserted last)
    pos = {i: sum(1 for dd in out_dims[:i] if dd is not None) for i in range(len(out_dims))}
    for i, (s, n) in steps.items():
        ids = np.arange(0, s * n, s, dtype=np.int32)
        out = _take(out, pos[i], ids)
    shape_none = list(out.shape)
    if array_dim is not None:
        i, ix = array_dim
        out = _take(out, pos[i], ix)
        extra = out.ndim - len(shape_none) + 1  # the array's own dimensions
        shape_none = list(out.shape)
        for j in range(len(out_dims)):  # dims after the array shift by its rank - 1
            if j > i:
                pos[j] += extra - 1
    if None in out_dims:
        for i in sorted((i for i, dd in enumerate(out_dims) if dd is None), reverse=True):
            at = pos[i]
            shape_none.insert(at, 1)
        out = out.reshape(*shape_none)
    return out


def _take(x: Tensor, d: int, ix: Any) -> Tensor:
    """x indexed along dimension d by integer array `ix` (result dims replace d)."""
    from alpha_jit.creation import constant
    from alpha_jit.nn.functional import note_index_bound
    from alpha_jit.tensor import TensorOps, where

    size = x.shape[d]
    if isinstance(ix, TensorOps):
        ids = ix._t()
        if ids.dtype.is_float:
            raise TraceError("getitem", f"index tensors must be integers, got "
                             f"{ids.dtype}{list(ids.shape)}; a mask (a comparison) would be "
                             "boolean-mask indexing, whose shape depends on the data: use "
                             "aj.where(mask, x, 0) or x.masked_fill(~mask, 0)", _where())
        note_index_bound(ids, size, "getitem", low=-size)
        ids = where(ids < 0, ids + size, ids)  # PyTorch wraps negative indices
    else:
        arr = np.asarray(ix)
        if arr.dtype == np.bool_:
            if arr.shape != (size,):
                raise ShapeError("getitem", f"a boolean mask of shape {arr.shape} does not "
                                 f"match dimension {d} of shape {x.shape}", _where())
            arr = np.nonzero(arr)[0]
        if arr.dtype.kind not in "iu" and arr.size:
            raise TraceError("getitem", f"index arrays must be integers, got {arr.dtype}",
                             _where())
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < -size or arr.max() >= size):
            bad = int(arr.min() if arr.min() < -size else arr.max())
            raise ShapeError("getitem", f"index {bad} is out of range for dimension {d} of "
                             f"shape {x.shape}", _where())
        ids = constant(np.where(arr < 0, arr + size, arr).astype(np.int32))
    perm = [d, *[i for i in range(x.ndim) if i != d]]
    front = x.permute(*perm)
    rest = front.shape[1:]
    rows = trace.apply("gather_rows", [front.reshape(size, math.prod(rest)), ids])
    out = rows.reshape(*ids.shape, *rest)
    k = len(ids.shape)
    back = list(range(k, k + d)) + list(range(k)) + list(range(k + d, out.ndim))
    return out.permute(*back)


def cat(tensors: Sequence[Any], dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Concatenation along `dim` (PyTorch's default 0; numpy's `axis=` too), as a sum of
    zero-padded parts: one fused kernel, whose backward is slices."""
    dim = dim if axis is None else axis
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ShapeError("cat", "expects a non-empty sequence of tensors", _where())
    ax = norm_axis(dim, ts[0].ndim, "cat")
    for t in ts[1:]:
        if t.ndim != ts[0].ndim or any(a != b for i, (a, b) in enumerate(zip(
                t.shape, ts[0].shape, strict=True)) if i != ax):
            raise ShapeError("cat", f"shapes {[x.shape for x in ts]} differ outside dimension "
                             f"{dim}", _where())
    if len(ts) == 1:
        return ts[0]
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


def stack(tensors: Sequence[Any], dim: int = 0, *, axis: int | None = None) -> Tensor:
    dim = dim if axis is None else axis
    ts = [_t(x) for x in tensors]
    if not ts:
        raise ShapeError("stack", "expects a non-empty sequence of tensors", _where())
    d = norm_axis(dim, ts[0].ndim + 1, "stack")
    return cat([t.unsqueeze(d) for t in ts], d)


def pad(x: Any, pads: Sequence[tuple[int, int]]) -> Tensor:
    """Zero padding: pads[d] = (before, after) elements on axis d."""
    return trace.apply("pad", [x], {"pads": tuple((int(b), int(e)) for b, e in pads)})
